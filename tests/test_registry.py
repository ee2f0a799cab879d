"""Registry of published checkpoints: pinned hashes against the published list, downloads from a
local HTTP server (real auxiliary files and tiny checkpoints in the official layouts), hash
mismatches, offline use of the cache, and name resolution in ``from_pretrained``."""

from __future__ import annotations

import csv
import functools
import hashlib
import shutil
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch

from cellformers import settings
from cellformers.model import SCBERT, SCGPT, Geneformer, SCFoundation
from cellformers.pretrained import (
    PRETRAINED,
    PretrainedFile,
    PretrainedModel,
    available,
    fetch,
    is_cached,
    resolve_pretrained,
)

PUBLISHED = Path(__file__).parents[2] / "shared" / "data" / "published"
pytestmark = pytest.mark.skipif(not PUBLISHED.is_dir(), reason="published files not found")

#: Where each registered file lies among the published files.
LOCAL_COPIES = {
    "vocab.json": "scgpt_human/vocab.json",
    "args.json": "scgpt_human/args.json",
    "OS_scRNA_gene_index.19264.tsv": "scfoundation/OS_scRNA_gene_index.19264.tsv",
    "gene2vec_16906.npy": "scbert/gene2vec_16906.npy",
    "panglao_gene_order_16906.h5ad": "scbert/panglao_gene_order_16906.h5ad",
    "token_dictionary_gc104M.pkl": "geneformer_v2/token_dictionary_gc104M.pkl",
    "gene_median_dictionary_gc104M.pkl": "geneformer_v2/gene_median_dictionary_gc104M.pkl",
}
GENEFORMER_FOLDERS = {  # registry name -> the model's folder name in the published configs
    "geneformer-v1-10m": "Geneformer-V1-10M",
    "geneformer-12l-30m": "gf-12L-30M-i2048",
    "geneformer-v1-10m-cardiomyopathies": "V1-10M_CellClassifier_cardiomyopathies_220224",
    "geneformer-v2-104m": "Geneformer-V2-104M",
    "geneformer-v2-104m-clcancer": "Geneformer-V2-104M_CLcancer",
    "geneformer-v2-316m": "Geneformer-V2-316M",
}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _published_copy(name: str, fname: str) -> Path:
    if fname == "config.json":
        return PUBLISHED / "geneformer_configs" / f"{GENEFORMER_FOLDERS[name]}.config.json"
    return PUBLISHED / LOCAL_COPIES[fname]


def _pin(entry_name: str, path: Path, fname: str | None = None) -> PretrainedFile:
    return PretrainedFile(
        fname or path.name, _sha256(path), path.stat().st_size, None, "strong", "test"
    )


@pytest.fixture
def mirror(tmp_path, monkeypatch):
    """A folder served over HTTP on 127.0.0.1, set as the registry mirror; a fresh cache."""
    root = tmp_path / "mirror"
    root.mkdir()
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a, **k: None
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setattr(settings, "_cache_dir", tmp_path / "cache")
    monkeypatch.setattr(settings, "_pretrained_url", f"http://127.0.0.1:{server.server_port}")
    try:
        yield root
    finally:
        server.shutdown()
        server.server_close()


def _serve(root: Path, name: str, files: dict[str, Path]) -> None:
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    for fname, src in files.items():
        shutil.copyfile(src, folder / fname)


# ------------------------------------------------------------------------ pinned hashes
def test_weights_carry_the_published_hashes_and_sizes():
    with (PUBLISHED / "published_checkpoints.tsv").open() as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    by_hash = {r["sha256"]: r for r in rows}
    weights = [
        (e, f)
        for e in PRETRAINED.values()
        for f in e.files
        if f.fname.endswith((".safetensors", ".bin", ".pt", ".pth", ".ckpt"))
    ]
    assert len(weights) == len(PRETRAINED)  # one weights file per model
    for entry, file in weights:
        row = by_hash[file.sha256]
        assert int(row["bytes"]) == file.size
        weak = "weak" in row["hash_evidence"] or row["hash_evidence"].startswith("third-party pin")
        assert file.attestation == ("weak" if weak else "strong"), entry.name
        if row["source"].startswith("huggingface ctheodoris/Geneformer"):
            assert file.url.endswith(f"/resolve/{row['revision']}/{row['file']}"), entry.name
    assert {r["model"] for r in rows} - {by_hash[f.sha256]["model"] for _, f in weights} == {
        "scGPT_CP",  # no published vocabulary/args pin: not registered
        "gf-12L-95M-i4096",  # the 95M-cell dictionaries are not pinned here
        "gf-12L-95M-i4096_CLcancer",
        "gf-20L-95M-i4096",
        "gf-12L-95M-i4096_MTLCellClassifier_CELLxGENE",
    }


