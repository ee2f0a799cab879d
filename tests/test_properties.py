"""Property tests of the tokenizers and of gene matching on random inputs.

Random sparse count matrices (empty rows, extreme values, genes outside the vocabulary,
columns sharing a token) check invariants that must hold for any input: bins within range
and order preserving, ranked tokens a permutation of the expressed vocabulary genes, each
cell's tokens independent of the other cells of its batch.
"""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from cellformers.genes import GeneVocab, match_genes
from cellformers.tokenize import (
    bin_csr,
    tokenize_geneformer,
    tokenize_scbert,
    tokenize_scfoundation,
    tokenize_scgpt,
)

SETTINGS = settings(max_examples=30, deadline=None)
# mostly zeros, small counts and a few extreme ones
COUNTS = st.sampled_from([0, 0, 0, 0, 1, 1, 2, 3, 5, 17, 250, 10**6, 2**24])


@st.composite
def count_matrices(draw, *, shared_tokens: bool = False, max_cells: int = 7, max_genes: int = 9):
    """A random CSR count matrix (float32) and, for each column, a token id or -1.

    Token ids are below ``n_genes + 3``; several columns share one only with `shared_tokens`.
    """
    shape = (draw(st.integers(1, max_cells)), draw(st.integers(1, max_genes)))
    X = draw(hnp.arrays(np.float32, shape, elements=COUNTS))
    if shared_tokens:
        ids = draw(hnp.arrays(np.int64, shape[1], elements=st.integers(0, shape[1] + 2)))
    else:
        ids = np.array(draw(st.permutations(range(shape[1] + 3)))[: shape[1]], dtype=np.int64)
    unknown = draw(hnp.arrays(bool, shape[1]))
    return sp.csr_matrix(X), np.where(unknown, -1, ids)


def _rows(X: sp.csr_matrix):
    return [X[i : i + 1] for i in range(X.shape[0])]


def _unpadded(rows: np.ndarray, lengths: np.ndarray) -> list[list]:
    return [list(r[:n]) for r, n in zip(rows, lengths, strict=True)]


# ---------------------------------------------------------------- scGPT binning
@SETTINGS
@given(data=count_matrices(), n_bins=st.integers(2, 60))
def test_bins_are_in_range_and_keep_the_order_of_values(data, n_bins):
    X, _ = data
    binned = bin_csr(X, n_bins)
    dense, bins = X.toarray(), binned.toarray()
    assert np.array_equal(bins > 0, dense > 0)  # zeros stay zero, nothing else does
    assert bins.min() >= 0 and bins.max() <= n_bins - 1
    assert np.array_equal(bins, np.round(bins))
    for x, b in zip(dense, bins, strict=True):
        order = np.argsort(x, kind="stable")
        assert np.all(np.diff(b[order]) >= 0)  # more expression, never a lower bin
    for i, row in enumerate(_rows(X)):
        np.testing.assert_array_equal(bin_csr(row, n_bins).toarray()[0], bins[i])


@SETTINGS
@given(data=count_matrices(), max_seq_len=st.integers(2, 12), include_zero=st.booleans())
def test_scgpt_tokens_are_the_cells_matched_genes(data, max_seq_len, include_zero):
    X, gene_ids = data
    kwargs = {"cls_id": 100, "pad_id": 101, "n_bins": 11, "max_seq_len": max_seq_len}
    tok = tokenize_scgpt(X, gene_ids, include_zero_gene=include_zero, **kwargs)
    dense, matched = X.toarray(), gene_ids >= 0
    for i, (genes, values) in enumerate(
        zip(_unpadded(tok.genes, tok.lengths), _unpadded(tok.values, tok.lengths), strict=True)
    ):
        wanted = matched if include_zero else matched & (dense[i] > 0)
        assert genes[0] == 100 and len(genes) == 1 + min(wanted.sum(), max_seq_len - 1)
        assert set(genes[1:]) <= set(gene_ids[wanted])
        assert all(0 <= v <= 10 for v in values[1:])
        single = tokenize_scgpt(X[i], gene_ids, include_zero_gene=include_zero, **kwargs)
        assert list(single.genes[0, : single.lengths[0]]) == genes
        assert list(single.values[0, : single.lengths[0]]) == values


