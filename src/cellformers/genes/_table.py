"""Offline human gene symbol <-> Ensembl ID table (GENCODE v44), loaded lazily."""

from __future__ import annotations

import gzip
import io
from collections.abc import Iterable
from functools import cache
from importlib.resources import files

import numpy as np
import pandas as pd

_TABLE_FILE = "gencode_v44_human.tsv.gz"

#: Ensembl gene ID, optionally with a ``.version`` suffix (and GENCODE's ``_PAR_Y`` tag).
ENSEMBL_PATTERN = r"^ENS[A-Z]*G\d{11}(?:\.\d+)?(?:_PAR_Y)?$"
_VERSION_PATTERN = r"\.\d+(?:_PAR_Y)?$"


@cache
def _load_table() -> pd.DataFrame:
    data = files("cellformers.genes").joinpath("data", _TABLE_FILE).read_bytes()
    with gzip.open(io.BytesIO(data), "rt", encoding="utf-8") as f:
        return pd.read_csv(f, sep="\t", dtype=str, keep_default_na=False)


@cache
def _id_to_symbol() -> pd.Series:
    table = _load_table()
    return pd.Series(table["symbol"].to_numpy(), index=pd.Index(table["ensembl_id"]))


@cache
def _symbol_to_id() -> pd.Series:
    # Ambiguous symbols (e.g. ``5S_rRNA``, ``Y_RNA``, some paralogues on alternative loci):
    # the lowest Ensembl ID wins. IDs have a fixed width, so string order is numeric order.
    table = _load_table().sort_values(["symbol", "ensembl_id"], kind="stable")
    table = table.drop_duplicates("symbol", keep="first")
    return pd.Series(table["ensembl_id"].to_numpy(), index=pd.Index(table["symbol"]))


def gene_table() -> pd.DataFrame:
    """Return the shipped human gene table (GENCODE v44).

    Returns
    -------
    Data frame with columns ``ensembl_id`` (unversioned, unique) and ``symbol`` (the GENCODE
    gene name). Genes whose GENCODE name is their own ID are not listed.

    """
    return _load_table().copy()


def _as_object_array(values: Iterable[str]) -> np.ndarray:
    if isinstance(values, str):
        raise TypeError("Pass a sequence of names, not a single string (wrap it in a list).")
    if not hasattr(values, "__len__"):
        values = list(values)
    return np.asarray(values, dtype=object).ravel()


def strip_ensembl_version(ids: Iterable[str]) -> np.ndarray:
    """Remove version suffixes from Ensembl IDs (``ENSG00000141510.17`` -> ``ENSG00000141510``).

    Parameters
    ----------
    ids
        Ensembl gene IDs, with or without versions. Other strings are returned unchanged.

    Returns
    -------
    Object array of unversioned IDs.

    """
    arr = pd.Series(_as_object_array(ids), dtype=object)
    is_ens = arr.str.match(ENSEMBL_PATTERN, na=False).to_numpy(dtype=bool)
    out = arr.to_numpy(dtype=object, copy=True)
    if is_ens.any():
        out[is_ens] = arr[is_ens].str.replace(_VERSION_PATTERN, "", regex=True).to_numpy()
    return out


def _map(values: np.ndarray, mapping: pd.Series) -> np.ndarray:
    pos = mapping.index.get_indexer(pd.Index(values, dtype=object))
    out = np.full(len(values), None, dtype=object)
    hit = pos >= 0
    out[hit] = mapping.to_numpy()[pos[hit]]
    return out


def symbol_to_ensembl(symbols: Iterable[str]) -> np.ndarray:
    """Human Ensembl gene IDs of gene symbols, from the shipped GENCODE v44 table.

    Matching is exact and case-sensitive. A symbol that names several genes in GENCODE
    (343 symbols, e.g. ``5S_rRNA`` or ``Y_RNA``) maps to its lowest Ensembl ID.

    Parameters
    ----------
    symbols
        Gene symbols.

    Returns
    -------
    Object array of unversioned Ensembl IDs, `None` where the symbol is unknown.

    """
    return _map(_as_object_array(symbols), _symbol_to_id())


def ensembl_to_symbol(ids: Iterable[str]) -> np.ndarray:
    """Human gene symbols of Ensembl gene IDs, from the shipped GENCODE v44 table.

    Version suffixes (``ENSG00000141510.17``) are ignored.

    Parameters
    ----------
    ids
        Ensembl gene IDs.

    Returns
    -------
    Object array of symbols, `None` where the ID is unknown (retired, non-human, or a gene
    without a name in GENCODE v44).

    """
    return _map(strip_ensembl_version(ids), _id_to_symbol())
