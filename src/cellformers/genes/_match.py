"""Match a dataset's gene names (symbols or Ensembl IDs) to a model vocabulary."""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import pandas as pd

from ._orthologs import guess_species, map_orthologs
from ._table import ENSEMBL_PATTERN, ensembl_to_symbol, strip_ensembl_version, symbol_to_ensembl
from ._vocab import GeneVocab

logger = logging.getLogger(__name__)

_SPECIAL_PATTERN = r"^<.*>$"


@dataclass
class GeneMatch:
    """Result of :func:`match_genes`: one vocabulary id per input gene and a coverage report.

    Attributes
    ----------
    token_ids
        ``int64`` vocabulary id of every input gene, in input order; ``-1`` where the gene is
        not in the vocabulary or (unless matched with ``keep_duplicates=True``) repeats a token
        already taken by an earlier gene.
    n_genes
        Number of input genes.
    n_matched
        Number of input genes with a token id (``token_ids >= 0``).
    fraction
        ``n_matched / n_genes``.
    unmatched
        Names of the input genes not found in the vocabulary, in input order.
    duplicated
        Names of input genes that map to a token already taken by an earlier gene (they get
        ``-1`` and the first gene keeps the token, or with ``keep_duplicates=True`` they keep
        the shared token).
    n_converted
        Number of matched genes found only after converting between symbols and Ensembl IDs
        through the shipped GENCODE table.
    vocab_id_type
        What the vocabulary's tokens are: ``"symbol"`` or ``"ensembl"``.
    species
        The species the genes were mapped from to their human orthologs (``"human"``: no
        mapping; ``"ortholog table"`` for a user's table).
    n_orthologs
        Number of input genes with a human 1:1 ortholog (with ``species`` other than human).

    """

    token_ids: np.ndarray
    n_genes: int
    n_matched: int
    fraction: float
    unmatched: list[str] = field(default_factory=list)
    duplicated: list[str] = field(default_factory=list)
    n_converted: int = 0
    vocab_id_type: str = "symbol"
    species: str = "human"
    n_orthologs: int = 0

    @property
    def matched(self) -> np.ndarray:
        """Boolean mask of the input genes that have a token id."""
        return self.token_ids >= 0

    def summary(self) -> str:
        """One-line coverage report."""
        line = (
            f"Matched {self.n_matched:,} of {self.n_genes:,} genes ({self.fraction:.1%}) to a "
            f"vocabulary of gene {'Ensembl IDs' if self.vocab_id_type == 'ensembl' else 'symbols'}"
        )
        if self.species != "human":
            line += (
                f" after mapping {self.n_orthologs:,} {self.species} genes to human 1:1 orthologs"
            )
        if self.n_converted:
            line += f" ({self.n_converted:,} through the GENCODE v44 symbol/Ensembl table)"
        line += f"; {len(self.unmatched):,} unmatched"
        if self.unmatched:
            line += f" (e.g. {', '.join(self.unmatched[:5])})"
        line += f"; {len(self.duplicated):,} duplicated"
        if self.duplicated:
            line += f" (e.g. {', '.join(self.duplicated[:5])})"
        return line + "."

    def __repr__(self) -> str:
        return f"GeneMatch({self.summary()})"


def _is_ensembl(names: pd.Series) -> np.ndarray:
    return names.str.match(ENSEMBL_PATTERN, na=False).to_numpy(dtype=bool)


def _gene_token_index(vocab: GeneVocab) -> tuple[pd.Index, np.ndarray, str]:
    """Index of the vocabulary's gene tokens (specials excluded, Ensembl versions stripped)."""
    tokens = pd.Series(vocab.tokens, dtype=object)
    ids = np.arange(len(tokens), dtype=np.int64)
    keep = ~tokens.str.match(_SPECIAL_PATTERN).to_numpy(dtype=bool)
    tokens, ids = tokens[keep], ids[keep]
    ens = _is_ensembl(tokens)
    vocab_type = "ensembl" if len(tokens) and ens.mean() > 0.5 else "symbol"
    keys = tokens.to_numpy(dtype=object, copy=True)
    if ens.any():
        keys[ens] = strip_ensembl_version(keys[ens])
    first = ~pd.Index(keys).duplicated(keep="first")
    return pd.Index(keys[first], dtype=object), ids[first], vocab_type