# ---------------------------------------------------------------- Geneformer ranks
@SETTINGS
@given(data=count_matrices(shared_tokens=True), special=st.booleans(), truncate=st.booleans())
def test_ranked_tokens_are_the_expressed_vocabulary_genes(data, special, truncate):
    X, gene_ids = data
    vocab_size = X.shape[1] + 3
    gene_ids = np.where(gene_ids >= 2, gene_ids, -1)  # 0 and 1 are specials
    medians = np.r_[np.nan, np.nan, np.linspace(0.5, 4.0, vocab_size - 2)]
    cls_eos = {"cls_id": 0, "eos_id": 1} if special else {}
    n_special = 2 if special else 0
    max_len = 3 + n_special if truncate else X.shape[1] + n_special
    tok = tokenize_geneformer(X, gene_ids, medians, max_len=max_len, pad_id=0, **cls_eos)
    dense = X.toarray()
    for i, ids in enumerate(_unpadded(tok.input_ids, tok.lengths)):
        genes = ids[1:-1] if special else ids
        expressed = {int(t) for t in gene_ids[(gene_ids >= 0) & (dense[i] > 0)]}
        assert tok.n_genes[i] == len(expressed)
        assert len(genes) == len(set(genes)) == min(len(expressed), max_len - n_special)
        assert set(genes) <= expressed
        if not truncate:
            assert set(genes) == expressed  # a permutation of the expressed genes
        # descending normalised expression (columns sharing a token are summed)
        summed = {t: dense[i, gene_ids == t].sum() / medians[t] for t in genes}
        assert all(summed[a] >= summed[b] for a, b in itertools.pairwise(genes))
        single = tokenize_geneformer(X[i], gene_ids, medians, max_len=max_len, **cls_eos)
        assert list(single.input_ids[0, : single.lengths[0]]) == ids


# ---------------------------------------------------------------- scBERT panel
@SETTINGS
@given(data=count_matrices(), n_bins=st.integers(1, 7))
def test_scbert_tokens_are_in_range(data, n_bins):
    X, gene_ids = data
    n_genes = X.shape[1] + 3
    tokens = tokenize_scbert(X, gene_ids, n_genes=n_genes, n_bins=n_bins)
    assert tokens.shape == (X.shape[0], n_genes + 1)
    assert tokens.min() >= 0 and tokens.max() <= n_bins and (tokens[:, -1] == 0).all()
    placed = np.zeros(n_genes + 1, bool)
    placed[gene_ids[gene_ids >= 0]] = True
    assert (tokens[:, ~placed] == 0).all()  # panel genes the data lack read as zero
    for i, row in enumerate(_rows(X)):
        np.testing.assert_array_equal(
            tokenize_scbert(row, gene_ids, n_genes=n_genes, n_bins=n_bins)[0], tokens[i]
        )


# ---------------------------------------------------------------- scFoundation depth
@SETTINGS
@given(data=count_matrices())
def test_scfoundation_tokens_are_the_expressed_listed_genes(data):
    X, gene_ids = data
    n_genes = X.shape[1] + 3
    dense = X.toarray()
    first = {}
    for column, position in enumerate(gene_ids):  # the first column of a listed gene wins
        if position >= 0:
            first.setdefault(int(position), column)
    aligned = np.zeros((X.shape[0], n_genes))
    for position, column in first.items():
        aligned[:, position] = dense[:, column]
    keep = aligned.sum(1) > 0  # cells with no count in the list are another test's concern
    if not keep.any():
        return
    X, aligned = X[np.flatnonzero(keep)], aligned[keep]
    tok = tokenize_scfoundation(X, gene_ids, n_genes=n_genes)
    for i in range(X.shape[0]):
        n = int(tok.lengths[i])
        expressed = np.flatnonzero(aligned[i] > 0)
        assert n == len(expressed) + 2
        np.testing.assert_array_equal(tok.positions[i, : n - 2], expressed)
        assert list(tok.positions[i, n - 2 : n]) == [n_genes, n_genes + 1]
        assert np.all(np.isfinite(tok.values[i, :n])) and np.all(tok.values[i, : n - 2] > 0)
        single = tokenize_scfoundation(X[i], gene_ids, n_genes=n_genes)
        np.testing.assert_array_equal(single.values[0, :n], tok.values[i, :n])


# ---------------------------------------------------------------- gene matching
GENE_NAMES = st.sampled_from(["TP53", "GATA1", "CD4", "ACTB", "MYC", "NOT_A_GENE", "XYZ1", ""])


@pytest.mark.filterwarnings("ignore:.*already taken by an earlier gene")
@SETTINGS
@given(genes=st.lists(GENE_NAMES, min_size=1, max_size=12), keep=st.booleans())
def test_match_genes_handles_duplicated_and_unknown_names(genes, keep):
    vocab = GeneVocab.from_tokens(["TP53", "GATA1", "CD4", "ACTB", "MYC"])
    match = match_genes(genes, vocab, min_coverage=0.0, keep_duplicates=keep)
    ids = match.token_ids
    assert ids.shape == (len(genes),) and match.n_genes == len(genes)
    assert match.n_matched == int((ids >= 0).sum())
    assert np.isclose(match.fraction, match.n_matched / len(genes))
    seen = set()
    for name, token in zip(genes, ids, strict=True):
        if name not in vocab:
            assert token == -1
        elif keep or name not in seen:
            assert token == vocab[name]
        else:
            assert token == -1  # a repeated gene: the first column keeps the token
        seen.add(name)
    assert set(match.unmatched) == {g for g in genes if g not in vocab}
    reordered = match_genes(pd.Index(genes[::-1]), vocab, min_coverage=0.0, keep_duplicates=True)
    np.testing.assert_array_equal(
        reordered.token_ids[::-1],
        match_genes(genes, vocab, min_coverage=0.0, keep_duplicates=True).token_ids,
    )
