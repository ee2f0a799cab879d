"""``cellformers info``: describe a model (family, files, size, vocabulary, coverage of a file)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path


def _n_tensor_values(path: Path) -> int:
    """Count the values in the tensors of a weights file (read lazily; no pickled code runs)."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(path, "pt") as f:
            return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    import torch

    def count(obj) -> int:
        if isinstance(obj, torch.Tensor):
            return obj.numel()
        if isinstance(obj, dict):
            return sum(count(v) for v in obj.values())
        if isinstance(obj, list | tuple):
            return sum(count(v) for v in obj)
        return 0

    return count(torch.load(path, map_location="cpu", weights_only=True, mmap=True))


def _genes(path: Path, family: str) -> list[str]:
    """Return the genes a model reads, from its vocabulary file (special tokens left out)."""
    from .genes import read_gene_dict, read_gene_list

    if family == "Geneformer":
        tokens = list(read_gene_dict(path))
    elif family == "scGPT":
        tokens = list(json.loads(path.read_text(encoding="utf-8")))
    else:
        tokens = read_gene_list(path)
    return [t for t in map(str, tokens) if not (t.startswith("<") and t.endswith(">"))]


def _geneformer_dictionary(folder: Path, config: dict) -> Path | None:
    from .data import geneformer_v1_dictionaries

    hits = sorted(p for p in folder.glob("token_dictionary*") if p.suffix in (".pkl", ".json"))
    if hits:
        return hits[0]
    if config.get("vocab_size") == 25426:  # version 1: the published V1 dictionaries
        return geneformer_v1_dictionaries()["token_dictionary"]
    return None


def _registered(name: str, lines: list[str]) -> tuple[str, Path | None, Path | None]:
    from .data import geneformer_v1_dictionaries
    from .pretrained import PRETRAINED, fetch, is_cached, model_folder
    from .pretrained._registry import FAMILY_CLASSES

    e = PRETRAINED[name]
    folder = model_folder(e)
    lines += [
        f"name:        {e.name} (registered)",
        f"family:      {e.family} (cellformers.model.{FAMILY_CLASSES[e.family]})",
        f"description: {e.description}",
        f"license:     {e.license}",
        f"citation:    {e.citation}",
        f"source:      {e.source}",
        f"hashes:      {e.attestation}ly attested",
        f"files:       {e.size / 1e6:,.1f} MB, {'in the cache' if is_cached(e) else 'not downloaded'}"
        f" ({folder})",
    ]
    lines += [f"  {f.fname}: {f.size:,} bytes, sha256 {f.sha256} ({f.evidence})" for f in e.files]
    weights = folder / e.weights if e.weights else None
    if weights is None:
        weights = next((folder / f.fname for f in e.files if f.fname.endswith(_WEIGHTS)), None)
    weights = weights if weights is not None and is_cached(e) else None
    try:
        if e.vocabulary is None:  # Geneformer V1: the published V1 dictionaries
            vocab = geneformer_v1_dictionaries()["token_dictionary"]
        else:
            vocab = fetch(e, files=[e.vocabulary], progressbar=False) / e.vocabulary
    except FileNotFoundError as err:
        lines.append(f"vocabulary:  not available ({' '.join(str(err).split())})")
        vocab = None
    return e.family, weights, vocab


_WEIGHTS = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")


def _local(path: Path, lines: list[str]) -> tuple[str | None, Path | None, Path | None]:
    from . import model as models

    lines.append(f"path:        {path}")
    if path.is_dir():
        try:
            registry = models.SCGPT.load_registry(os.fspath(path))
        except Exception:  # not a folder written by model.save
            registry = None
        if registry is not None:
            setup = registry.get("setup_args", {})
            lines += [
                f"family:      {registry.get('model_name')} (saved cellformers model)",
                f"setup:       {setup}",
            ]
            return None, None, None
        files = sorted(p for p in path.iterdir() if p.is_file())
        size = sum(p.stat().st_size for p in files)
        lines.append(f"files:       {size / 1e6:,.1f} MB: {', '.join(p.name for p in files)}")
        weights = next((p for p in files if p.suffix in _WEIGHTS), None)
        if (path / "args.json").is_file():
            lines.append("family:      scGPT (official folder; cellformers.model.SCGPT)")
            return "scGPT", weights, path / "vocab.json"
        if (path / "config.json").is_file():
            config = json.loads((path / "config.json").read_text(encoding="utf-8"))
            lines += [
                "family:      Geneformer (official folder; cellformers.model.Geneformer)",
                f"network:     {(config.get('architectures') or ['BertForMaskedLM'])[0]}, "
                f"{config.get('num_hidden_layers')} layers, {config.get('hidden_size')} wide, "
                f"{config.get('vocab_size'):,} tokens, {config.get('max_position_embeddings')} "
                "positions",
            ]
            return "Geneformer", weights, _geneformer_dictionary(path, config)
        raise ValueError(
            f"{path} is not a saved cellformers model nor an official Geneformer or scGPT folder."
        )
    lines.append(f"file:        {path.stat().st_size / 1e6:,.1f} MB")
    return None, path, None


def describe(
    spec: str, *, data: str | os.PathLike | None = None, gene_key: str | None = None
) -> list[str]:
    """Lines describing a registered model, a checkpoint folder/file or a saved model.

    Parameters
    ----------
    spec
        Registered name or local path.
    data
        An ``.h5ad`` file whose genes are matched against the model's vocabulary.
    gene_key
        Column of ``var`` in ``data`` holding the gene names (default ``var_names``).

    Returns
    -------
    The lines to print.

    """
    from .pretrained import PRETRAINED

    lines: list[str] = []
    if spec in PRETRAINED:
        family, weights, vocab = _registered(spec, lines)
    elif os.path.exists(spec):
        family, weights, vocab = _local(Path(spec), lines)
    else:
        raise FileNotFoundError(
            f"{spec!r} is neither a registered model name (see `cellformers list`) nor an "
            "existing file or folder."
        )
    if weights is not None:
        lines.append(f"parameters:  {_n_tensor_values(weights):,} values in {weights.name}")
    if vocab is None:
        if data is not None:
            lines.append("coverage:    unknown (no vocabulary file)")
        return lines
    genes = _genes(vocab, family)
    lines.append(f"vocabulary:  {len(genes):,} genes ({vocab.name})")
    if data is not None:
        lines.append(f"coverage:    {_coverage(genes, data, gene_key)}")
    return lines


def _coverage(genes: list[str], data: str | os.PathLike, gene_key: str | None) -> str:
    import anndata as ad

    from .genes import GeneVocab, match_genes

    if not os.path.isfile(data):
        raise FileNotFoundError(f"data file {data} does not exist")
    adata = ad.read_h5ad(data, backed="r")
    if gene_key is not None and gene_key not in adata.var:
        raise KeyError(f"{gene_key!r} is not a column of var in {data}")
    names = adata.var_names if gene_key is None else adata.var[gene_key].astype(str)
    vocab = GeneVocab.from_tokens(genes, specials=(), pad_token=None, cls_token=None)
    return f"{Path(data).name}: " + match_genes(list(names), vocab, min_coverage=0.0).summary()
