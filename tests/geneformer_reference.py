"""Reference Geneformer tokenization: a plain per-cell transcription of the official algorithm.

Written from the description of the official ``TranscriptomeTokenizer`` (h5ad path; see
``../shared/specs/geneformer_scfoundation.md`` §1.4), independently of
:mod:`cellformers.tokenize`: it is the oracle of the tokenizer tests and the baseline of
``benchmarks/tokenize_geneformer.py``. Steps, as in the official code:

1. map upper-cased Ensembl IDs through the gene mapping dictionary (identity over the token
   dictionary when none is given), keeping only entries whose value is a token;
2. if the mapped IDs are not all distinct, drop unmapped columns and rebuild the matrix as
   [columns with a unique ID, in column order] + [the summed columns of each duplicated ID,
   in order of first appearance]; otherwise keep the columns as they are;
3. keep the columns whose ID is a token, with their medians and token ids;
4. per chunk of cells, ``X / n_counts[:, None] * 10_000 / medians`` on the CSR chunk (the
   installed SciPy's arithmetic, as in the official code), converted to CSR;
5. per cell, ``np.argsort(-values)`` (NumPy's default sort) of the row's stored values;
6. truncate to ``model_input_size`` (V1) or add ``<cls>``/``<eos>`` around the first
   ``model_input_size - 2`` tokens (V2).

One deliberate difference: cells without any vocabulary gene are returned as empty sequences
(or ``[<cls>, <eos>]``) instead of being dropped, so the output stays aligned with the cells.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp


def collapse_gene_ids(
    X: sp.csr_matrix,
    ensembl_ids: Sequence[str],
    gene_mapping: Mapping[str, str],
) -> tuple[sp.csr_matrix, np.ndarray]:
    """Official step 2: map the IDs and sum the columns of duplicated IDs.

    Returns the (possibly rebuilt) matrix and the mapped ID of each of its columns (``None``
    where unmapped).
    """
    ids = pd.Series(list(ensembl_ids), dtype=object)
    in_map = [g for g in ids if g in gene_mapping]
    mapped = ids.str.upper().map(gene_mapping)
    if len(set(in_map)) == len({gene_mapping[g] for g in in_map}):
        return X, mapped.to_numpy(dtype=object)
    keep = np.flatnonzero(mapped.notna().to_numpy())
    X = sp.csr_matrix(X)[:, keep]
    names = mapped.iloc[keep].to_numpy(dtype=object)
    duplicated = [g for g, n in Counter(names).items() if n > 1]
    unique_cols = np.flatnonzero(~pd.Series(names).isin(duplicated).to_numpy())
    summed = pd.concat(
        [
            pd.DataFrame.sparse.from_spmatrix(X[:, np.flatnonzero(names == g)]).sum(axis=1)
            for g in duplicated
        ],
        axis=1,
    )
    X_out = sp.hstack([X[:, unique_cols], sp.csr_matrix(summed.to_numpy())], format="csr")
    return X_out, np.concatenate([names[unique_cols], np.asarray(duplicated, dtype=object)])


def normalised_chunks(
    X,
    ensembl_ids: Sequence[str],
    n_counts: np.ndarray,
    token_dict: Mapping[str, int],
    median_dict: Mapping[str, float],
    gene_mapping: Mapping[str, str] | None = None,
    chunk_size: int = 512,
):
    """Official steps 1-4: yield each chunk's normalised CSR matrix and its column tokens."""
    if gene_mapping is None:
        gene_mapping = {g: g for g in token_dict}
    gene_mapping = {k: v for k, v in gene_mapping.items() if v in token_dict}
    X, names = collapse_gene_ids(sp.csr_matrix(X), ensembl_ids, gene_mapping)
    loc = np.flatnonzero([isinstance(name, str) and name in token_dict for name in names])
    norm_factor = np.array([median_dict[name] for name in names[loc]], dtype=np.float64)
    tokens = np.array([token_dict[name] for name in names[loc]], dtype=np.int64)
    n_counts = np.asarray(n_counts, dtype=np.float64)
    for start in range(0, X.shape[0], chunk_size):
        chunk = X[start : start + chunk_size][:, loc]
        X_norm = chunk / n_counts[start : start + chunk_size, None] * 10_000 / norm_factor
        yield sp.csr_matrix(X_norm), tokens


def tokenize_reference(
    X,
    ensembl_ids: Sequence[str],
    n_counts: np.ndarray,
    token_dict: Mapping[str, int],
    median_dict: Mapping[str, float],
    *,
    gene_mapping: Mapping[str, str] | None = None,
    model_input_size: int = 2048,
    special_token: bool = False,
    chunk_size: int = 512,
) -> list[np.ndarray]:
    """Tokenize cells one by one as the official ``TranscriptomeTokenizer`` does.

    Parameters
    ----------
    X
        Cells × genes raw counts.
    ensembl_ids
        Ensembl ID of every column.
    n_counts
        Total counts of every cell over all genes.
    token_dict
        Ensembl ID (and special token) -> token id.
    median_dict
        Ensembl ID -> gene non-zero median.
    gene_mapping
        Ensembl ID -> canonical Ensembl ID; default: identity over the token dictionary.
    model_input_size
        Longest sequence, special tokens included.
    special_token
        Add ``<cls>`` and ``<eos>`` (V2).
    chunk_size
        Cells normalised together.

    Returns
    -------
    One ``int64`` array of token ids per cell.

    """
    ranked = []
    for X_norm, tokens in normalised_chunks(
        X, ensembl_ids, n_counts, token_dict, median_dict, gene_mapping, chunk_size
    ):
        for i in range(X_norm.shape[0]):
            # as the official code: the row is taken once for its values, once for its columns
            values, columns = X_norm[i].data, X_norm[i].indices
            ranked.append(tokens[columns][np.argsort(-values)])

    if special_token:
        cls, eos = token_dict["<cls>"], token_dict["<eos>"]
        return [
            np.concatenate([[cls], ids[: model_input_size - 2], [eos]]).astype(np.int64)
            for ids in ranked
        ]
    return [ids[:model_input_size].astype(np.int64) for ids in ranked]
