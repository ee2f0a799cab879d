"""Registry of the published checkpoints: names, files, pinned sha256, licences and downloads.

Every file of a registered model is pinned by its sha256 and size. :func:`fetch` downloads the
files with pooch into ``cellformers.settings.cache_dir / "pretrained" / <name>`` (a file already
there with the right hash is used offline); a download whose hash does not match is an error and
leaves no file behind. ``Model.from_pretrained(name, adata)`` resolves names through
:func:`resolve_pretrained`, which also accepts local folders and Hugging Face repository ids.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pandas as pd

from .._settings import settings

logger = logging.getLogger(__name__)

#: Model family -> the cellformers model class that loads it.
FAMILY_CLASSES: dict[str, str] = {
    "Geneformer": "Geneformer",
    "scGPT": "SCGPT",
    "scFoundation": "SCFoundation",
    "scBERT": "SCBERT",
}


@dataclass(frozen=True)
class PretrainedFile:
    """One file of a registered model.

    Attributes
    ----------
    fname
        File name in the model's local folder.
    sha256
        Pinned sha256 of the published file.
    size
        Size in bytes.
    url
        Published download location (at a pinned revision where the host has revisions), or
        `None` when the authors publish no direct link (the file must then come from a mirror,
        see :attr:`cellformers.settings.pretrained_url`, or be placed in the folder by hand).
    attestation
        ``"strong"`` when the hash is attested by the publisher (e.g. the Git LFS pointer of the
        model repository) or by several independent pins, ``"weak"`` for a single third-party
        pin.
    evidence
        Where the hash comes from.

    """

    fname: str
    sha256: str
    size: int
    url: str | None
    attestation: Literal["strong", "weak"]
    evidence: str


@dataclass(frozen=True)
class PretrainedModel:
    """A registered model: its files and how ``from_pretrained`` reads them.

    Attributes
    ----------
    name
        Registry name, e.g. ``"geneformer-v2-104m"``.
    family
        ``"Geneformer"``, ``"scGPT"``, ``"scFoundation"`` or ``"scBERT"``.
    description
        One line about the model.
    files
        The files, weights and auxiliary files.
    license
        Licence of the weights (and auxiliary files).
    citation
        The paper to cite.
    source
        Where the authors publish the model.
    weights
        File given to ``from_pretrained`` as the checkpoint; `None` for a checkpoint folder.
    arguments
        ``from_pretrained`` keyword -> file name, for the auxiliary files it needs (e.g.
        scFoundation's ``gene_list``).
    vocabulary
        File naming the genes the model reads.

    """

    name: str
    family: str
    description: str
    files: tuple[PretrainedFile, ...]
    license: str
    citation: str
    source: str
    weights: str | None = None
    arguments: Mapping[str, str] = field(default_factory=dict)
    vocabulary: str | None = None

    @property
    def attestation(self) -> str:
        """The weakest attestation of the model's files."""
        return "weak" if any(f.attestation == "weak" for f in self.files) else "strong"

    @property
    def size(self) -> int:
        """Total size of the files in bytes."""
        return sum(f.size for f in self.files)

    def file(self, fname: str) -> PretrainedFile:
        """Return the file named ``fname``."""
        for f in self.files:
            if f.fname == fname:
                return f
        raise KeyError(
            f"{self.name!r} has no file {fname!r}; it has {[f.fname for f in self.files]}."
        )


# ---------------------------------------------------------------------------------- entries
_GF_REPO = "https://huggingface.co/ctheodoris/Geneformer/resolve"
_GF_V2_REV = "ff551ee40322e9f58bd86ca867d76cf78f26e41b"
_GF_V1_REV = "31bf641d0f173a18a5e06d9a6574bb0d3fe5edc1"
_LFS = "Git LFS pointer of the model repository"
_PUBLISHED = "sha256 of the published file"
_GF_CITATION = (
    "Theodoris et al. (2023) Transfer learning enables predictions in network biology. Nature "
    "618, 616-624. doi:10.1038/s41586-023-06139-9"
)
_GF_SOURCE = "https://huggingface.co/ctheodoris/Geneformer"


def _gf_file(rev: str, folder: str, fname: str, sha256: str, size: int, evidence: str):
    return PretrainedFile(
        fname=fname,
        sha256=sha256,
        size=size,
        url=f"{_GF_REPO}/{rev}/{folder}/{fname}",
        attestation="strong",
        evidence=evidence,
    )


_GF_V2_DICTS = (
    _gf_file(
        _GF_V2_REV,
        "geneformer",
        "token_dictionary_gc104M.pkl",
        "67c445f4385127adfc48dcc072320cd65d6822829bf27dd38070e6e787bc597f",
        425590,
        _PUBLISHED,
    ),
    _gf_file(
        _GF_V2_REV,
        "geneformer",
        "gene_median_dictionary_gc104M.pkl",
        "a51c53f6a771d64508dfaf61529df70e394c53bd20856926117ae5d641a24bf5",
        1512661,
        _PUBLISHED,
    ),
)


def _geneformer(
    name: str,
    folder: str,
    rev: str,
    description: str,
    weights: tuple[str, str, int],
    config: tuple[str, int],
    dictionaries: tuple[PretrainedFile, ...] = (),
) -> PretrainedModel:
    """Build a Geneformer entry: ``config.json`` and weights of ``folder`` at revision ``rev``.

    Version 1 models (25,426 tokens) read the V1 dictionaries of
    :func:`~cellformers.data.geneformer_v1_dictionaries`; version 2 models carry theirs.
    """
    files = (
        _gf_file(rev, folder, "config.json", *config, _PUBLISHED),
        _gf_file(rev, folder, *weights, _LFS),
        *dictionaries,
    )
    return PretrainedModel(
        name=name,
        family="Geneformer",
        description=description,
        files=files,
        license="Apache-2.0",
        citation=_GF_CITATION,
        source=f"{_GF_SOURCE}/tree/{rev}/{folder}",
        vocabulary=dictionaries[0].fname if dictionaries else None,
    )


_ENTRIES: tuple[PretrainedModel, ...] = (
    _geneformer(
        "geneformer-v1-10m",
        "Geneformer-V1-10M",
        _GF_V2_REV,
        "Geneformer V1, 6 layers, 256 wide (10M parameters), 30M-cell corpus, 2,048 input genes",
        (
            "model.safetensors",
            "a5e33a757431643b3697de7ef6127950cdc49e06e58d4266b3a3ab191b683f14",
            41183536,
        ),
        ("9cf69ca3bdb0215c4188b54c451b6f02adfe68b8f66011a57d0f32845133fd4b", 565),
    ),
    _geneformer(
        "geneformer-12l-30m",
        "gf-12L-30M-i2048",
        _GF_V1_REV,
        "Geneformer V1, 12 layers, 512 wide, 30M-cell corpus, 2,048 input genes",
        (
            "pytorch_model.bin",
            "812f8d85e5ecf9d64c268f052f6ece2c1906bc4f1aecf70d5144b2598386b615",
            158467410,
        ),
        ("a82b9cf2cb830be227bfbbe5a4c5d62723f49fac892ca37c541d0ef40a0e1de9", 567),
    ),
    _geneformer(
        "geneformer-v1-10m-cardiomyopathies",
        "fine_tuned_models/Geneformer-V1-10M_CellClassifier_cardiomyopathies_220224",
        _GF_V2_REV,
        "Geneformer V1-10M fine-tuned to classify cardiomyocytes (non-failing, hypertrophic, "
        "dilated cardiomyopathy)",
        (
            "pytorch_model.bin",
            "12ead3bad8cf4b853bac87eadeb79c9308ae492e9d29f32da1a2c85e8586108d",
            41115113,
        ),
        ("9ca00e22cb384537961f9b8bcc44d1efeea412af6c6db9d6eafddd8d304b1d9c", 930),
    ),
    _geneformer(
        "geneformer-v2-104m",
        "Geneformer-V2-104M",
        _GF_V2_REV,
        "Geneformer V2, 12 layers, 768 wide (104M parameters), 104M-cell corpus, 4,096 tokens",
        (
            "model.safetensors",
            "fff5cba29ddd8792991fa77b4872246fbe548a178cebda3775cdc72b67780e7f",
            417571156,
        ),
        ("467d4492f0dd53b4d60afffe20812db484ca1cf9fdbeb6a6e060e93564f70859", 590),
        _GF_V2_DICTS,
    ),
    _geneformer(
        "geneformer-v2-104m-clcancer",
        "Geneformer-V2-104M_CLcancer",
        _GF_V2_REV,
        "Geneformer V2-104M with continual learning on cancer cells",
        (
            "model.safetensors",
            "827738139bfed4bafa9d1f3df7c6146da2e3b85f7225076adc32c6eda0ba4357",
            417571156,
        ),
        ("b3e1f3e71b1df7238f0f1d6dda258d560ea84e5e9698351a1588cfad06321e18", 762),
        _GF_V2_DICTS,
    ),
    _geneformer(
        "geneformer-v2-316m",
        "Geneformer-V2-316M",
        _GF_V2_REV,
        "Geneformer V2, 18 layers, 1,152 wide (316M parameters), 104M-cell corpus",
        (
            "model.safetensors",
            "965ceccea81953d362081ef3843560a0e4fef88d396c28017881f1e94b1246f3",
            1265455076,
        ),
        ("2cc4af3442644e84af71814a607b61c958d7b4e5ebde6791ab77b5f534ac6f6e", 591),
        _GF_V2_DICTS,
    ),
    PretrainedModel(
        name="scgpt-human",
        family="scGPT",
        description="scGPT whole-human model (12 layers, 512 wide), 33M cells",
        files=(
            PretrainedFile(
                "best_model.pt",
                "6cb5d451ab5c4b33eb673adbe4fddc61d2389df1b89b7651a9fe2e557572b922",
                205385258,
                None,
                "strong",
                "several independent third-party pins agree",
            ),
            PretrainedFile(
                "vocab.json",
                "acca93d114ca62c3f0f50debbd23e8c87f0714f4737764454f6b2b13f2e8580f",
                1317639,
                None,
                "strong",
                "third-party pin of the authors' file",
            ),
            PretrainedFile(
                "args.json",
                "c18e075e018140cb8b2d9029387b9de26607a5ce6a8ccabd6ead70cd76b95d60",
                1300,
                None,
                "strong",
                "third-party pin of the authors' file",
            ),
        ),
        license="code MIT; weights licence not declared",
        citation=(
            "Cui et al. (2024) scGPT: toward building a foundation model for single-cell "
            "multi-omics using generative AI. Nat Methods 21, 1470-1480. "
            "doi:10.1038/s41592-024-02201-0"
        ),
        source=(
            "https://github.com/bowang-lab/scGPT (model zoo: Google Drive folder "
            "1oWh_-ZRdhtoGQ2Fw24HP41FgLoomVo-y)"
        ),
        vocabulary="vocab.json",
    ),
    PretrainedModel(
        name="scfoundation",
        family="scFoundation",
        description="scFoundation 0.1B (cell, read-depth enhancement and gene networks), 50M cells",
        files=(
            PretrainedFile(
                "models.ckpt",
                "9f40bf324d3d0084c4b288d06f5af4fddd12206e2a3f022551d12e89e33a0ea9",
                1432587886,
                "https://huggingface.co/genbio-ai/scFoundation/resolve/main/models.ckpt",
                "strong",
                "Git LFS pointer of a third-party mirror plus several pins",
            ),
            PretrainedFile(
                "OS_scRNA_gene_index.19264.tsv",
                "bb337ea195d94e7b033543abc02a42e7060d6562eba97deb077f7dcecec62661",
                228232,
                "https://raw.githubusercontent.com/biomap-research/scFoundation/main/model/"
                "OS_scRNA_gene_index.19264.tsv",
                "strong",
                "identical to the authors' repository",
            ),
        ),
        license="non-commercial scFoundation model licence (code Apache-2.0)",
        citation=(
            "Hao et al. (2024) Large-scale foundation model on single-cell transcriptomics. "
            "Nat Methods 21, 1481-1491. doi:10.1038/s41592-024-02305-7"
        ),
        source="https://github.com/biomap-research/scFoundation",
        weights="models.ckpt",
        arguments={"gene_list": "OS_scRNA_gene_index.19264.tsv"},
        vocabulary="OS_scRNA_gene_index.19264.tsv",
    ),
    PretrainedModel(
        name="scbert",
        family="scBERT",
        description="scBERT pretrained on PanglaoDB (Performer, 6 layers, 200 wide, 16,906 genes)",
        files=(
            PretrainedFile(
                "panglao_pretrain.pth",
                "aa27109136580b24a1b985f63d0ba31f22490d09e71b13d1793cbff38619dfe3",
                87631538,
                None,
                "weak",
                "a single third-party pin (every tensor said to match another re-upload)",
            ),
            PretrainedFile(
                "gene2vec_16906.npy",
                "fbf26c229cf7d6c01bc0449fde4b0bb85e558ae53c5ff19b27eaa9ae5447604d",
                27049728,
                None,
                "weak",
                "third-party pin; equals the checkpoint's position table without its padding row",
            ),
            PretrainedFile(
                "panglao_gene_order_16906.h5ad",
                "45b4cea87864d3d5e61076da8722eb270381c35f30ceba282a58432ce285e447",
                712944,
                None,
                "weak",
                "one-cell AnnData whose var_names are the panel of the official panglao_10000.h5ad",
            ),
        ),
        license="GPL-3.0 (fetched at run time, never shipped with cellformers)",
        citation=(
            "Yang et al. (2022) scBERT as a large-scale pretrained deep language model for cell "
            "type annotation of single-cell RNA-seq data. Nat Mach Intell 4, 852-866. "
            "doi:10.1038/s42256-022-00534-z"
        ),
        source="https://github.com/TencentAILabHealthcare/scBERT",
        weights="panglao_pretrain.pth",
        arguments={
            "gene_panel": "panglao_gene_order_16906.h5ad",
            "gene2vec": "gene2vec_16906.npy",
        },
        vocabulary="panglao_gene_order_16906.h5ad",
    ),
)

#: Registered models by name.
PRETRAINED: dict[str, PretrainedModel] = {entry.name: entry for entry in _ENTRIES}


# ---------------------------------------------------------------------------------- access
def _entry(name: str | PretrainedModel) -> PretrainedModel:
    if isinstance(name, PretrainedModel):
        return name
    if not isinstance(name, str):
        raise TypeError(f"Expected a registry name, got {type(name).__name__}.")
    if name not in PRETRAINED:
        raise KeyError(
            f"{name!r} is not a registered model; registered are: {', '.join(PRETRAINED)} "
            "(see cellformers.pretrained.available())."
        )
    return PRETRAINED[name]


def model_folder(name: str | PretrainedModel) -> Path:
    """Return the cache folder of a registered model (``cache_dir / "pretrained" / name``)."""
    return settings.cache_dir / "pretrained" / _entry(name).name


def is_cached(name: str | PretrainedModel) -> bool:
    """Whether every file of a registered model is in the cache (sizes checked, not hashes)."""
    entry = _entry(name)
    folder = model_folder(entry)
    return all(
        (folder / f.fname).is_file() and (folder / f.fname).stat().st_size == f.size
        for f in entry.files
    )


def available() -> pd.DataFrame:
    """List the registered pretrained models.

    Returns
    -------
    One row per model, indexed by name: ``family``, ``model_class`` (the
    :mod:`cellformers.model` class that loads it), ``description``, ``size_mb`` (all files),
    ``license``, ``attestation`` (``"weak"`` when a file's hash has a single third-party pin),
    ``download`` (``"automatic"``, or ``"manual"`` when a file has no public direct link),
    ``cached`` and ``citation``.

    Examples
    --------
    >>> import cellformers as cf
    >>> cf.pretrained.available().loc["geneformer-v2-104m", "family"]
    'Geneformer'

    """
    rows = [
        {
            "name": e.name,
            "family": e.family,
            "model_class": FAMILY_CLASSES[e.family],
            "description": e.description,
            "size_mb": round(e.size / 1e6, 1),
            "license": e.license,
            "attestation": e.attestation,
            "download": "automatic" if all(f.url for f in e.files) else "manual",
            "cached": is_cached(e),
            "citation": e.citation,
        }
        for e in PRETRAINED.values()
    ]
    return pd.DataFrame(rows).set_index("name")


def _url(entry: PretrainedModel, file: PretrainedFile) -> str | None:
    mirror = settings.pretrained_url
    if mirror:
        return f"{mirror.rstrip('/')}/{entry.name}/{file.fname}"
    return file.url


def fetch(
    name: str | PretrainedModel,
    *,
    files: Iterable[str] | None = None,
    progressbar: bool = True,
) -> Path:
    """Download a registered model into the cache and return its folder.

    Each file is checked against its pinned sha256: a file already in the cache with the right
    hash is used without network access, a downloaded file whose hash differs is an error that
    leaves no file behind. Files come from their published location, or from
    ``<settings.pretrained_url>/<name>/<fname>`` when a mirror is set.

    Parameters
    ----------
    name
        A registered name (see :func:`available`) or a :class:`PretrainedModel`.
    files
        Fetch only these files (e.g. the vocabulary); all by default.
    progressbar
        Show a progress bar for each download.

    Returns
    -------
    The folder holding the files (:func:`model_folder`).

    Raises
    ------
    FileNotFoundError
        For a file without public direct link that is not in the folder; the message says
        where to get it and where to put it.
    ValueError
        When a downloaded file does not have the pinned sha256.

    """
    from ..data._datasets import download

    entry = _entry(name)
    folder = model_folder(entry)
    wanted = [f.fname for f in entry.files] if files is None else list(files)
    for fname in wanted:
        file = entry.file(fname)
        download(
            _url(entry, file),
            file.sha256,
            folder / file.fname,
            progressbar=progressbar,
            missing=(
                f"{entry.name}: {file.fname} has no public direct download link. Get it from "
                f"{entry.source} and put it into {folder} (its sha256 must be {file.sha256}), "
                "or set cellformers.settings.pretrained_url (env CELLFORMERS_PRETRAINED_URL) to a "
                "mirror holding <name>/<file>."
            ),
        )
    return folder


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+(/[\w.-]+)*")


def _hub_download(repo: str) -> Path:
    """Download a Hugging Face repository (or one of its folders: ``owner/name/sub/folder``)."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:
        raise ImportError(
            f"{repo!r} is not a registered name nor an existing path. To download it from the "
            "Hugging Face Hub, install huggingface_hub (pip install huggingface_hub)."
        ) from e
    owner, name, *sub = repo.split("/")
    subfolder = "/".join(sub)
    try:
        local = snapshot_download(
            f"{owner}/{name}", allow_patterns=[f"{subfolder}/*"] if subfolder else None
        )
    except Exception as e:  # network errors, unknown repositories, gated models ...
        raise FileNotFoundError(
            f"{repo!r} is not a registered name nor an existing path, and downloading it from "
            f"the Hugging Face Hub failed: {e}"
        ) from e
    return Path(local) / subfolder if subfolder else Path(local)


def resolve_pretrained(
    name_or_path: str | os.PathLike,
    model_class: type | None = None,
    *,
    progressbar: bool = True,
) -> tuple[Path, dict[str, Path]]:
    """Turn a registry name, a local path or a Hugging Face repository id into local files.

    Used by every ``from_pretrained``: a registered name (:func:`available`) is fetched into
    the cache (:func:`fetch`); an existing file or folder is used as it is; otherwise a string
    ``owner/name`` (optionally ``owner/name/sub/folder``) is downloaded from the Hugging Face Hub
    with ``huggingface_hub.snapshot_download``.

    Parameters
    ----------
    name_or_path
        Registry name, checkpoint path or Hugging Face repository id.
    model_class
        The class asking; a registered model of another family is an error that names the class
        to use.
    progressbar
        Show download progress bars.

    Returns
    -------
    The checkpoint path (file or folder) and, for registered models, the auxiliary files keyed
    by the ``from_pretrained`` argument that takes them (e.g. ``{"gene_list": ...}``).

    """
    if not isinstance(name_or_path, str | os.PathLike):
        raise TypeError(
            "Pass a registered model name, a checkpoint path or a Hugging Face repository id, "
            f"got {type(name_or_path).__name__}."
        )
    text = os.fspath(name_or_path)
    if text in PRETRAINED:
        entry = PRETRAINED[text]
        class_name = FAMILY_CLASSES[entry.family]
        if model_class is not None and class_name not in {c.__name__ for c in model_class.__mro__}:
            raise ValueError(
                f"{text!r} is a {entry.family} checkpoint; load it with "
                f"cellformers.model.{class_name}.from_pretrained."
            )
        folder = fetch(entry, progressbar=progressbar)
        path = folder / entry.weights if entry.weights else folder
        return path, {key: folder / fname for key, fname in entry.arguments.items()}
    path = Path(text).expanduser()
    if path.exists():
        return path, {}
    if _HUB_ID.fullmatch(text) and not text.startswith((".", "/")):
        return _hub_download(text), {}
    raise FileNotFoundError(
        f"{text!r} is neither a registered model name ({', '.join(PRETRAINED)}), an existing "
        "file or folder, nor a Hugging Face repository id ('owner/name')."
    )