def _species_hint(names: np.ndarray, species: str) -> str:
    """Return a sentence on mapping orthologs when ``names`` look like another species' genes."""
    guess = guess_species(names)
    if species != "human" or guess in (None, "human"):
        return ""
    example = "`species='mouse'`" if guess == "mouse" else "`species=<ortholog table>`"
    return (
        f"The genes look like {guess} genes (species: {guess}), while the vocabulary holds "
        "human genes: "
        f"map them to their human 1:1 orthologs with {example} (e.g. "
        "`adata.var['human_symbol'] = cf.genes.map_orthologs(adata.var_names, species='mouse')`"
        " and `gene_key='human_symbol'`; mouse needs `pip install 'cellformers[species]'`; "
        "for other species pass a table of orthologs), or build the model from scratch on "
        "the data's own genes. "
    )


def match_genes(
    genes: Sequence[str] | pd.Index | np.ndarray,
    vocab: GeneVocab,
    *,
    min_coverage: float = 0.5,
    id_type: Literal["auto", "symbol", "ensembl"] = "auto",
    keep_duplicates: bool = False,
    species: str | pd.DataFrame | os.PathLike = "human",
) -> GeneMatch:
    """Map gene names to vocabulary ids, converting between symbols and Ensembl IDs if needed.

    Each name is first looked up as it is (Ensembl version suffixes such as ``.17`` are
    ignored). Names still unmatched are converted through the shipped human GENCODE v44 table
    when they are of the other kind than the vocabulary's tokens (Ensembl IDs against a
    vocabulary of symbols, or symbols against a vocabulary of Ensembl IDs). When several genes
    map to the same token, the first keeps it and the others get ``-1`` (with a warning), unless
    `keep_duplicates` is set.

    Parameters
    ----------
    genes
        Gene names, one per column of the data (e.g. ``adata.var_names`` or a ``var`` column).
    vocab
        The model vocabulary.
    min_coverage
        Smallest acceptable fraction of input genes with a token; below it a
        :class:`ValueError` is raised.
    id_type
        What the names are: ``"symbol"``, ``"ensembl"``, or ``"auto"`` to decide per name
        (names like ``ENSG00000141510`` or ``ENSMUSG...`` are Ensembl IDs).
    keep_duplicates
        Let every gene that maps to an already-taken token keep that token id, so several
        columns share it (they are still listed in ``duplicated``). Geneformer's tokenizer
        sums the counts of such columns, as the official code collapses duplicate Ensembl IDs.
    species
        ``"human"`` matches the names as they are. ``"mouse"``, or an ortholog table (a
        DataFrame or CSV/TSV path: the data's gene names, then their human orthologs), first
        maps every gene to its human 1:1 ortholog (:func:`~cellformers.genes.map_orthologs`);
        genes without one are unmatched. The report counts the mapped genes.

    Returns
    -------
    The token id of every input gene (``-1`` for unmatched) and a coverage report.

    """
    if id_type not in ("auto", "symbol", "ensembl"):
        raise ValueError(f"id_type must be 'auto', 'symbol' or 'ensembl', got {id_type!r}.")
    if not 0.0 <= min_coverage <= 1.0:
        raise ValueError(f"min_coverage must be between 0 and 1, got {min_coverage}.")
    if isinstance(genes, str):
        raise TypeError("`genes` must be a sequence of gene names, not a single string.")
    raw = pd.Series(np.asarray(genes, dtype=object).ravel(), dtype=object)
    n_genes = len(raw)
    if n_genes == 0:
        raise ValueError("No genes given: the data has no columns to match to the vocabulary.")
    display = raw.astype(str).to_numpy(dtype=object)
    species_name, n_orthologs = "human", 0
    if not (isinstance(species, str) and species.lower() == "human"):
        raw = pd.Series(map_orthologs(raw.to_numpy(), species=species), dtype=object)
        species_name = species.lower() if isinstance(species, str) else "ortholog table"
        species_name = "ortholog table" if species_name not in ("mouse",) else species_name
        n_orthologs = int(raw.notna().sum())
    is_str = raw.map(type).eq(str).to_numpy()
    names = raw.where(is_str, "").astype(str)

    if id_type == "auto":
        is_ens = _is_ensembl(names)
    else:
        is_ens = np.full(n_genes, id_type == "ensembl")
    keys = names.to_numpy(dtype=object, copy=True)
    if is_ens.any():
        keys[is_ens] = strip_ensembl_version(keys[is_ens])

    index, index_ids, vocab_type = _gene_token_index(vocab)

    def _lookup(values: np.ndarray) -> np.ndarray:
        pos = index.get_indexer(pd.Index(values, dtype=object))
        return np.where(pos >= 0, index_ids[np.maximum(pos, 0)], -1).astype(np.int64)

    token_ids = _lookup(keys)
    token_ids[~is_str | (names.to_numpy() == "")] = -1

    # Convert names of the other kind than the vocabulary through the GENCODE table.
    other = (is_ens if vocab_type == "symbol" else ~is_ens) & is_str & (token_ids < 0)
    n_converted = 0
    if other.any():
        converted = (ensembl_to_symbol if vocab_type == "symbol" else symbol_to_ensembl)(
            keys[other]
        )
        ok = ~pd.isna(converted)
        conv_ids = np.full(len(converted), -1, dtype=np.int64)
        if ok.any():
            conv_ids[ok] = _lookup(converted[ok])
        token_ids[other] = conv_ids
        n_converted = int((conv_ids >= 0).sum())

    found = token_ids >= 0
    dup = np.zeros(n_genes, dtype=bool)
    dup[found] = pd.Index(token_ids[found]).duplicated(keep="first")
    duplicated = display[dup].tolist()
    if duplicated and keep_duplicates:
        logger.info(
            "%d gene(s) share a vocabulary token with an earlier gene (e.g. %s); they keep it.",
            len(duplicated),
            ", ".join(duplicated[:5]),
        )
    elif duplicated:
        warnings.warn(
            f"{len(duplicated)} gene(s) map to a vocabulary token already taken by an earlier "
            f"gene and are ignored (e.g. {', '.join(duplicated[:5])}). The first gene with each "
            "token is kept.",
            UserWarning,
            stacklevel=2,
        )
        token_ids[dup] = -1
        n_converted -= int((dup & other).sum())

    unmatched = display[~found].tolist()
    n_matched = int((token_ids >= 0).sum())
    result = GeneMatch(
        token_ids=token_ids,
        n_genes=n_genes,
        n_matched=n_matched,
        fraction=n_matched / n_genes,
        unmatched=unmatched,
        duplicated=duplicated,
        n_converted=n_converted,
        vocab_id_type=vocab_type,
        species=species_name,
        n_orthologs=n_orthologs,
    )
    if result.fraction < min_coverage:
        n_ens = int(is_ens.sum())
        kind = (
            "Ensembl IDs"
            if n_ens > n_genes / 2
            else "gene symbols"
            if n_ens == 0
            else f"mostly gene symbols ({n_ens:,} Ensembl IDs)"
        )
        raise ValueError(
            f"Only {n_matched:,} of {n_genes:,} genes ({result.fraction:.1%}) match the "
            f"vocabulary, below min_coverage={min_coverage:g}. The vocabulary holds gene "
            f"{'Ensembl IDs' if vocab_type == 'ensembl' else 'symbols'}; your names look like "
            f"{kind}. First unmatched: {', '.join(unmatched[:10])}. "
            f"{_species_hint(display, species_name)}Pass `gene_key=` naming a "
            "`var` column that holds gene symbols or Ensembl IDs (human symbols and IDs are "
            "converted automatically), or lower `min_coverage` to accept the low coverage."
        )
    logger.info(result.summary())
    return result
