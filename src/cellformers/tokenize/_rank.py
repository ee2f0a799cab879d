"""Geneformer tokenizer: rank-value encoding of each cell's genes (vectorised on CSR batches).

Geneformer orders a cell's detected genes by ``count / n_counts * 10_000 / median``, where
``median`` is the gene's non-zero median over the pretraining corpus, and feeds the ranked gene
tokens (highest first) to a BERT encoder. :func:`tokenize_geneformer` does this for a whole CSR
batch at once: columns that share a token are summed (the official collapse of duplicate
Ensembl IDs), values are computed in float64 exactly as the official ``TranscriptomeTokenizer``
computes them, and the top genes of every cell are selected and sorted along padded rows of
integer keys that encode each value's bits and token.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise
from typing import Literal, NamedTuple

import numpy as np
import scipy.sparse as sp

from ._utils import check_values, csr_rows

TieBreak = Literal["deterministic", "official"]

#: Scale of Geneformer's normalisation (counts per 10,000).
TARGET_SUM = 10_000.0

# Padded key matrices are sorted in row blocks of at most this many entries (8 bytes each).
_BLOCK_ELEMENTS = 1 << 16
# Element-wise passes work on chunks of whole rows of about this many elements (cache sized).
_CHUNK_ELEMENTS = 1 << 16


@dataclass(frozen=True)
class GeneformerTokens:
    """A padded batch of Geneformer input sequences.

    Attributes
    ----------
    input_ids
        ``int64`` token ids, ``[n_cells, L]``: the cell's genes by descending normalised
        expression (with ``<cls>`` first and ``<eos>`` last when special tokens are used), then
        ``pad_id``. ``L`` is the longest sequence of the batch.
    lengths
        ``int64`` number of real tokens of each cell, ``<cls>``/``<eos>`` included.
    n_genes
        ``int64`` number of the cell's detected vocabulary genes before truncation; ``0`` marks
        an empty cell (no vocabulary gene with counts), which the official tokenizer drops.

    """

    input_ids: np.ndarray
    lengths: np.ndarray
    n_genes: np.ndarray

    @property
    def attention_mask(self) -> np.ndarray:
        """``int64`` ``[n_cells, L]``: 1 at real tokens, 0 at padding (Hugging Face layout)."""
        return (~self.padding_mask).astype(np.int64)

    @property
    def padding_mask(self) -> np.ndarray:
        """Boolean ``[n_cells, L]``, `True` at padded positions."""
        return np.arange(self.input_ids.shape[1])[None, :] >= self.lengths[:, None]

    @property
    def empty(self) -> np.ndarray:
        """Boolean mask of the cells without any detected vocabulary gene."""
        return self.n_genes == 0

    def __len__(self) -> int:
        return self.input_ids.shape[0]


class _Collapsed(NamedTuple):
    """Detected vocabulary genes of a batch after summing columns that share a token.

    Elements are stored row after row (CSR); within a row they are in the official column
    order: genes whose token has a single column in input column order, then the tokens shared
    by several columns, ordered by the first column that holds each.
    """

    cols: np.ndarray  # integer compact column: rank of the token among `tokens`
    x: np.ndarray  # count: the input's dtype, or float64 where shared tokens are summed
    indptr: np.ndarray  # int64 row pointer into the element arrays
    tokens: np.ndarray  # int64 sorted distinct token ids of the columns
    n_counts: np.ndarray  # float64 per-cell total counts


# ----------------------------------------------------------------------------- checks
def _check_max_len(max_len: int, special_tokens: bool) -> int:
    low = 3 if special_tokens else 1
    if isinstance(max_len, bool) or not isinstance(max_len, int | np.integer) or max_len < low:
        what = "<cls>, <eos> and at least one gene" if special_tokens else "at least one gene"
        raise ValueError(f"max_len must be an integer >= {low} ({what}), got {max_len!r}.")
    return int(max_len)


def _check_gene_ids(gene_ids, n_cols: int, vocab_size: int | None = None) -> np.ndarray:
    gene_ids = np.asarray(gene_ids)
    if gene_ids.ndim != 1 or gene_ids.shape[0] != n_cols:
        raise ValueError(
            f"gene_ids must have one entry per column of X ({n_cols}), got shape "
            f"{gene_ids.shape}. Pass `match_genes(ensembl_ids, vocab, keep_duplicates=True)"
            ".token_ids`."
        )
    if gene_ids.size and not np.issubdtype(gene_ids.dtype, np.integer):
        raise ValueError(
            f"gene_ids must be integers (-1 = not in vocabulary), got {gene_ids.dtype}."
        )
    gene_ids = gene_ids.astype(np.int64)
    if gene_ids.size and gene_ids.min() < -1:
        raise ValueError(
            "gene_ids must be token ids >= 0, or -1 for columns outside the vocabulary."
        )
    if vocab_size is not None and gene_ids.size and gene_ids.max() >= vocab_size:
        raise ValueError(
            f"gene_ids holds token id {int(gene_ids.max())}, but `medians` has only {vocab_size} "
            "entries (one per token id)."
        )
    return gene_ids


def _check_medians(medians, tokens: np.ndarray) -> np.ndarray:
    medians = np.asarray(medians)
    if medians.ndim != 1 or not np.issubdtype(medians.dtype, np.number):
        raise ValueError(
            "medians must be a 1-D numeric array indexed by token id (NaN or 0 for special "
            f"tokens), got shape {medians.shape} and dtype {medians.dtype}."
        )
    used = medians[tokens].astype(np.float64)
    bad = ~(np.isfinite(used) & (used > 0))
    if bad.any():
        raise ValueError(
            f"{int(bad.sum())} token(s) used by gene_ids have no positive finite gene median "
            f"(token ids {tokens[bad][:5].tolist()}, medians {used[bad][:5].tolist()}). Special "
            "tokens and genes without a median cannot be columns: set their gene_ids to -1."
        )
    return medians.astype(np.float64)


def _check_tie_break(tie_break: str) -> None:
    if tie_break not in ("deterministic", "official"):
        raise ValueError(f"tie_break must be 'deterministic' or 'official', got {tie_break!r}.")


def _as_csr(X) -> sp.csr_matrix:
    """CSR view of ``X`` (a canonical copy only when needed; the input is never modified)."""
    if np.ndim(X) != 2:
        raise ValueError(f"X must be a 2-D cells × genes matrix, got shape {np.shape(X)}.")
    if sp.issparse(X):
        X = sp.csr_matrix(X)
        if not X.has_canonical_format:
            X = X.copy()
            X.sum_duplicates()
        return X
    arr = np.asarray(X)
    if not np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.complexfloating):
        raise ValueError(f"X must hold real numbers, got dtype {arr.dtype}.")
    return sp.csr_matrix(arr)


def _check_integer(x: np.ndarray) -> None:
    frac = x != np.floor(x)
    if frac.any():
        bad = x[frac][:3]
        raise ValueError(
            f"X contains {int(frac.sum())} non-integer value(s) among the vocabulary genes (e.g. "
            f"{', '.join(f'{b:g}' for b in bad)}). Geneformer ranks genes by raw counts "
            "normalised per cell: pass raw counts (e.g. `layer='counts'`), or set "
            "require_integer=False for count-like values such as ambient-corrected counts."
        )


def _segment_sums(values: np.ndarray, indptr: np.ndarray, dtype) -> np.ndarray:
    """Sum of each CSR row segment of ``values`` in ``dtype`` (0 for empty rows)."""
    n_rows = len(indptr) - 1
    out = np.zeros(n_rows, dtype=dtype)
    nonempty = indptr[1:] > indptr[:-1]
    if nonempty.any():
        out[nonempty] = np.add.reduceat(values[: indptr[-1]], indptr[:-1][nonempty], dtype=dtype)
    return out


def _row_chunks(indptr: np.ndarray) -> list[tuple[int, int]]:
    """Consecutive row ranges of about ``_CHUNK_ELEMENTS`` elements (whole rows) each."""
    n_rows = len(indptr) - 1
    cuts = np.searchsorted(indptr, np.arange(_CHUNK_ELEMENTS, indptr[-1], _CHUNK_ELEMENTS))
    bounds = np.unique(np.concatenate(([0], cuts, [n_rows]))).tolist()
    return list(pairwise(bounds))


def _check_n_counts(n_counts, n_cells: int, vocab_sums: np.ndarray) -> np.ndarray:
    n_counts = np.asarray(n_counts)
    if n_counts.ndim == 2 and 1 in n_counts.shape:
        n_counts = n_counts.reshape(-1)
    if n_counts.shape != (n_cells,):
        raise ValueError(
            f"n_counts must hold one total per cell ({n_cells}), got shape {n_counts.shape}."
        )
    if not np.issubdtype(n_counts.dtype, np.number):
        raise ValueError(f"n_counts must be numeric, got dtype {n_counts.dtype}.")
    n_counts = n_counts.astype(np.float64)
    detected = vocab_sums > 0
    bad = ~np.isfinite(n_counts) | (n_counts < 0) | (detected & (n_counts <= 0))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"n_counts must be finite and positive for cells with counts; cell {i} has "
            f"n_counts={n_counts[i]:g} ({int(bad.sum())} such cell(s))."
        )
    # The total over all genes cannot be below the counts of the vocabulary genes alone.
    low = n_counts < vocab_sums * (1 - 1e-6)
    if low.any():
        i = int(np.flatnonzero(low)[0])
        raise ValueError(
            f"n_counts is smaller than the cell's counts in the vocabulary genes for "
            f"{int(low.sum())} cell(s) (cell {i}: n_counts={n_counts[i]:g}, vocabulary genes "
            f"sum to {vocab_sums[i]:g}). n_counts must be the total raw counts of each cell "
            "over all genes (e.g. `adata.obs['n_counts']` computed on the full count matrix)."
        )
    return n_counts


# ----------------------------------------------------------------------------- collapse
def _collapse(
    X, gene_ids, n_counts, *, require_integer: bool, vocab_size: int | None = None
) -> _Collapsed:
    """Select the detected vocabulary genes of every cell and sum columns sharing a token."""
    X = _as_csr(X)
    n_cells, n_cols = X.shape
    gene_ids = _check_gene_ids(gene_ids, n_cols, vocab_size)
    indptr = X.indptr.astype(np.int64, copy=False)
    data = X.data[: indptr[-1]]
    check_values(data)

    used = gene_ids >= 0
    tokens, compact, n_cols_per_token = np.unique(
        gene_ids[used], return_inverse=True, return_counts=True
    )
    col_of = np.full(n_cols, -1, dtype=np.int32)
    col_of[used] = compact
    check_zeros = bool(data.size) and not data.all()  # stored zeros are not detected genes
    check_integer = require_integer and not np.issubdtype(data.dtype, np.integer)
    cols = np.empty(data.size, dtype=np.int32)
    x = np.empty(data.size, dtype=data.dtype)  # the input dtype: converted exactly later
    new_indptr = np.zeros(n_cells + 1, dtype=np.int64)
    vocab_sums = np.zeros(n_cells)  # counts of the vocabulary genes (checked against n_counts)
    n_kept, fractional = 0, False
    for lo, hi in _row_chunks(indptr):  # cache-sized chunks of whole rows
        start, stop = int(indptr[lo]), int(indptr[hi])
        chunk_cols, chunk_x = col_of.take(X.indices[start:stop]), data[start:stop]
        keep = chunk_cols >= 0
        if check_zeros:
            keep &= chunk_x != 0
        chunk_indptr = indptr[lo : hi + 1] - start
        if not keep.all():
            kept_before = np.zeros(stop - start + 1, dtype=np.int64)
            np.cumsum(keep, out=kept_before[1:])
            chunk_indptr = kept_before[chunk_indptr]
            kept = np.flatnonzero(keep)
            chunk_cols, chunk_x = chunk_cols.take(kept), chunk_x.take(kept)
        new_indptr[lo + 1 : hi + 1] = n_kept + chunk_indptr[1:]
        cols[n_kept : n_kept + len(chunk_x)] = chunk_cols
        x[n_kept : n_kept + len(chunk_x)] = chunk_x
        n_kept += len(chunk_x)
        if n_counts is not None:
            vocab_sums[lo:hi] = _segment_sums(chunk_x, chunk_indptr, np.float64)
        fractional = fractional or (check_integer and (chunk_x != np.floor(chunk_x)).any())
    cols, x = cols[:n_kept], x[:n_kept]
    if fractional:
        _check_integer(x)
    if n_counts is None:  # the row sums over all columns: at least the vocabulary's counts
        n_counts = _segment_sums(data, indptr, np.float64)
    n_counts = _check_n_counts(n_counts, n_cells, vocab_sums)

    shared_token = n_cols_per_token > 1
    if shared_token.any():
        cols, x, new_indptr = _sum_shared(new_indptr, cols, x, shared_token, col_of)
    return _Collapsed(cols, x, new_indptr, tokens, n_counts)


def _sum_shared(indptr, cols, x, shared_token, col_of):
    """Sum the counts of columns that share a token; put the sums after the other genes.

    The summed tokens of a cell follow its other genes, ordered by the first column that holds
    each token: the column order of the official tokenizer after collapsing duplicate IDs.
    """
    # Rank of each shared token by its first column.
    n_compact = len(shared_token)
    first_col = np.full(n_compact, np.iinfo(np.int64).max, dtype=np.int64)
    matched_cols = np.flatnonzero(col_of >= 0)
    np.minimum.at(first_col, col_of[matched_cols], matched_cols)
    shared_ids = np.flatnonzero(shared_token)
    shared_ids = shared_ids[np.argsort(first_col[shared_ids], kind="stable")]
    rank = np.full(n_compact, -1, dtype=np.int64)
    rank[shared_ids] = np.arange(len(shared_ids), dtype=np.int64)

    n_cells = len(indptr) - 1
    rows = np.repeat(np.arange(n_cells, dtype=np.int64), np.diff(indptr))
    cols = cols.astype(np.int64)
    is_shared = shared_token[cols]
    r_s, k_s, x_s = rows[is_shared], rank[cols[is_shared]], x[is_shared]
    pair, inverse = np.unique(r_s * len(shared_ids) + k_s, return_inverse=True)
    summed = np.bincount(inverse, weights=x_s, minlength=len(pair))
    s_rows = pair // len(shared_ids)
    s_cols = shared_ids[pair % len(shared_ids)]

    keep = ~is_shared
    u_rows, u_cols, u_x = rows[keep], cols[keep], x[keep]
    n_u = np.bincount(u_rows, minlength=n_cells)
    n_s = np.bincount(s_rows, minlength=n_cells)
    indptr = np.zeros(n_cells + 1, dtype=np.int64)
    np.cumsum(n_u + n_s, out=indptr[1:])
    u_start = np.concatenate(([0], np.cumsum(n_u)[:-1]))
    s_start = np.concatenate(([0], np.cumsum(n_s)[:-1]))
    u_pos = indptr[:-1][u_rows] + np.arange(len(u_rows)) - u_start[u_rows]
    s_pos = indptr[:-1][s_rows] + n_u[s_rows] + np.arange(len(s_rows)) - s_start[s_rows]
    total = int(indptr[-1])
    out_cols = np.empty(total, dtype=np.int64)
    out_x = np.empty(total, dtype=np.float64)
    out_cols[u_pos], out_x[u_pos] = u_cols, u_x
    out_cols[s_pos], out_x[s_pos] = s_cols, summed
    return out_cols, out_x, indptr


class _Scales(NamedTuple):
    """The reciprocals that Geneformer's normalisation multiplies each count by."""

    inv_n: np.ndarray  # float64 1 / n_counts of every cell (inf for n_counts == 0)
    inv_m: np.ndarray  # float64 1 / median of every compact column