def test_auxiliary_files_carry_the_hashes_of_the_real_files():
    for entry in PRETRAINED.values():
        for file in entry.files:
            if file.fname.endswith((".safetensors", ".bin", ".pt", ".pth", ".ckpt")):
                continue
            local = _published_copy(entry.name, file.fname)
            assert (file.sha256, file.size) == (_sha256(local), local.stat().st_size), local


def test_available_lists_every_model():
    table = available()
    assert list(table.index) == list(PRETRAINED)
    assert {
        "geneformer-v1-10m",
        "geneformer-v2-104m",
        "scgpt-human",
        "scfoundation",
        "scbert",
    } <= set(table.index)
    assert table.loc["scbert", "attestation"] == "weak"
    assert table.loc["geneformer-v2-104m", "attestation"] == "strong"
    assert table.loc["scbert", "license"].startswith("GPL-3.0")
    assert table.loc["scgpt-human", "model_class"] == "SCGPT"
    assert table["citation"].str.contains("doi:").all()


# ------------------------------------------------------------------------ downloads
def test_fetch_real_auxiliary_files_then_offline(mirror, monkeypatch):
    names = {"scgpt-human": ["vocab.json", "args.json"], "scbert": ["gene2vec_16906.npy"]}
    names["geneformer-v2-104m"] = ["config.json", "token_dictionary_gc104M.pkl"]
    names["scfoundation"] = ["OS_scRNA_gene_index.19264.tsv"]
    for name, fnames in names.items():
        _serve(mirror, name, {f: _published_copy(name, f) for f in fnames})
        folder = fetch(name, files=fnames, progressbar=False)
        for fname in fnames:
            assert _sha256(folder / fname) == PRETRAINED[name].file(fname).sha256
        assert not is_cached(name)  # the weights are not there
    # offline: the mirror is gone, the cached files (right hash) are used as they are
    shutil.rmtree(mirror)
    monkeypatch.setattr(settings, "_pretrained_url", "http://127.0.0.1:9")
    assert fetch("scgpt-human", files=["vocab.json"], progressbar=False).is_dir()


def test_wrong_hash_is_an_error_and_leaves_no_file(mirror):
    name, fname = "scgpt-human", "args.json"
    _serve(mirror, name, {fname: _published_copy(name, fname)})
    (mirror / name / fname).write_text('{"nlayers": 1}')  # altered on the server
    with pytest.raises(ValueError, match="SHA256"):
        fetch(name, files=[fname], progressbar=False)
    folder = settings.cache_dir / "pretrained" / name
    assert not folder.exists() or list(folder.iterdir()) == []


def test_file_without_public_link_explains_where_to_put_it(tmp_path, monkeypatch):
    monkeypatch.setattr(settings, "_cache_dir", tmp_path)
    monkeypatch.setattr(settings, "_pretrained_url", None)
    monkeypatch.delenv("CELLFORMERS_PRETRAINED_URL", raising=False)
    with pytest.raises(FileNotFoundError, match="no public direct download link") as e:
        fetch("scbert", progressbar=False)
    assert str(tmp_path / "pretrained" / "scbert") in str(e.value)


