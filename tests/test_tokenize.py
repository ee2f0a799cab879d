from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from cellformers.tokenize import ScGPTTokens, bin_csr, scgpt_sequence_lengths, tokenize_scgpt
from cellformers.tokenize._binning import _diff_dtype, _row_quantiles, _sort_within_rows
from cellformers.tokenize._utils import csr_rows

N_BINS = 51
CLS, PAD = 90_001, 90_000


@pytest.fixture
def counts(cellbench) -> sp.csr_matrix:
    return sp.csr_matrix(cellbench.X)


@pytest.fixture
def lognorm(counts) -> sp.csr_matrix:
    """log1p(CP10k) in float32: non-integer values, as in scGPT's Preprocessor layers."""
    X = sp.csr_matrix(counts, dtype=np.float64)
    X = sp.diags(1e4 / np.asarray(X.sum(axis=1)).ravel()) @ X
    X.data = np.log1p(X.data)
    return sp.csr_matrix(X, dtype=np.float32)


def _official_rows(official_scgpt, X: sp.csr_matrix, seed: int) -> np.ndarray:
    from scgpt.preprocess import binning

    dense = X.toarray()
    np.random.seed(seed)  # noqa: NPY002 (the official code draws from the global state)
    return np.stack([binning(row, N_BINS) for row in dense])


def _tie_ranges(X: sp.csr_matrix) -> tuple[np.ndarray, np.ndarray]:
    """Official left/right digits of every stored value (CSR order), row by row."""
    left, right = [], []
    for i in range(X.shape[0]):
        nz = X.data[X.indptr[i] : X.indptr[i + 1]]
        edges = np.quantile(nz, np.linspace(0, 1, N_BINS - 1))
        left.append(np.digitize(nz, edges))
        right.append(np.digitize(nz, edges, right=True))
    return np.concatenate(left), np.concatenate(right)


# ----------------------------------------------------------------------------- binning
@pytest.mark.parametrize("which", ["counts", "lognorm", "lognorm64"])
def test_quantile_edges_equal_numpy_bitwise(which, counts, lognorm):
    X = {"counts": counts, "lognorm": lognorm, "lognorm64": lognorm.astype(np.float64)}[which]
    X64 = sp.csr_matrix(X, dtype=np.float64)
    order = _sort_within_rows(X64.data, csr_rows(X64.indptr), X64.shape[0])
    n = np.diff(X64.indptr).astype(np.int64)
    q = np.linspace(0, 1, N_BINS - 1)
    edges = _row_quantiles(
        X64.data[order], X64.indptr[:-1].astype(np.int64), n, q, _diff_dtype(X.dtype)
    )
    ref = np.stack(
        [np.quantile(X.data[X.indptr[i] : X.indptr[i + 1]], q) for i in range(X.shape[0])]
    )
    assert edges.dtype == ref.dtype == np.float64
    np.testing.assert_array_equal(edges.view(np.uint64), ref.view(np.uint64))


@pytest.mark.parametrize("which", ["counts", "lognorm"])
def test_random_tie_break_equals_official(official_scgpt, which, counts, lognorm):
    X = {"counts": counts, "lognorm": lognorm}[which][:200]
    # an all-zero cell in the middle: the official code draws nothing for it
    X = sp.vstack([X[:50], sp.csr_matrix((1, X.shape[1]), dtype=X.dtype), X[50:]]).tocsr()
    for seed in (0, 2024):
        official = _official_rows(official_scgpt, X, seed)
        ours = bin_csr(X, tie_break="random", rng=np.random.RandomState(seed))
        np.testing.assert_array_equal(ours.toarray(), official)
    # rng=None draws from NumPy's global state, like the official code
    official = _official_rows(official_scgpt, X, 7)
    np.random.seed(7)  # noqa: NPY002
    np.testing.assert_array_equal(bin_csr(X, tie_break="random").toarray(), official)


def test_random_draws_are_one_stream():
    # consecutive rand(n_i) calls draw the same numbers as one rand(sum n_i) call
    a = np.random.RandomState(3)
    b = np.random.RandomState(3)
    parts = np.concatenate([a.rand(n) for n in (5, 0, 17, 1, 300)])
    np.testing.assert_array_equal(parts, b.rand(323))