def _scales(c: _Collapsed, medians: np.ndarray) -> _Scales:
    """Reciprocals of the cells' total counts and of the columns' gene medians."""
    with np.errstate(divide="ignore"):
        inv_n = np.divide(1.0, c.n_counts)
    return _Scales(inv_n, np.divide(1.0, medians[c.tokens]))


def _normalise(inv_n: np.ndarray, x: np.ndarray, inv_m: np.ndarray) -> np.ndarray:
    """Geneformer's normalised values, bit for bit as the official code; overwrites ``inv_n``.

    The official ``X / n_counts[:, None] * 10_000 / medians`` on a SciPy CSR matrix evaluates
    (SciPy >= 1.11) as multiplications by the reciprocals: ``x * (1 / n) * 10_000 * (1 / m)``,
    all in float64 (``x`` converted exactly; float64 multiplication is commutative).
    """
    inv_n *= x
    inv_n *= TARGET_SUM
    inv_n *= inv_m
    return inv_n


def _values(c: _Collapsed, scales: _Scales, lo: int = 0, hi: int | None = None) -> np.ndarray:
    """Normalised float64 value of every element of rows ``lo:hi`` (default: all rows)."""
    hi = len(c.indptr) - 1 if hi is None else hi
    start, stop = int(c.indptr[lo]), int(c.indptr[hi])
    inv_n = np.repeat(scales.inv_n[lo:hi], np.diff(c.indptr[lo : hi + 1]))
    return _normalise(inv_n, c.x[start:stop], scales.inv_m.take(c.cols[start:stop]))


