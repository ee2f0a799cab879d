"""Registry of public datasets used in examples, tests and benchmarks.

Every file is pinned by its sha256. A file is looked up, in order, in
:attr:`cellformers.settings.data_dir` (``CELLFORMERS_DATA``), then in
:attr:`cellformers.settings.cache_dir`; only when neither holds a copy with the right hash
is it downloaded with pooch (for entries that have a public URL).
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import numpy as np
import scanpy as sc

from .._settings import settings

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DatasetEntry:
    """A registry entry: file name, pinned sha256, optional download URL, licence and source."""

    fname: str
    sha256: str
    url: str | None
    license: str
    source: str


_GENEFORMER_V1_URL = (
    "https://huggingface.co/ctheodoris/Geneformer/resolve/main/geneformer/gene_dictionaries_30m"
)

DATASETS: dict[str, DatasetEntry] = {
    "cellbench_2platform": DatasetEntry(
        fname="cellbench_2platform.h5ad",
        sha256="464ea7fa81f4e947c12b772f5cf7cb53dc290afe56554c3164175a6b23b06e6e",
        url=None,
        license="MIT",
        source="CellBench (Tian et al. 2019), 3 lung-adenocarcinoma cell lines on CEL-seq2 and Drop-seq",
    ),
    "papalexi_eccite_lowmoi": DatasetEntry(
        fname="papalexi_eccite_lowmoi.h5ad",
        sha256="5f8043bd4b4b131a041e06394c37c7389964b9a79db95ed1cd3e93fe360a8186",
        url=None,
        license="MIT",
        source="ECCITE-seq CRISPR-KO screen in THP-1 cells (Papalexi et al. 2021), via sceptredata",
    ),
    "pbmc_citeseq_2batch": DatasetEntry(
        fname="pbmc_citeseq_2batch.h5mu",
        sha256="5f86ea458ffdaa1a93da30e9c97d40f35cb4b39e91bde1ddd63414408902f750",
        url=None,
        license="BSD-3-Clause",
        source="10x CITE-seq PBMC 5k and 10k protein v3, 200 cells each (scvi-tools test data)",
    ),
    "merfish_motor_cortex": DatasetEntry(
        fname="merfish_motor_cortex.h5ad",
        sha256="2b370574725731170e13cfe72753d8a0e0b5c331f9aa0ce6a93af1ee897c2a90",
        url=None,
        license="BSD-3-Clause",
        source="MERFISH mouse primary motor cortex, 253-gene panel (Tangram test data)",
    ),
    "geneformer_v1_token_dictionary": DatasetEntry(
        fname="geneformer_v1/token_dictionary.pkl",
        sha256="ab9dc40973fa5224d77b793e2fd114cacf3d08423ed9c4c49caf0ba9c7f218f1",
        url=f"{_GENEFORMER_V1_URL}/token_dictionary_gc30M.pkl",
        license="Apache-2.0",
        source="Geneformer V1 token dictionary (ctheodoris/Geneformer, gene_dictionaries_30m)",
    ),
    "geneformer_v1_gene_median_dictionary": DatasetEntry(
        fname="geneformer_v1/gene_median_dictionary.pkl",
        sha256="b3b589bb5ec75040d05fc44dd6bf0184cf87f3c362cf158d196a6ed3b7fe5f39",
        url=f"{_GENEFORMER_V1_URL}/gene_median_dictionary_gc30M.pkl",
        license="Apache-2.0",
        source="Geneformer V1 gene non-zero medians (ctheodoris/Geneformer, gene_dictionaries_30m)",
    ),
    "geneformer_v1_gene_name_id_dict": DatasetEntry(
        fname="geneformer_v1/gene_name_id_dict.pkl",
        sha256="55e67962e79c0039a6c32d43c5c99f38e51964bbcfa32f736150ee1e285c438c",
        url=f"{_GENEFORMER_V1_URL}/gene_name_id_dict_gc30M.pkl",
        license="Apache-2.0",
        source="Geneformer V1 gene symbol -> Ensembl ID map (ctheodoris/Geneformer)",
    ),
}

#: Keys of :func:`geneformer_v1_dictionaries` and the registry entries they come from.
_GENEFORMER_V1_FILES = {
    "token_dictionary": "geneformer_v1_token_dictionary",
    "gene_median_dictionary": "geneformer_v1_gene_median_dictionary",
    "gene_name_id_dict": "geneformer_v1_gene_name_id_dict",
}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _local_copy(entry: DatasetEntry) -> tuple[Path | None, list[Path]]:
    """Return the first local copy of ``entry`` with the pinned sha256 and the copies without it."""
    folders = [f for f in (settings.data_dir, settings.cache_dir / "data") if f is not None]
    corrupt = []
    for folder in folders:
        path = Path(folder) / entry.fname
        if path.is_file():
            if _sha256(path) == entry.sha256:
                return path, corrupt
            logger.warning("Ignoring %s: its sha256 does not match the registry.", path)
            corrupt.append(path)
    return None, corrupt


def fetch_file(name: str) -> Path:
    """Return a local path to registry dataset ``name``, checking its sha256.

    Parameters
    ----------
    name
        A key of :data:`DATASETS`.

    Returns
    -------
    Path to a verified local copy.

    """
    if name not in DATASETS:
        raise KeyError(f"Unknown dataset {name!r}; known datasets: {sorted(DATASETS)}.")
    entry = DATASETS[name]
    local, corrupt = _local_copy(entry)
    if local is not None:
        return local
    if entry.url is None:
        if corrupt:
            raise ValueError(
                f"Dataset {name!r}: the file {corrupt[0]} is there but its sha256 does not match "
                f"the registry ({entry.sha256}); it is damaged or another version. Replace it "
                "with the published file."
            )
        raise FileNotFoundError(
            f"Dataset {name!r} ({entry.fname}) has no public download URL. Put the file in a folder "
            "and point the CELLFORMERS_DATA environment variable (or cellformers.settings.data_dir) at it."
        )
    return download(entry.url, entry.sha256, settings.cache_dir / "data" / entry.fname)


def download(
    url: str | None,
    sha256: str,
    path: str | os.PathLike,
    *,
    progressbar: bool = False,
    missing: str | None = None,
) -> Path:
    """Return ``path`` once it holds the file with hash ``sha256``, downloading it if needed.

    A file already at ``path`` with the right hash is used as it is (no network access).
    Otherwise the file is downloaded from ``url`` with pooch into a temporary file that is
    moved to ``path`` only when its sha256 matches; on a mismatch pooch raises and no partial
    file is left behind.

    Parameters
    ----------
    url
        Where to download the file from; `None` when there is no public link.
    sha256
        The pinned sha256 (hexadecimal).
    path
        Where the file is kept (parent folders are created).
    progressbar
        Show a download progress bar.
    missing
        Message of the :class:`FileNotFoundError` raised when the file is absent and ``url``
        is `None`.

    Returns
    -------
    ``path``.

    """
    path = Path(path)
    if path.is_file():
        if _sha256(path) == sha256:
            return path
        logger.warning("%s does not have the pinned sha256; it is replaced.", path)
    if url is None:
        raise FileNotFoundError(missing or f"{path} is missing and has no download URL.")
    import pooch

    path.parent.mkdir(parents=True, exist_ok=True)
    return Path(
        pooch.retrieve(
            url,
            known_hash=f"sha256:{sha256}",
            fname=path.name,
            path=path.parent,
            progressbar=progressbar,
        )
    )


def is_available(name: str) -> bool:
    """Whether dataset ``name`` can be loaded without a network connection.

    Only a local copy with the pinned sha256 counts (the file is read once to check it).
    """
    if name not in DATASETS:
        return False
    return _local_copy(DATASETS[name])[0] is not None


def geneformer_v1_dictionaries() -> dict[str, Path]:
    """Local paths to the three dictionaries of the Geneformer V1 models (30M-cell corpus).

    The files are the published pickles of the Geneformer repository (Apache-2.0), pinned by
    sha256; each is taken from :attr:`cellformers.settings.data_dir`, the cache, or downloaded
    from Hugging Face on first use. Read them with :func:`cellformers.genes.read_gene_dict`,
    which never executes pickled code.

    Returns
    -------
    Paths keyed ``"token_dictionary"`` (Ensembl ID -> token id, 25,426 entries with
    ``<pad>`` = 0 and ``<mask>`` = 1), ``"gene_median_dictionary"`` (Ensembl ID -> non-zero
    median of normalised expression over the pretraining corpus) and ``"gene_name_id_dict"``
    (gene symbol -> Ensembl ID).

    """
    return {key: fetch_file(name) for key, name in _GENEFORMER_V1_FILES.items()}


def cellbench_2platform() -> ad.AnnData:
    """CellBench: 450 cells of 3 lung-adenocarcinoma cell lines on two platforms.

    Raw UMI counts (CSR) for 15,073 genes; ``obs['cell_line']`` is the label, ``obs['batch']``
    the platform (CEL-seq2 / Drop-seq); ``var['ensembl_id']`` holds Ensembl IDs.
    """
    return ad.read_h5ad(fetch_file("cellbench_2platform"))


def papalexi_eccite_lowmoi() -> ad.AnnData:
    """ECCITE-seq CRISPR knockout screen, 16,192 THP-1 cells × 299 genes, raw counts."""
    return ad.read_h5ad(fetch_file("papalexi_eccite_lowmoi"))


def pbmc68k_reduced_counts() -> ad.AnnData:
    """Scanpy's bundled ``pbmc68k_reduced`` with integer counts recovered from ``.raw``.

    ``.raw.X`` is ``log1p`` of counts per 10,000, so counts are
    ``round(expm1(raw.X) * n_counts / 1e4)``. The result has the 765 genes of ``.raw``, the
    counts in ``X`` (CSR, float32) and in ``layers['counts']``, and the original ``obs``
    (``bulk_labels`` holds 10 cell types). No network access is needed.
    """
    import scipy.sparse as sp

    src = sc.datasets.pbmc68k_reduced()
    raw = src.raw.X.toarray() if sp.issparse(src.raw.X) else np.asarray(src.raw.X)
    counts = np.round(np.expm1(raw) * src.obs["n_counts"].to_numpy()[:, None] / 1e4)
    counts = sp.csr_matrix(counts.astype(np.float32))
    adata = ad.AnnData(X=counts, obs=src.obs.copy(), var=src.raw.var.copy())
    adata.layers["counts"] = adata.X.copy()
    return adata