def test_random_tie_break_seeds(counts):
    X = counts[:40]
    a = bin_csr(X, tie_break="random", rng=5)
    np.testing.assert_array_equal(a.toarray(), bin_csr(X, tie_break="random", rng=5).toarray())
    g = bin_csr(X, tie_break="random", rng=np.random.default_rng(5))
    np.testing.assert_array_equal(a.toarray(), g.toarray())
    assert (a != bin_csr(X, tie_break="random", rng=6)).nnz > 0


def test_deterministic_bins_within_official_tie_range(counts):
    X = counts[:150]
    left, right = _tie_ranges(X)
    d = bin_csr(X).data.astype(np.int64)
    # official range: ceil(u * (right - left) + left), u in [0, 1) -> right + 1 .. left
    assert np.where(left == right, d == left, (d >= right + 1) & (d <= left)).all()
    np.testing.assert_array_equal(d, (left + right + 1) // 2)
    off_edge = left == right
    assert off_edge.any() and (d[off_edge] == left[off_edge]).all()


def test_deterministic_bins_independent_of_batch(counts):
    full = bin_csr(counts)
    perm = np.random.default_rng(0).permutation(counts.shape[0])
    np.testing.assert_array_equal(bin_csr(counts[perm]).toarray(), full[perm].toarray())
    subset = np.array([17, 3, 400])
    np.testing.assert_array_equal(bin_csr(counts[subset]).toarray(), full[subset].toarray())
    np.testing.assert_array_equal(bin_csr(counts[5]).toarray(), full[5].toarray())


def test_bin_csr_general_sort_paths(counts):
    # values above 65535 (float sort path) and batches of more than 65536 cells (int64 rows)
    big = counts[:60] * 100.0
    assert big.max() > 65_535
    np.testing.assert_array_equal(bin_csr(big).toarray(), bin_csr(counts[:60]).toarray())
    rng = np.random.default_rng(0)
    n = 70_000
    tall = sp.random(n, 40, density=0.1, format="csr", random_state=rng, dtype=np.float64)
    tall.data = np.round(tall.data * 5) + 1
    out = bin_csr(tall)
    head = bin_csr(tall[:100])
    tail = bin_csr(tall[n - 100 :])
    np.testing.assert_array_equal(out[:100].toarray(), head.toarray())
    np.testing.assert_array_equal(out[n - 100 :].toarray(), tail.toarray())


def test_bin_csr_output_format(counts):
    X = counts[:30]
    out = bin_csr(X)
    assert isinstance(out, sp.csr_matrix) and out.dtype == np.float32
    assert out.has_sorted_indices
    np.testing.assert_array_equal(out.indptr, X.indptr)
    np.testing.assert_array_equal(out.indices, X.indices)
    assert out.data.min() >= 1 and out.data.max() == N_BINS - 1
    assert bin_csr(X, n_bins=11).data.max() == 10
    # explicit zeros, unsorted indices, csr_array, other formats and dense input
    X_zeros = X.copy()
    X_zeros.data[::7] = 0
    ref = X_zeros.copy()
    ref.eliminate_zeros()
    np.testing.assert_array_equal(bin_csr(X_zeros).toarray(), bin_csr(ref).toarray())
    assert bin_csr(X_zeros).nnz == ref.nnz
    rev = sp.csr_matrix(
        (
            np.concatenate([X.data[X.indptr[i] : X.indptr[i + 1]][::-1] for i in range(30)]),
            np.concatenate([X.indices[X.indptr[i] : X.indptr[i + 1]][::-1] for i in range(30)]),
            X.indptr,
        ),
        shape=X.shape,
    )
    assert not rev.has_sorted_indices
    for other in (rev, sp.csr_array(X), X.tocsc(), X.toarray(), X.astype(np.int32)):
        np.testing.assert_array_equal(bin_csr(other).toarray(), out.toarray())
    empty = bin_csr(sp.csr_matrix((3, 4)))
    assert empty.shape == (3, 4) and empty.nnz == 0


@pytest.mark.parametrize(
    ("value", "match"), [(-1.0, "negative"), (np.nan, "NaN"), (np.inf, "infinite")]
)
def test_bin_csr_rejects_bad_values(counts, value, match):
    X = counts[:5].copy()
    X.data[3] = value
    with pytest.raises(ValueError, match=match):
        bin_csr(X)
    with pytest.raises(ValueError, match=match):
        tokenize_scgpt(X, np.arange(X.shape[1]), cls_id=CLS, pad_id=PAD)


def test_bin_csr_rejects_bad_options(counts):
    with pytest.raises(ValueError, match="tie_break"):
        bin_csr(counts[:2], tie_break="midpoint")
    with pytest.raises(ValueError, match="n_bins"):
        bin_csr(counts[:2], n_bins=1)
    with pytest.raises(TypeError, match="rng"):
        bin_csr(counts[:2], tie_break="random", rng="seed")


# ----------------------------------------------------------------------------- tokenize
@pytest.fixture
def gene_ids(counts) -> np.ndarray:
    """Shuffled token ids (so token order differs from column order), 1 column in 5 unmatched."""
    ids = np.random.default_rng(1).permutation(counts.shape[1]).astype(np.int64)
    ids[::5] = -1
    return ids


def _kwargs(**kw):
    return {"cls_id": CLS, "pad_id": PAD, **kw}


def test_tokenize_layout_and_unmatched_columns(counts, gene_ids):
    X = counts[:60]
    tok = tokenize_scgpt(X, gene_ids, **_kwargs(max_seq_len=20_000))
    assert isinstance(tok, ScGPTTokens) and len(tok) == 60
    assert tok.genes.dtype == np.int64 and tok.values.dtype == np.float32
    assert tok.lengths.dtype == np.int64
    matched = gene_ids >= 0
    Xm = X[:, matched]
    np.testing.assert_array_equal(tok.lengths, np.diff(Xm.indptr) + 1)
    assert tok.genes.shape == (60, tok.lengths.max())
    assert (tok.genes[:, 0] == CLS).all() and (tok.values[:, 0] == -2).all()
    pad = tok.padding_mask
    assert (tok.genes[pad] == PAD).all() and (tok.values[pad] == -2).all()
    assert (tok.genes[~pad] != PAD).all()
    # binning is computed over the matched columns only, genes kept in column order
    binned = bin_csr(Xm)
    tokens_of_matched = gene_ids[matched]
    for i in (0, 31, 59):
        row = slice(binned.indptr[i], binned.indptr[i + 1])
        n = tok.lengths[i]
        np.testing.assert_array_equal(tok.genes[i, 1:n], tokens_of_matched[binned.indices[row]])
        np.testing.assert_array_equal(tok.values[i, 1:n], binned.data[row])
    assert not np.array_equal(bin_csr(X)[:, matched].toarray(), binned.toarray())
    np.testing.assert_array_equal(scgpt_sequence_lengths(X, gene_ids, 20_000), tok.lengths)
    fine_tune = tokenize_scgpt(X[:3], gene_ids, **_kwargs(cls_value=0.0, pad_value=-1.5))
    assert (fine_tune.values[:, 0] == 0).all()
    assert (fine_tune.values[fine_tune.padding_mask] == -1.5).all()


def test_tokenize_truncation_keeps_subset_in_column_order(counts, gene_ids):
    X = counts[:40]
    max_len = 300
    tok = tokenize_scgpt(X, gene_ids, **_kwargs(max_seq_len=max_len))
    full = tokenize_scgpt(X, gene_ids, **_kwargs(max_seq_len=20_000))
    n_full = full.lengths - 1
    assert (n_full > max_len - 1).all()  # every cellbench cell is longer than 299 genes
    np.testing.assert_array_equal(tok.lengths, np.minimum(n_full, max_len - 1) + 1)
    assert tok.genes.shape == (40, max_len)
    np.testing.assert_array_equal(scgpt_sequence_lengths(X, gene_ids, max_len), tok.lengths)
    column_of_token = np.full(gene_ids.max() + 1, -1)
    column_of_token[gene_ids[gene_ids >= 0]] = np.flatnonzero(gene_ids >= 0)
    for i in range(0, 40, 7):
        kept = tok.genes[i, 1:]
        assert (np.diff(column_of_token[kept]) > 0).all()  # column order
        sel = np.isin(full.genes[i, 1 : n_full[i] + 1], kept)
        assert sel.sum() == max_len - 1  # a subset of the cell's genes ...
        # ... with the bins of the whole cell (binning happens before truncation)
        np.testing.assert_array_equal(full.values[i, 1 : n_full[i] + 1][sel], tok.values[i, 1:])


def test_hash_truncation_invariant_to_batch(counts, gene_ids):
    X = counts[:120]
    kw = _kwargs(max_seq_len=200)
    whole = tokenize_scgpt(X, gene_ids, **kw)
    alone = tokenize_scgpt(X[7], gene_ids, **kw)
    np.testing.assert_array_equal(alone.genes[0], whole.genes[7])
    np.testing.assert_array_equal(alone.values[0], whole.values[7])
    other = np.array([99, 7, 3, 64])
    batch = tokenize_scgpt(X[other], gene_ids, **kw)
    np.testing.assert_array_equal(batch.genes, whole.genes[other])
    np.testing.assert_array_equal(batch.values, whole.values[other])
    perm = np.random.default_rng(0).permutation(120)
    permuted = tokenize_scgpt(X[perm], gene_ids, **kw)
    np.testing.assert_array_equal(permuted.genes, whole.genes[perm])
    np.testing.assert_array_equal(permuted.values, whole.values[perm])
    # a different seed picks different genes; two copies of a cell get the same genes
    reseeded = tokenize_scgpt(X, gene_ids, **kw, seed=1)
    assert (reseeded.genes != whole.genes).any()
    twice = tokenize_scgpt(X[[5, 5]], gene_ids, **kw)
    np.testing.assert_array_equal(twice.genes[0], twice.genes[1])


def test_random_truncation_uses_rng(counts, gene_ids):
    X = counts[:10]
    kw = _kwargs(max_seq_len=100, truncation="random")
    a = tokenize_scgpt(X, gene_ids, **kw, rng=3)
    np.testing.assert_array_equal(a.genes, tokenize_scgpt(X, gene_ids, **kw, rng=3).genes)
    assert (a.genes != tokenize_scgpt(X, gene_ids, **kw, rng=4).genes).any()
    assert (a.lengths == 100).all()


def test_include_zero_gene(counts):
    X = counts[:25]
    ids = np.full(X.shape[1], -1)
    cols = np.arange(0, X.shape[1], 60)  # 252 matched columns
    ids[cols] = np.arange(len(cols))[::-1]
    tok = tokenize_scgpt(X, ids, **_kwargs(include_zero_gene=True))
    assert (tok.lengths == len(cols) + 1).all()
    np.testing.assert_array_equal(tok.genes[:, 1:], np.broadcast_to(ids[cols], (25, len(cols))))
    np.testing.assert_array_equal(tok.values[:, 1:], bin_csr(X[:, cols]).toarray())
    assert (tok.values[:, 1:] == 0).any()
    np.testing.assert_array_equal(
        scgpt_sequence_lengths(X, ids, 1200, include_zero_gene=True), tok.lengths
    )
    short = tokenize_scgpt(X, ids, **_kwargs(include_zero_gene=True, max_seq_len=101))
    assert short.genes.shape == (25, 101) and (short.lengths == 101).all()
    alone = tokenize_scgpt(X[3], ids, **_kwargs(include_zero_gene=True, max_seq_len=101))
    np.testing.assert_array_equal(alone.genes[0], short.genes[3])


def test_tokenize_edge_cases(counts, gene_ids):
    X = sp.vstack([counts[:2], sp.csr_matrix((1, counts.shape[1]))]).tocsr()
    tok = tokenize_scgpt(X, gene_ids, **_kwargs(max_seq_len=50))
    assert tok.lengths[2] == 1 and (tok.genes[2, 1:] == PAD).all()
    none_matched = tokenize_scgpt(X, np.full(X.shape[1], -1), **_kwargs())
    assert none_matched.genes.shape == (3, 1)
    assert (scgpt_sequence_lengths(X, np.full(X.shape[1], -1), 50) == 1).all()


def test_tokenize_rejects_bad_input(counts, gene_ids):
    X = counts[:3]
    with pytest.raises(ValueError, match="one entry per column"):
        tokenize_scgpt(X, gene_ids[:-1], **_kwargs())
    with pytest.raises(ValueError, match="one entry per column"):
        scgpt_sequence_lengths(X, gene_ids[:-1], 100)
    dup = gene_ids.copy()
    dup[1] = dup[2]
    with pytest.raises(ValueError, match="same token"):
        tokenize_scgpt(X, dup, **_kwargs())
    with pytest.raises(ValueError, match="integers"):
        tokenize_scgpt(X, gene_ids.astype(float), **_kwargs())
    with pytest.raises(ValueError, match="max_seq_len"):
        tokenize_scgpt(X, gene_ids, **_kwargs(max_seq_len=1))
    with pytest.raises(ValueError, match="truncation"):
        tokenize_scgpt(X, gene_ids, **_kwargs(truncation="first"))
    neg = X.copy()
    neg.data[0] = -3
    with pytest.raises(ValueError, match="negative"):
        scgpt_sequence_lengths(neg, gene_ids, 100)