# ----------------------------------------------------------------------------- ranking
class _KeyCode(NamedTuple):
    """How :func:`_rank_keys` encodes a value and a compact column in one ``int64`` key."""

    top: int  # bits of a float64 at least as large as every value
    shift: int  # number of low value bits dropped (0: keys order values exactly)
    tb: int  # number of column bits; the all-ones column is never a real one


def _key_code(c: _Collapsed, scales: _Scales) -> _KeyCode:
    """Key encoding for the batch, from bounds on its values (no pass over the values).

    Rounded multiplication of positive numbers is monotonic, so normalising the largest
    (smallest) count by the largest (smallest) reciprocals bounds every value from above
    (below). Positive float64 values sort like their bit patterns; the key counts the bits
    down from the upper bound and must leave ``tb`` bits for the column below ``2**62``.
    """
    detected = c.indptr[1:] > c.indptr[:-1]
    bound = []
    for pick in (np.max, np.min):
        value = float(pick(c.x)) * float(pick(scales.inv_n[detected]))
        bound.append(np.float64(value * TARGET_SUM * float(pick(scales.inv_m))))
    top, bottom = (int(b.view(np.int64)) for b in bound)
    tb = len(c.tokens).bit_length()
    return _KeyCode(top, max(0, (top - bottom).bit_length() - (62 - tb)), tb)


