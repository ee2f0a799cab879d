"""scGPT tokenizer: per-cell quantile binning of expression values and gene sequences.

Everything works on whole CSR batches at once (no Python loop over cells). The binning
reproduces scGPT's ``scgpt.preprocess.binning`` / ``_digitize`` exactly: the per-cell bin
edges equal :func:`numpy.quantile` bit for bit, and with ``tie_break="random"`` and a legacy
:class:`~numpy.random.RandomState` the bins equal the official ones drawn from the same state.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import scipy.sparse as sp

from ._utils import (
    RNGLike,
    as_csr,
    check_values,
    csr_rows,
    input_dtype,
    keep_smallest_per_row,
    resolve_rng,
    row_fingerprints,
    seed_to_u64,
    splitmix64,
    uniform,
)

TieBreak = Literal["deterministic", "random"]


# ----------------------------------------------------------------------------- binning
def _sort_within_rows(data: np.ndarray, rows: np.ndarray, n_rows: int) -> np.ndarray:
    """Permutation that sorts ``data`` by value within each row, rows kept in order.

    Sort by value, then stably by row. Raw counts below 65536 (the usual case) are sorted as
    ``uint16`` keys, for which NumPy's stable sort is a radix sort; so are the row indices of
    batches of up to 65536 cells. The order of equal values does not matter downstream.
    """
    u16 = np.iinfo(np.uint16).max
    by_value = None
    if data.size and data.max() <= u16:
        key = data.astype(np.uint16)
        if np.array_equal(key, data):
            by_value = np.argsort(key, kind="stable")
    if by_value is None:
        by_value = np.argsort(data)
    row_dtype = np.uint16 if n_rows <= u16 + 1 else np.int64
    by_row = np.argsort(rows[by_value].astype(row_dtype), kind="stable")
    return by_value[by_row]


def _row_quantiles(
    s: np.ndarray,
    starts: np.ndarray,
    counts: np.ndarray,
    q: np.ndarray,
    diff_dtype: np.dtype = np.float64,
) -> np.ndarray:
    """``np.quantile(row, q)`` (method ``"linear"``) of every row at once, bit for bit.

    ``s`` holds the values sorted within rows; row ``i`` is ``s[starts[i]:starts[i]+counts[i]]``
    (``counts >= 1``). Replicates NumPy's virtual-index arithmetic (``_get_indexes``,
    ``_get_gamma``) and its ``_lerp`` including the ``t >= 0.5`` branch. ``s`` is float64;
    ``diff_dtype`` is the dtype of the user's data: NumPy subtracts the two neighbours in that
    dtype (e.g. float32) before promoting to float64, and so do we.

    Returns
    -------
    The edges, ``[n_rows, len(q)]`` float64.

    """
    n_minus_1 = (counts - 1).astype(np.float64)[:, None]
    virtual = n_minus_1 * q[None, :]
    previous = np.floor(virtual)
    above = virtual >= n_minus_1
    previous[above] = -1.0
    gamma = virtual - previous
    prev_idx = previous.astype(np.int64)
    next_idx = prev_idx + 1
    last = np.broadcast_to(counts[:, None] - 1, prev_idx.shape)
    prev_idx[above] = last[above]
    next_idx[above] = last[above]
    a = s[starts[:, None] + prev_idx]
    b = s[starts[:, None] + next_idx]
    if np.dtype(diff_dtype) == np.float64:
        diff_b_a = b - a
    else:  # the float64 values are exact copies of the input's, so this cast is exact
        diff_b_a = (b.astype(diff_dtype) - a.astype(diff_dtype)).astype(np.float64)
    edges = a + diff_b_a * gamma
    hi = gamma >= 0.5
    edges[hi] = (b - diff_b_a * (1 - gamma))[hi]
    return edges


def _segment_searchsorted(
    s: np.ndarray, lo: np.ndarray, hi: np.ndarray, v: np.ndarray, side: str
) -> np.ndarray:
    """Vectorised binary search of each ``v[k]`` in its own sorted segment ``s[lo[k]:hi[k]]``.

    Returns the insertion index (into ``s``) as :func:`numpy.searchsorted` with ``side`` would
    within the segment. Only exact comparisons are made.
    """
    lo = lo.copy()
    hi = hi.copy()
    n_iter = int(np.max(hi - lo, initial=0)).bit_length() + 1
    for _ in range(n_iter):
        active = lo < hi
        if not active.any():
            break
        mid = (lo + hi) // 2
        mid_v = s[np.where(active, mid, 0)]
        go_right = (mid_v < v) if side == "left" else (mid_v <= v)
        go_right &= active
        lo = np.where(go_right, mid + 1, lo)
        hi = np.where(active & ~go_right, mid, hi)
    return lo


def _diff_dtype(dtype: np.dtype) -> np.dtype:
    """Dtype in which np.quantile subtracts neighbours for input of ``dtype``."""
    dtype = np.dtype(dtype)
    if np.issubdtype(dtype, np.floating) and dtype.itemsize < 8:
        return dtype
    return np.dtype(np.float64)


def _bin_values(
    X: sp.csr_matrix,
    n_bins: int,
    tie_break: TieBreak,
    rng: RNGLike,
    src_dtype: np.dtype = np.float64,
) -> np.ndarray:
    """Bins (int64, >= 1) of the stored values of a canonical CSR matrix, in CSR order.

    ``X`` holds float64 copies of the user's values; ``src_dtype`` is their original dtype.
    """
    data = X.data
    nnz = data.shape[0]
    if nnz == 0:
        return np.zeros(0, dtype=np.int64)
    n_rows = X.shape[0]
    counts = np.diff(X.indptr).astype(np.int64)
    rows = csr_rows(X.indptr)
    order = _sort_within_rows(data, rows, n_rows)
    s = data[order]

    # Per-row edges: np.quantile(nz, linspace(0, 1, n_bins - 1)), duplicates kept.
    nz_rows = np.flatnonzero(counts)
    starts = X.indptr[:-1][nz_rows].astype(np.int64)
    n_nz = counts[nz_rows]
    q = np.linspace(0, 1, n_bins - 1)
    edges = _row_quantiles(s, starts, n_nz, q, _diff_dtype(src_dtype))

    # For every edge e of a row: first position in the sorted row with s >= e (left) and s > e
    # (right). A value at sorted position j then has  #edges <= s[j]  =  #{e: p_left(e) <= j}
    # and  #edges < s[j]  =  #{e: p_right(e) <= j}, i.e. np.digitize(x, edges) and
    # np.digitize(x, edges, right=True). All counts are integers: no float offsets.
    n_edges = edges.shape[1]
    e = edges.ravel()
    lo = np.repeat(starts, n_edges)
    hi = lo + np.repeat(n_nz, n_edges)
    p_left = _segment_searchsorted(s, lo, hi, e, "left")
    p_right = _segment_searchsorted(s, lo, hi, e, "right")
    edges_before = np.zeros(n_rows, dtype=np.int64)
    edges_before[nz_rows] = np.arange(len(nz_rows), dtype=np.int64) * n_edges
    row_offset = edges_before[rows]  # rows are unchanged by the within-row sort
    left = np.cumsum(np.bincount(p_left, minlength=nnz + 1))[:nnz] - row_offset
    right = np.cumsum(np.bincount(p_right, minlength=nnz + 1))[:nnz] - row_offset

    if tie_break == "random":
        # One uniform per stored value, drawn in CSR (row, column) order, as scGPT's
        # ``_digitize`` draws np.random.rand(len(nz)) row after row.
        u = uniform(rng, nnz)[order]
        digits_sorted = np.ceil(u * (right - left) + left).astype(np.int64)
    else:
        # Midpoint of the official tie range right+1 .. left (== left off the edges).
        digits_sorted = (left + right + 1) // 2
    digits = np.empty(nnz, dtype=np.int64)
    digits[order] = digits_sorted
    return digits


def _check_tie_break(tie_break: str) -> None:
    if tie_break not in ("deterministic", "random"):
        raise ValueError(f"tie_break must be 'deterministic' or 'random', got {tie_break!r}.")


def _check_n_bins(n_bins: int) -> None:
    if isinstance(n_bins, bool) or not isinstance(n_bins, int | np.integer) or n_bins < 2:
        raise ValueError(f"n_bins must be an integer >= 2, got {n_bins!r}.")


def bin_csr(
    X,
    n_bins: int = 51,
    *,
    tie_break: TieBreak = "deterministic",
    rng: RNGLike = None,
) -> sp.csr_matrix:
    """ScGPT value binning of every cell (row) of a matrix at once.

    For each cell, the non-zero values ``nz`` get bin edges
    ``np.quantile(nz, np.linspace(0, 1, n_bins - 1))`` (duplicated edges kept) and each value
    is placed with scGPT's ``_digitize``: ``left = np.digitize(x, edges)``,
    ``right = np.digitize(x, edges, right=True)``; a value equal to one or more edges lies in
    the tie range ``right + 1 .. left``. Zeros stay zero, non-zero values get bins
    ``1 .. n_bins - 1``.

    Parameters
    ----------
    X
        Cells × genes matrix of non-negative values (CSR preferred; other SciPy sparse formats
        and dense arrays are converted). Explicitly stored zeros count as zeros.
    n_bins
        Number of bins including the zero bin (scGPT: 51).
    tie_break
        How a value in a tie range gets its bin. ``"deterministic"`` (default): the midpoint
        ``(left + right + 1) // 2`` of the range, so a cell's bins depend only on the cell.
        ``"random"``: scGPT's ``ceil(u * (right - left) + left)`` with ``u`` uniform in
        ``[0, 1)``, one draw per non-zero value in CSR (row, then column) order for the whole
        matrix in one call.
    rng
        Random source for ``tie_break="random"``: an int seed (a new
        :func:`numpy.random.default_rng`), a :class:`~numpy.random.Generator`, a legacy
        :class:`~numpy.random.RandomState`, or `None` for NumPy's global random state (what
        scGPT uses). ``rng=np.random.RandomState(s)`` gives the same bins as calling
        ``np.random.seed(s)`` and then scGPT's ``binning`` on each row in turn.

    Returns
    -------
    CSR matrix with the non-zero pattern of `X` (sorted indices, explicit zeros dropped) and
    ``float32`` bin values.

    """
    _check_n_bins(n_bins)
    _check_tie_break(tie_break)
    rng = resolve_rng(rng) if tie_break == "random" else None
    src_dtype = input_dtype(X)
    X = as_csr(X)
    digits = _bin_values(X, int(n_bins), tie_break, rng, src_dtype)
    return sp.csr_matrix(
        (digits.astype(np.float32), X.indices.copy(), X.indptr.copy()), shape=X.shape
    )


# ----------------------------------------------------------------------------- tokens
@dataclass
class ScGPTTokens:
    """A padded batch of scGPT input sequences.

    Attributes
    ----------
    genes
        ``int64`` token ids, ``[n_cells, L]``: ``<cls>`` first, then the cell's genes in column
        order, then ``<pad>``. ``L`` is the longest sequence in the batch.
    values
        ``float32`` binned values, ``[n_cells, L]``: ``cls_value`` first, then bins, then
        ``pad_value``.
    lengths
        ``int64`` number of real tokens of each cell, ``<cls>`` included.

    """

    genes: np.ndarray
    values: np.ndarray
    lengths: np.ndarray

    @property
    def padding_mask(self) -> np.ndarray:
        """Boolean ``[n_cells, L]``, `True` at padded positions."""
        return np.arange(self.genes.shape[1])[None, :] >= self.lengths[:, None]

    def __len__(self) -> int:
        return self.genes.shape[0]


def _check_gene_ids(gene_ids, n_cols: int) -> np.ndarray:
    gene_ids = np.asarray(gene_ids)
    if gene_ids.ndim != 1 or gene_ids.shape[0] != n_cols:
        raise ValueError(
            f"gene_ids must have one entry per column of X ({n_cols}), got shape "
            f"{gene_ids.shape}. Pass `match_genes(var_names, vocab).token_ids`."
        )
    if gene_ids.size and not np.issubdtype(gene_ids.dtype, np.integer):
        raise ValueError(f"gene_ids must be integers (-1 = unmatched), got {gene_ids.dtype}.")
    gene_ids = gene_ids.astype(np.int64)
    if gene_ids.size and gene_ids.min() < -1:
        raise ValueError("gene_ids must be vocabulary ids >= 0, or -1 for unmatched columns.")
    matched = gene_ids[gene_ids >= 0]
    uniq, cnt = np.unique(matched, return_counts=True)
    if (cnt > 1).any():
        raise ValueError(
            f"gene_ids maps several columns to the same token (ids {uniq[cnt > 1][:5].tolist()}). "
            "Use `match_genes`, which keeps the first column for each token and sets the others "
            "to -1."
        )
    return gene_ids


def _check_max_seq_len(max_seq_len: int) -> int:
    if isinstance(max_seq_len, bool) or not isinstance(max_seq_len, int | np.integer):
        raise ValueError(f"max_seq_len must be an integer >= 2, got {max_seq_len!r}.")
    if max_seq_len < 2:
        raise ValueError(
            f"max_seq_len must be >= 2 (the <cls> token plus at least one gene), got {max_seq_len}."
        )
    return int(max_seq_len)


def _select_columns(X: sp.csr_matrix, keep: np.ndarray) -> sp.csr_matrix:
    """Column subset of a canonical CSR matrix (order kept), without SciPy fancy indexing."""
    new_col = np.cumsum(keep) - 1
    mask = keep[X.indices]
    counts = np.bincount(csr_rows(X.indptr)[mask], minlength=X.shape[0])
    indptr = np.zeros(X.shape[0] + 1, dtype=np.int64)
    np.cumsum(counts, out=indptr[1:])
    return sp.csr_matrix(
        (X.data[mask], new_col[X.indices[mask]], indptr),
        shape=(X.shape[0], int(keep.sum())),
    )


def scgpt_sequence_lengths(
    X,
    gene_ids: np.ndarray,
    max_seq_len: int,
    include_zero_gene: bool = False,
) -> np.ndarray:
    """Count the tokens (``<cls>`` included) that :func:`tokenize_scgpt` gives each cell.

    Cheap (no binning): use it to bucket cells of similar length into batches.

    Parameters
    ----------
    X
        Cells × genes matrix (all the columns that `gene_ids` describes).
    gene_ids
        Token id of every column, ``-1`` for unmatched columns.
    max_seq_len
        Longest sequence, ``<cls>`` included.
    include_zero_gene
        Count all matched genes, not only the non-zero ones.

    Returns
    -------
    ``int64`` array with one length per cell.

    """
    max_seq_len = _check_max_seq_len(max_seq_len)
    if sp.issparse(X):
        X = sp.csr_matrix(X)
    else:
        X = sp.csr_matrix(np.asarray(X))
    gene_ids = _check_gene_ids(gene_ids, X.shape[1])
    matched = gene_ids >= 0
    if include_zero_gene:
        n = np.full(X.shape[0], int(matched.sum()), dtype=np.int64)
    else:
        if not X.has_canonical_format:
            X = X.copy()
            X.sum_duplicates()
        check_values(X.data)
        mask = matched[X.indices] & (X.data != 0)
        n = np.bincount(csr_rows(X.indptr)[mask], minlength=X.shape[0]).astype(np.int64)
    return 1 + np.minimum(n, max_seq_len - 1)


def tokenize_scgpt(
    X,
    gene_ids: np.ndarray,
    *,
    cls_id: int,
    pad_id: int,
    n_bins: int = 51,
    max_seq_len: int = 1200,
    pad_value: float = -2.0,
    cls_value: float = -2.0,
    include_zero_gene: bool = False,
    tie_break: TieBreak = "deterministic",
    truncation: Literal["hash", "random"] = "hash",
    seed: int = 0,
    rng: RNGLike = None,
) -> ScGPTTokens:
    """Turn a batch of cells into padded scGPT input sequences.

    Steps, all vectorised over the batch:

    1. drop the columns without a token (``gene_ids == -1``), as scGPT's ``embed_data``
       drops genes missing from the vocabulary, *before* binning;
    2. bin each cell's non-zero values with :func:`bin_csr` (``n_bins`` bins, zeros stay 0);
    3. keep the cell's non-zero genes (or all matched genes, zeros as bin 0, with
       `include_zero_gene`) in column order;
    4. cells with more than ``max_seq_len - 1`` genes keep a random subset of that many genes,
       still in column order;
    5. prepend ``<cls>`` (value `cls_value`) and pad to the longest cell of the batch with
       `pad_id` / `pad_value`.

    Parameters
    ----------
    X
        Cells × genes matrix of non-negative values with all the columns `gene_ids` describes
        (CSR preferred; other formats are converted).
    gene_ids
        Token id of every column (``match_genes(...).token_ids``), ``-1`` for unmatched.
    cls_id
        Id of the ``<cls>`` token.
    pad_id
        Id of the ``<pad>`` token.
    n_bins
        Number of value bins including the zero bin.
    max_seq_len
        Longest sequence, ``<cls>`` included (scGPT pretraining and ``embed_data``: 1200).
    pad_value
        Value at padded positions (scGPT: -2).
    cls_value
        Value at the ``<cls>`` position: -2 in scGPT pretraining and ``embed_data``, 0 in the
        fine-tuning tutorials (``tokenize_and_pad_batch``).
    include_zero_gene
        Use all matched genes, zeros included (scGPT's integration recipe).
    tie_break
        Binning of values equal to bin edges, see :func:`bin_csr`.
    truncation
        How cells longer than ``max_seq_len - 1`` genes are subsampled. ``"hash"`` (default):
        each (cell, gene) pair gets a 64-bit key from a SplitMix64 hash of `seed`, a
        fingerprint of the cell's own content (its matched genes and raw values) and the gene
        token; the genes with the smallest keys are kept. The subset depends only on the cell,
        so it is the same whatever else is in the batch and in whatever order. ``"random"``:
        keys drawn from `rng`, so the subset changes with every call and batch (as in scGPT).
    seed
        Seed of the hash truncation.
    rng
        Random source for ``tie_break="random"`` and ``truncation="random"`` (both draw from
        it, tie-breaking first): int seed, :class:`~numpy.random.Generator`,
        :class:`~numpy.random.RandomState` or `None` (NumPy's global random state).

    Returns
    -------
    Gene ids, values and lengths of the padded batch.

    """
    _check_n_bins(n_bins)
    _check_tie_break(tie_break)
    max_seq_len = _check_max_seq_len(max_seq_len)
    if truncation not in ("hash", "random"):
        raise ValueError(f"truncation must be 'hash' or 'random', got {truncation!r}.")
    needs_rng = tie_break == "random" or truncation == "random"
    rng = resolve_rng(rng) if needs_rng else None

    if np.ndim(X) != 2:
        raise ValueError(f"X must be a 2-D cells × genes matrix, got shape {np.shape(X)}.")
    gene_ids = _check_gene_ids(gene_ids, np.shape(X)[1])
    src_dtype = input_dtype(X)
    X = as_csr(X)
    matched = gene_ids >= 0
    Xm = _select_columns(X, matched)
    col_tokens = gene_ids[matched]
    n_cells, n_matched = Xm.shape
    limit = max_seq_len - 1

    bins = _bin_values(Xm, int(n_bins), tie_break, rng, src_dtype)

    if include_zero_gene:
        # Every matched gene of every cell, zeros as bin 0.
        dense_bins = np.zeros((n_cells, n_matched), dtype=np.int64)
        dense_bins[csr_rows(Xm.indptr), Xm.indices] = bins
        el_rows = np.repeat(np.arange(n_cells, dtype=np.int64), n_matched)
        el_cols = np.tile(np.arange(n_matched, dtype=np.int64), n_cells)
        el_bins = dense_bins.ravel()
        counts = np.full(n_cells, n_matched, dtype=np.int64)
    else:
        el_rows = csr_rows(Xm.indptr)
        el_cols = Xm.indices.astype(np.int64)
        el_bins = bins
        counts = np.diff(Xm.indptr).astype(np.int64)
    el_tokens = col_tokens[el_cols]

    # Truncation of cells longer than the limit: keep the `limit` smallest keys per cell.
    long_rows = counts > limit
    if long_rows.any():
        cand = np.flatnonzero(long_rows[el_rows])
        cand_rows = el_rows[cand]
        if truncation == "random":
            keys = (uniform(rng, len(cand)) * 2.0**64).astype(np.uint64)
        else:
            token_hash = splitmix64(col_tokens.view(np.uint64))
            fingerprints = row_fingerprints(Xm.indptr, token_hash[Xm.indices], Xm.data)
            cell_hash = splitmix64(fingerprints ^ splitmix64(seed_to_u64(seed)))
            keys = splitmix64(cell_hash[cand_rows] ^ token_hash[el_cols[cand]])
        keep = np.ones(len(el_rows), dtype=bool)
        keep[cand] = keep_smallest_per_row(cand_rows, keys, limit)
        el_rows, el_tokens, el_bins = el_rows[keep], el_tokens[keep], el_bins[keep]
        counts = np.minimum(counts, limit)

    lengths = counts + 1
    width = int(lengths.max(initial=1))
    genes = np.full((n_cells, width), pad_id, dtype=np.int64)
    values = np.full((n_cells, width), pad_value, dtype=np.float32)
    genes[:, 0] = cls_id
    values[:, 0] = cls_value
    starts = np.concatenate(([0], np.cumsum(counts)[:-1])).astype(np.int64)
    pos = np.arange(len(el_rows), dtype=np.int64) - starts[el_rows] + 1
    genes[el_rows, pos] = el_tokens
    values[el_rows, pos] = el_bins.astype(np.float32)
    return ScGPTTokens(genes=genes, values=values, lengths=lengths.astype(np.int64))