# ------------------------------------------------------------------------ from_pretrained(name)
def test_names_resolve_per_family_and_unknown_names_fail():
    with pytest.raises(ValueError, match="Geneformer.from_pretrained"):
        resolve_pretrained("geneformer-v1-10m", SCGPT)
    with pytest.raises(ValueError, match="SCBERT.from_pretrained"):
        resolve_pretrained("scbert", SCFoundation)
    with pytest.raises(FileNotFoundError, match="neither a registered model name"):
        resolve_pretrained("./no/such/folder")
    with pytest.raises(TypeError):
        resolve_pretrained(3)


def test_from_pretrained_names_load_tiny_checkpoints(mirror, monkeypatch, cellbench, tmp_path):
    """Each family loads a registered name: tiny random networks in the official layouts, with
    the real auxiliary files, served by the mirror and pinned by their real hashes."""
    from reference_scfoundation import official_config, official_state_dict, save_models_ckpt
    from tiny_checkpoints import tiny_scgpt_folder

    from cellformers.module import GeneformerModule, SCBERTModule
    from cellformers.pretrained import save_geneformer_checkpoint

    adata = cellbench[:12].copy()
    made = tmp_path / "made"

    # Geneformer V2 layout: config.json + model.safetensors + the real V2 dictionaries
    torch.manual_seed(0)
    gf_module = GeneformerModule(
        vocab_size=20275,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=16,
        max_position_embeddings=4096,
    )
    gf = save_geneformer_checkpoint(gf_module, made / "gf")
    gf_files = {p.name: p for p in gf.iterdir()}
    gf_files |= {f: _published_copy("geneformer-v2-104m", f) for f in LOCAL_COPIES if "gc104M" in f}
    # scGPT layout with the real vocabulary
    sg = tiny_scgpt_folder(made / "sg", _published_copy("scgpt-human", "vocab.json"))
    sg_files = {p.name: p for p in sg.iterdir()}
    # scFoundation: the real 19,264-gene index with a tiny models.ckpt
    gene_index = _published_copy("scfoundation", "OS_scRNA_gene_index.19264.tsv")
    sds = {
        v: official_state_dict(n_genes=19264, seed=i) for i, v in enumerate(("cell", "rde", "gene"))
    }
    sf = save_models_ckpt(made / "models.ckpt", sds, official_config(n_genes=19264))
    sf_files = {"models.ckpt": sf, gene_index.name: gene_index}
    # scBERT: the real panel and gene2vec table in a tiny Performer
    g2v_path = _published_copy("scbert", "gene2vec_16906.npy")
    g2v = torch.as_tensor(np.load(g2v_path))
    scbert = SCBERTModule(16906, gene2vec=g2v, dim=200, depth=1, heads=2, dim_head=8)
    torch.save({"model_state_dict": scbert.state_dict()}, made / "panglao_pretrain.pth")
    panel = _published_copy("scbert", "panglao_gene_order_16906.h5ad")
    sb_files = {
        "panglao_pretrain.pth": made / "panglao_pretrain.pth",
        g2v_path.name: g2v_path,
        panel.name: panel,
    }

    cases = [
        (Geneformer, "geneformer-v2-104m", gf_files, {"gene_key": "ensembl_id"}),
        (SCGPT, "scgpt-human", sg_files, {}),
        (SCFoundation, "scfoundation", sf_files, {}),
        (SCBERT, "scbert", sb_files, {}),
    ]
    for cls, real_name, files, setup in cases:
        real = PRETRAINED[real_name]
        name = f"tiny-{real_name}"
        entry = PretrainedModel(
            name=name,
            family=real.family,
            description="tiny random network",
            files=tuple(_pin(name, p, f) for f, p in files.items()),
            license=real.license,
            citation=real.citation,
            source=real.source,
            weights=real.weights,
            arguments=real.arguments,
            vocabulary=real.vocabulary,
        )
        monkeypatch.setitem(PRETRAINED, name, entry)
        _serve(mirror, name, files)
        query = adata.copy()
        cls.setup_anndata(query, **setup)
        model = cls.from_pretrained(name, query)
        assert is_cached(name)
        emb = model.get_latent_representation()
        assert emb.shape[0] == adata.n_obs and np.isfinite(emb).all(), name