def _rank_keys(c: _Collapsed, scales: _Scales, code: _KeyCode, lo: int, hi: int) -> np.ndarray:
    """Sort keys of the elements of rows ``lo:hi``: ascending key = descending value, then token.

    One ``int64`` per element, below ``2**62`` so that the largest int64 can pad rows: the
    value's bits counted down from ``code.top`` and shifted right by ``code.shift``, above the
    element's compact column (``code.tb`` bits, ordered like the token ids).
    """
    key = _values(c, scales, lo, hi).view(np.int64)
    np.subtract(code.top, key, out=key)
    if code.shift:
        key >>= code.shift
    key <<= code.tb
    key |= c.cols[c.indptr[lo] : c.indptr[hi]]
    return key


def _preselect(key: np.ndarray, counts: np.ndarray, limit: int) -> tuple[np.ndarray, np.ndarray]:
    """Drop the keys that cannot be among the ``limit`` smallest of their row.

    A histogram of each row's keys by their top 8 bits gives the first bin where the row's
    cumulative count reaches ``limit``; the keys of later bins are dropped. Rows with at most
    ``limit`` keys keep all of them.

    Returns
    -------
    The kept keys (in their order) and the number kept of each row.

    """
    n_rows = len(counts)
    bin_of = key >> max(0, int(key.max(initial=0)).bit_length() - 8)  # the key's row-local bin
    bin_of += np.repeat(np.arange(0, 256 * n_rows, 256, dtype=np.int64), counts)  # global bin
    cum = np.cumsum(np.bincount(bin_of, minlength=256 * n_rows).reshape(n_rows, 256), axis=1)
    last = np.minimum((cum < limit).sum(axis=1), 255)  # the bin where `limit` is reached
    keep = bin_of <= np.repeat(np.arange(0, 256 * n_rows, 256) + last, counts)
    return key.take(np.flatnonzero(keep)), cum[np.arange(n_rows), last]


