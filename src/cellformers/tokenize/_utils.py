"""Helpers shared by the tokenizers: CSR input handling, random generators and hashing."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

RNGLike = int | np.random.Generator | np.random.RandomState | None

_U64 = np.uint64
_GOLDEN = _U64(0x9E3779B97F4A7C15)
_MIX1 = _U64(0xBF58476D1CE4E5B9)
_MIX2 = _U64(0x94D049BB133111EB)


def as_csr(X, *, name: str = "X") -> sp.csr_matrix:
    """Return ``X`` as a canonical float64 CSR matrix (a copy; the input is not modified).

    Canonical means sorted column indices within rows, no duplicate entries (they are summed,
    as SciPy does) and no explicitly stored zeros. Values are checked to be finite and
    non-negative.
    """
    if sp.issparse(X):
        X = sp.csr_matrix(X, dtype=np.float64, copy=True)
    else:
        arr = np.asarray(X)
        if arr.ndim != 2:
            raise ValueError(f"{name} must be a 2-D cells × genes matrix, got shape {arr.shape}.")
        X = sp.csr_matrix(arr.astype(np.float64, copy=False))
    check_values(X.data, name=name)
    if not X.has_canonical_format:
        X.sum_duplicates()
    if X.nnz and not X.data.all():
        X.eliminate_zeros()
    return X


def input_dtype(X) -> np.dtype:
    """Dtype of the values of a sparse or dense matrix (lists are converted)."""
    dtype = getattr(X, "dtype", None)
    return np.dtype(dtype) if dtype is not None else np.asarray(X).dtype


def check_values(data: np.ndarray, *, name: str = "X") -> None:
    """Raise a :class:`ValueError` if ``data`` holds NaN, infinite or negative values."""
    if data.size == 0:
        return
    finite = np.isfinite(data)
    if not finite.all():
        n_nan = int(np.isnan(data).sum())
        n_inf = int((~finite).sum()) - n_nan
        raise ValueError(
            f"{name} contains {n_nan} NaN and {n_inf} infinite value(s). Expression input must "
            "be finite, non-negative (raw counts or normalised values); remove or fix those cells."
        )
    low = data.min()
    if low < 0:
        raise ValueError(
            f"{name} contains {int((data < 0).sum())} negative value(s) (min {low:g}); it looks "
            "scaled or centred. Pass raw counts (e.g. `layer='counts'`) or non-negative "
            "normalised values."
        )


def csr_rows(indptr: np.ndarray) -> np.ndarray:
    """Row index of every stored element of a CSR matrix."""
    n_rows = len(indptr) - 1
    return np.repeat(np.arange(n_rows, dtype=np.int64), np.diff(indptr))


def uniform(rng: RNGLike, size: int) -> np.ndarray:
    """Draw ``size`` uniform numbers in ``[0, 1)`` from ``rng`` in one call.

    ``None`` uses NumPy's global (legacy) random state, as scGPT does; an int seeds a new
    :func:`numpy.random.default_rng`; a :class:`~numpy.random.Generator` or a legacy
    :class:`~numpy.random.RandomState` is used as is (``random`` / ``random_sample``).
    """
    if rng is None:
        return np.random.random_sample(size)  # noqa: NPY002 (scGPT uses the global state)
    if isinstance(rng, np.random.RandomState):
        return rng.random_sample(size)
    if isinstance(rng, np.random.Generator):
        return rng.random(size)
    raise TypeError(
        "rng must be None, an int seed, a numpy.random.Generator or a numpy.random.RandomState; "
        f"got {type(rng).__name__}."
    )


def resolve_rng(rng: RNGLike) -> np.random.Generator | np.random.RandomState | None:
    """Turn an int seed into a :class:`~numpy.random.Generator`; pass other values through."""
    if isinstance(rng, bool):
        raise TypeError("rng must be None, an int seed, a Generator or a RandomState, not bool.")
    if isinstance(rng, int | np.integer):
        return np.random.default_rng(int(rng))
    if rng is None or isinstance(rng, np.random.Generator | np.random.RandomState):
        return rng
    raise TypeError(
        "rng must be None, an int seed, a numpy.random.Generator or a numpy.random.RandomState; "
        f"got {type(rng).__name__}."
    )


def splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser, element-wise on ``uint64`` (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        z = np.asarray(x, dtype=_U64) + _GOLDEN
        z = (z ^ (z >> _U64(30))) * _MIX1
        z = (z ^ (z >> _U64(27))) * _MIX2
        return z ^ (z >> _U64(31))


def seed_to_u64(seed: int) -> np.ndarray:
    """Map any Python int to a ``uint64`` scalar array (two's complement wrap-around)."""
    return np.asarray(int(seed) % (1 << 64), dtype=_U64)


def row_fingerprints(indptr: np.ndarray, token_hash: np.ndarray, values: np.ndarray) -> np.ndarray:
    """64-bit fingerprint of each CSR row's content: its (token, value) pairs.

    The fingerprint is a wrapping sum of per-element SplitMix64 hashes, so it depends only on
    the set of (token, value) pairs of the row: not on the other rows, their order, or the
    order of the columns. Values are hashed through their float64 bit pattern.

    Parameters
    ----------
    indptr
        CSR row pointer.
    token_hash
        ``uint64`` hash of the token of every stored element (``splitmix64(token_id)``).
    values
        Stored values.

    """
    bits = np.ascontiguousarray(values, dtype=np.float64).view(_U64)
    h = splitmix64(token_hash ^ bits)
    csum = np.zeros(len(h) + 1, dtype=_U64)
    with np.errstate(over="ignore"):
        np.cumsum(h, dtype=_U64, out=csum[1:])
        return csum[indptr[1:]] - csum[indptr[:-1]]


def keep_smallest_per_row(rows: np.ndarray, keys: np.ndarray, k: int) -> np.ndarray:
    """Mask of the ``k`` elements with the smallest ``uint64`` keys in each row.

    ``rows`` must be non-decreasing (CSR order) and every row must hold more than ``k``
    elements. Equal keys are broken by position, so the result is deterministic. Instead of
    sorting all elements, elements are counted per row in 256 buckets of the key's top byte;
    only the bucket that holds each row's ``k``-th smallest key is sorted.
    """
    n = len(rows)
    if n == 0:
        return np.zeros(0, dtype=bool)
    local = np.zeros(n, dtype=np.int64)
    np.cumsum(rows[1:] != rows[:-1], out=local[1:])
    n_local = int(local[-1]) + 1
    digit = (keys >> _U64(56)).astype(np.int64)
    hist = np.bincount(local * 256 + digit, minlength=n_local * 256).reshape(n_local, 256)
    cum = np.cumsum(hist, axis=1)
    boundary = (cum < k).sum(axis=1)
    below = np.where(boundary > 0, cum[np.arange(n_local), np.maximum(boundary - 1, 0)], 0)
    need = k - below
    boundary_el = boundary[local]
    keep = digit < boundary_el
    on = np.flatnonzero(digit == boundary_el)
    on = on[np.lexsort((keys[on], local[on]))]
    on_local = local[on]
    first = np.searchsorted(on_local, np.arange(n_local))
    rank = np.arange(len(on), dtype=np.int64) - first[on_local]
    keep[on[rank < need[on_local]]] = True
    return keep
