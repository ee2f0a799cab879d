"""scBERT tokenizer: expression on a fixed gene panel, log-normalised and cut into integer bins.

One cell becomes ``n_genes + 1`` tokens: the binned expression of every panel gene, in panel
order, and one extra trailing ``0``. This reproduces the official pipeline
(TencentAILabHealthcare/scBERT ``preprocess.py`` followed by the per-cell tokenisation in
``finetune.py`` / ``predict.py``) on whole CSR batches at once:

1. the data's columns are placed at their panel positions; panel genes absent from the data
   stay 0 and data genes outside the panel are dropped. When several columns map to the same
   panel gene, the **first** one is used and the others are ignored, as the official
   ``var_names.tolist().index(gene)`` lookup does;
2. each cell is scaled to 10,000 total counts **over the panel genes** (``preprocess.py`` runs
   ``sc.pp.normalize_total(target_sum=1e4)`` on the panel matrix) and transformed with
   ``log2(1 + x)`` (``sc.pp.log1p(base=2)``), in float32 with scanpy's arithmetic;
3. values above ``n_bins`` become ``n_bins`` and the rest are truncated to integers
   (``x[x > 5] = 5; x.long()``), so expressed genes below 1 CP10k get token 0 like unexpressed
   ones;
4. a trailing token ``0`` is appended.

The official ``sc.pp.filter_cells(min_genes=200)`` is not applied here: no cell is dropped.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from ._utils import check_values, csr_rows

_TARGET_SUM = 1e4


def panel_columns(gene_ids: np.ndarray, n_genes: int) -> np.ndarray:
    """Panel position of every data column, ``-1`` for columns that are not used.

    Columns outside ``[0, n_genes)`` are rejected; of several columns with the same panel
    position only the first is kept (the official preprocessing copies the first match).

    Parameters
    ----------
    gene_ids
        Panel position of every column (``-1``: not in the panel).
    n_genes
        Size of the gene panel.

    Returns
    -------
    Int64 array of the same length as ``gene_ids``.

    """
    ids = np.asarray(gene_ids)
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
        raise TypeError("gene_ids must be a 1-d integer array (panel position or -1 per column).")
    ids = ids.astype(np.int64)
    if ids.size and (ids.min() < -1 or ids.max() >= n_genes):
        raise ValueError(
            f"gene_ids must be in [-1, {n_genes}) (a panel position or -1); got values in "
            f"[{int(ids.min())}, {int(ids.max())}]."
        )
    out = np.full(ids.shape, -1, dtype=np.int64)
    found = np.flatnonzero(ids >= 0)
    _, first = np.unique(ids[found], return_index=True)
    out[found[first]] = ids[found[first]]
    return out


def tokenize_scbert(
    X,
    gene_ids: np.ndarray,
    *,
    n_genes: int,
    n_bins: int = 5,
    normalize: bool = True,
    target_sum: float = _TARGET_SUM,
) -> np.ndarray:
    """Tokenize cells for scBERT: panel placement, log2(1 + CP10k) and integer bins.

    Parameters
    ----------
    X
        Cells x genes, sparse or dense, non-negative and finite: raw counts with
        ``normalize=True``, or values already normalised the official way
        (``log2(1 + CP10k)`` over the panel) with ``normalize=False``.
    gene_ids
        Panel position of each column of ``X`` (``-1``: not in the panel). Of several columns
        with the same position the first is used.
    n_genes
        Size of the gene panel (16,906 for the published model).
    n_bins
        Highest expression token (official ``bin_num`` = 5, i.e. ``num_tokens - 2``).
    normalize
        Scale each cell to ``target_sum`` over the panel genes and apply ``log2(1 + x)``
        before binning, as ``preprocess.py`` does.
    target_sum
        Total of each normalised cell.

    Returns
    -------
    Int64 array ``[n_cells, n_genes + 1]`` with tokens in ``0 .. n_bins``; the last column is
    the extra token 0.

    """
    n_genes = int(n_genes)
    if n_genes < 1:
        raise ValueError(f"n_genes must be >= 1, got {n_genes}.")
    if int(n_bins) < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}.")
    if not target_sum > 0:
        raise ValueError(f"target_sum must be > 0, got {target_sum}.")
    X = X.tocsr() if sp.issparse(X) else sp.csr_matrix(np.asarray(X))
    if X.ndim != 2:
        raise ValueError(f"X must be a 2-d cells x genes matrix, got shape {X.shape}.")
    if len(gene_ids) != X.shape[1]:
        raise ValueError(
            f"gene_ids has {len(gene_ids)} entries but X has {X.shape[1]} columns; give one panel "
            "position (or -1) per column."
        )
    cols = panel_columns(gene_ids, n_genes)
    n_cells = X.shape[0]
    out = np.zeros((n_cells, n_genes + 1), dtype=np.int64)
    if X.nnz == 0:
        return out
    check_values(X.data, name="X")
    if not X.has_canonical_format:
        X = X.copy()
        X.sum_duplicates()
    rows = csr_rows(X.indptr)
    pos = cols[X.indices]
    keep = pos >= 0
    rows, pos = rows[keep], pos[keep]
    values = X.data[keep]
    if normalize:
        # the official panel matrix is float32 (a float32 lil_matrix filled with the data)
        values = values.astype(np.float32)
        # scanpy's normalize_total: totals accumulated in float64, stored in float32, divided
        # by target_sum in float32; a cell without counts keeps its zeros (factor 1)
        totals = np.bincount(rows, weights=values, minlength=n_cells).astype(np.float32)
        factor = totals / np.float32(target_sum)
        factor[factor == 0] = 1
        values = values / factor[rows]
        # scanpy's log1p(base=2): float32 log1p, then division by the float64 log(2)
        values = np.log1p(values)
        np.divide(values, np.log(2), out=values)
    values = np.minimum(values, n_bins).astype(np.int64)  # truncation toward 0, as .long()
    out[rows, pos] = values
    return out


def scbert_sequence_lengths(X, *, n_genes: int) -> np.ndarray:
    """Tokens per cell of :func:`tokenize_scbert`: always ``n_genes + 1``.

    Parameters
    ----------
    X
        Cells x genes.
    n_genes
        Size of the gene panel.

    Returns
    -------
    Int64 array ``[n_cells]``.

    """
    return np.full(X.shape[0], int(n_genes) + 1, dtype=np.int64)