def _padded_layout(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Place every non-empty row in a padded matrix among rows of similar length.

    Rows are ordered by length and padded to their length rounded up to 8 to 16 steps per
    power of two (at most 1/8 of padding); the rows with the same padded width are stored one
    after another as a ``[rows, width]`` matrix in a flat buffer.

    Returns
    -------
    rows
        The non-empty rows, by increasing length.
    width
        The padded width of each of ``rows``.
    start
        ``int64`` buffer position of each row's first element (all rows; unused for empty
        ones), followed by the buffer size.

    """
    order = np.argsort(counts, kind="stable")
    rows = order[np.count_nonzero(counts == 0) :]
    length = counts[rows]
    step = np.left_shift(1, np.maximum(np.frexp(length)[1] - 4, 0))
    width = -(-length // step) * step
    start = np.zeros(len(counts) + 1, dtype=np.int64)
    ends = np.cumsum(width)
    start[rows[1:]] = ends[:-1]
    start[-1] = ends[-1] if len(ends) else 0
    return rows, width, start


def _rank_deterministic(
    c: _Collapsed, scales: _Scales, k: int, out: np.ndarray, pad_id: int
) -> None:
    """Write the top ``k`` tokens of every row into ``out``: descending value, ties by token.

    Vectorised over all rows, in chunks of rows that fit in cache: every element gets an
    integer key that encodes its value and token (:func:`_rank_keys`). In rows longer than
    ``k + 1``, the keys that cannot be among the row's ``k + 1`` smallest are dropped
    (:func:`_preselect`). The kept keys are scattered into padded matrices of rows of similar
    length (:func:`_padded_layout`), which are sorted along rows with :func:`numpy.sort` in
    blocks of at most ``_BLOCK_ELEMENTS`` entries. When the keys had to drop low value bits,
    rows where two neighbouring keys among the first ``k + 1`` share their value bits (equal
    or nearly equal values, rare) are re-ranked exactly with one :func:`numpy.lexsort`.
    """
    counts = np.diff(c.indptr)
    limit = k + 1  # one more than kept, to see ties across the cut
    if not counts.any():
        return
    code = _key_code(c, scales)
    chunks = _row_chunks(c.indptr)
    keys = (_rank_keys(c, scales, code, lo, hi) for lo, hi in chunks)
    if counts.max() > limit:  # select first: the layout needs the kept counts
        selected = [
            _preselect(key, counts[lo:hi], limit)
            for key, (lo, hi) in zip(keys, chunks, strict=True)
        ]
        keys = (key for key, _ in selected)
        counts = np.concatenate([n for _, n in selected])
    rows, width, start = _padded_layout(counts)
    first = np.zeros(len(counts) + 1, dtype=np.int64)  # each row's first kept key
    np.cumsum(counts, out=first[1:])
    buf = np.full(int(start[-1]), np.iinfo(np.int64).max, dtype=np.int64)
    for key, (lo, hi) in zip(keys, chunks, strict=True):
        dest = np.repeat(start[lo:hi] - first[lo:hi], counts[lo:hi])  # row start - first key
        dest += np.arange(first[lo], first[hi], dtype=np.int64)
        buf[dest] = key
    # Token of each compact column; the all-ones column of padding keys gives `pad_id`.
    token_of = np.full(1 << code.tb, pad_id, dtype=np.int64)
    token_of[: len(c.tokens)] = c.tokens
    low = (1 << code.tb) - 1
    # Blocks: runs of rows with the same padded width, cut to at most _BLOCK_ELEMENTS entries.
    bounds = [0, *(np.flatnonzero(width[1:] != width[:-1]) + 1).tolist(), len(rows)]
    exact_rows = []
    for run_lo, run_hi in pairwise(bounds):
        w = int(width[run_lo])
        step = max(1, _BLOCK_ELEMENTS // w)
        for lo in range(run_lo, run_hi, step):
            hi = min(run_hi, lo + step)
            b_rows = rows[lo:hi]
            s = int(start[b_rows[0]])
            block = buf[s : s + (hi - lo) * w].reshape(hi - lo, w)
            block.sort(axis=1)
            head = block[:, : min(limit, w)]
            if code.shift:  # equal value bits among the first k + 1 keys: exact or near tie
                prefix = head >> code.tb
                n_same = np.count_nonzero(prefix[:, 1:] == prefix[:, :-1], axis=1)
                pad_pairs = np.maximum(head.shape[1] - 1 - np.minimum(counts[b_rows], limit), 0)
                exact_rows.append(b_rows[n_same > pad_pairs])
            k_out = min(k, w, out.shape[1])
            out[b_rows, :k_out] = token_of.take(head[:, :k_out] & low)
    if exact_rows and (fix := np.concatenate(exact_rows)).size:
        _rank_exact(c, scales, k, out, fix)


def _rank_exact(c: _Collapsed, scales: _Scales, k: int, out: np.ndarray, rows: np.ndarray) -> None:
    """Exact (descending value, ascending token) ranking of some rows with one lexsort."""
    lengths = np.diff(c.indptr)[rows]
    before = np.zeros(len(rows), dtype=np.int64)
    np.cumsum(lengths[:-1], out=before[1:])
    position = np.arange(int(lengths.sum()), dtype=np.int64) - np.repeat(before, lengths)
    elem = np.repeat(c.indptr[:-1][rows], lengths) + position
    which = np.repeat(np.arange(len(rows), dtype=np.int64), lengths)
    cols = c.cols[elem]
    v = _normalise(np.repeat(scales.inv_n[rows], lengths), c.x[elem], scales.inv_m[cols])
    tokens = c.tokens[cols]
    order = np.lexsort((tokens, -v, which))
    top = position < k
    out[rows[which[top]], position[top]] = tokens[order][top]


def _rank_official(c: _Collapsed, scales: _Scales, k: int, out: np.ndarray, pad_id: int) -> None:
    """Per-cell ``np.argsort(-values)`` on the official column order (slow path)."""
    v = _values(c, scales)
    elem_tokens = c.tokens[c.cols]
    for i in range(len(c.indptr) - 1):
        s, e = int(c.indptr[i]), int(c.indptr[i + 1])
        if s == e:
            continue
        order = np.argsort(-v[s:e])  # numpy's default (unstable) sort, as the official code
        out[i, : min(e - s, k)] = elem_tokens[s:e][order[:k]]


# ----------------------------------------------------------------------------- public API
def geneformer_sequence_lengths(
    X,
    gene_ids: np.ndarray,
    *,
    max_len: int = 2048,
    special_tokens: bool = False,
) -> np.ndarray:
    """Count the tokens that :func:`tokenize_geneformer` gives each cell.

    Cheap (no ranking): use it to bucket cells of similar length into batches.

    Parameters
    ----------
    X
        Cells × genes counts (all the columns that `gene_ids` describes).
    gene_ids
        Token id of every column, ``-1`` outside the vocabulary; columns may share a token.
    max_len
        Longest sequence, special tokens included (V1: 2048, V2: 4096).
    special_tokens
        Count ``<cls>`` and ``<eos>`` (Geneformer V2).

    Returns
    -------
    ``int64`` array with one length per cell: ``min(n, max_len)`` for ``n`` detected
    vocabulary genes, or ``min(n, max_len - 2) + 2`` with special tokens.

    """
    max_len = _check_max_len(max_len, special_tokens)
    X = _as_csr(X)
    gene_ids = _check_gene_ids(gene_ids, X.shape[1])
    check_values(X.data)
    used = gene_ids >= 0
    tokens, compact = np.unique(gene_ids[used], return_inverse=True)
    col_of = np.full(X.shape[1], -1, dtype=np.int64)
    col_of[used] = compact
    elem_col = col_of[X.indices]
    mask = (elem_col >= 0) & (X.data != 0)
    rows = csr_rows(X.indptr)[mask]
    if len(tokens) < used.sum():  # shared tokens: count distinct (row, token) pairs
        n = np.bincount(
            np.unique(rows * len(tokens) + elem_col[mask]) // max(len(tokens), 1),
            minlength=X.shape[0],
        )
    else:
        n = np.bincount(rows, minlength=X.shape[0])
    n = n.astype(np.int64)
    if special_tokens:
        return np.minimum(n, max_len - 2) + 2
    return np.minimum(n, max_len)


def tokenize_geneformer(
    X,
    gene_ids: np.ndarray,
    medians: np.ndarray,
    *,
    n_counts: np.ndarray | None = None,
    max_len: int = 2048,
    pad_id: int = 0,
    cls_id: int | None = None,
    eos_id: int | None = None,
    tie_break: TieBreak = "deterministic",
    require_integer: bool = True,
) -> GeneformerTokens:
    """Turn a batch of cells into padded Geneformer rank-value token sequences.

    Steps, vectorised over the batch (no loop over cells with the default `tie_break`):

    1. keep the columns with a token (``gene_ids >= 0``); columns that share a token have their
       counts summed per cell, as the official tokenizer collapses duplicate Ensembl IDs;
    2. normalise every detected gene: ``count / n_counts * 10_000 / median[token]`` in
       float64, bit for bit as the official ``TranscriptomeTokenizer`` computes it on a CSR
       matrix (SciPy evaluates the divisions as multiplications by reciprocals);
    3. rank the cell's genes by descending value and keep the first `max_len` (Geneformer
       V1), or ``<cls>`` + the first ``max_len - 2`` + ``<eos>`` when `cls_id` and `eos_id`
       are given (V2);
    4. pad to the longest cell of the batch with `pad_id`.

    Genes with zero counts never appear. A cell without any detected vocabulary gene is kept
    with ``n_genes == 0`` (length 0, or just ``<cls> <eos>``); the official tokenizer drops such
    cells, so the caller decides what to do with them.

    Parameters
    ----------
    X
        Cells × genes raw counts (CSR preferred; other SciPy formats and dense arrays are
        converted; the input is not modified). Values must be finite and non-negative.
    gene_ids
        Token id of every column (``match_genes(ids, vocab, keep_duplicates=True).token_ids``),
        ``-1`` for columns outside the vocabulary. Several columns may share a token.
    medians
        float64 gene non-zero medians indexed by token id (length = vocabulary size; NaN or 0
        for special tokens, which must not appear in `gene_ids`).
    n_counts
        Total counts of every cell over **all** its genes, those outside the vocabulary
        included (the official ``obs['n_counts']``). Default: the row sums of `X`, which equal
        it when `X` holds all the cell's genes. Used as float64.
    max_len
        Longest sequence, special tokens included (V1: 2048; V2: 4096).
    pad_id
        Id of the padding token.
    cls_id
        Id of ``<cls>`` (V2); give both `cls_id` and `eos_id`, or neither (V1).
    eos_id
        Id of ``<eos>`` (V2).
    tie_break
        Order of genes with exactly equal values. ``"deterministic"`` (default): ascending
        token id, so the output does not depend on the column order of `X`.
        ``"official"``: NumPy's default (unstable) ``np.argsort(-values)`` of each cell on the
        official column order after collapsing (genes with one column in column order, then
        the summed shared tokens by first column), which reproduces the official token order
        bit for bit. This path loops over cells in Python and is several times slower.
    require_integer
        Raise a :class:`ValueError` if the vocabulary genes hold non-integer values (the model
        was trained on raw counts). Set to `False` for count-like non-integer data.

    Returns
    -------
    Token ids, lengths and detected-gene counts of the padded batch.

    Notes
    -----
    Official quirks not reproduced: the official code does not collapse a column whose
    Ensembl ID appears twice verbatim (it then emits the token twice); here columns sharing a
    token are always summed. Official values are float32-rounded when ``obs['n_counts']`` is
    float32, and computed with true divisions for dense ``X`` or SciPy < 1.11; either can
    reorder genes whose values agree to the last bits.

    Examples
    --------
    >>> import numpy as np, scipy.sparse as sp
    >>> X = sp.csr_matrix(np.array([[3.0, 0.0, 1.0, 5.0], [0.0, 1.0, 0.0, 2.0]]))
    >>> gene_ids = np.array([2, 3, 4, -1])  # the last column is not in the vocabulary
    >>> medians = np.array([np.nan, np.nan, 1.0, 1.0, 0.5])  # by token id; 0, 1 are specials
    >>> tok = tokenize_geneformer(X, gene_ids, medians)
    >>> tok.input_ids
    array([[2, 4],
           [3, 0]])
    >>> tok.lengths, tok.n_genes
    (array([2, 1]), array([2, 1]))

    """
    _check_tie_break(tie_break)
    special = cls_id is not None or eos_id is not None
    if special and (cls_id is None or eos_id is None):
        raise ValueError("Give both cls_id and eos_id (Geneformer V2), or neither (V1).")
    max_len = _check_max_len(max_len, special)
    medians = np.asarray(medians)
    vocab_size = medians.shape[0] if medians.ndim == 1 else None
    c = _collapse(X, gene_ids, n_counts, require_integer=require_integer, vocab_size=vocab_size)
    medians = _check_medians(medians, c.tokens)
    scales = _scales(c, medians)
    k = max_len - 2 if special else max_len
    n_genes = np.diff(c.indptr).astype(np.int64)
    kept = np.minimum(n_genes, k)
    offset = 1 if special else 0
    lengths = kept + 2 * offset
    n_cells = len(n_genes)
    input_ids = np.full((n_cells, int(lengths.max(initial=0))), pad_id, dtype=np.int64)
    body = input_ids[:, offset : offset + int(kept.max(initial=0))]
    rank = _rank_official if tie_break == "official" else _rank_deterministic
    rank(c, scales, k, body, pad_id)
    if special:
        input_ids[:, 0] = cls_id
        input_ids[np.arange(n_cells), lengths - 1] = eos_id
    return GeneformerTokens(input_ids=input_ids, lengths=lengths.astype(np.int64), n_genes=n_genes)
