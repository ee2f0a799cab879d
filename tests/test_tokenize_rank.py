"""Geneformer rank-value tokenizer on real CellBench counts with the real V1 dictionaries.

The oracle is ``geneformer_reference.tokenize_reference``, a per-cell transcription of the
official ``TranscriptomeTokenizer``.
"""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
from geneformer_reference import normalised_chunks, tokenize_reference

import cellformers.tokenize._rank as rank_module
from cellformers.data import geneformer_v1_dictionaries, is_available
from cellformers.genes import GeneVocab, match_genes, read_gene_dict
from cellformers.tokenize import GeneformerTokens, geneformer_sequence_lengths, tokenize_geneformer

V1_FILES = (
    "geneformer_v1_token_dictionary",
    "geneformer_v1_gene_median_dictionary",
)


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def v1():
    """The real V1 token dictionary, gene medians and medians indexed by token id."""
    if not all(is_available(name) for name in V1_FILES):
        pytest.skip("Geneformer V1 dictionaries not found: set CELLFORMERS_DATA")
    paths = geneformer_v1_dictionaries()
    tokens = read_gene_dict(paths["token_dictionary"])
    medians = read_gene_dict(paths["gene_median_dictionary"])
    by_id = np.full(len(tokens), np.nan)
    for gene, median in medians.items():
        by_id[tokens[gene]] = median
    return tokens, medians, by_id


@pytest.fixture(scope="module")
def v2(v1):
    """V2-style settings: the V1 dictionaries with <cls> and <eos> appended."""
    tokens, medians, by_id = v1
    tokens = {**tokens, "<cls>": len(tokens), "<eos>": len(tokens) + 1}
    return tokens, medians, np.concatenate([by_id, [np.nan, np.nan]])


@pytest.fixture(scope="module")
def bench(cellbench_path, v1):
    """CellBench raw counts (CSR), Ensembl IDs, totals and token ids from match_genes."""
    adata = ad.read_h5ad(cellbench_path)
    X = sp.csr_matrix(adata.X)
    assert np.array_equal(X.data, np.round(X.data))  # raw counts in X
    ensembl = adata.var["ensembl_id"].astype(str).to_numpy()
    n_counts = np.asarray(X.sum(axis=1), dtype=np.float64).ravel()
    vocab = GeneVocab(v1[0], pad_token="<pad>", cls_token=None)
    gene_ids = match_genes(ensembl, vocab, keep_duplicates=True).token_ids
    return X, ensembl, n_counts, gene_ids


def _rows(tokens: GeneformerTokens) -> list[np.ndarray]:
    return [tokens.input_ids[i, : tokens.lengths[i]] for i in range(len(tokens))]


def _assert_equal_rows(ours: GeneformerTokens, ref: list[np.ndarray]) -> None:
    assert len(ours) == len(ref)
    np.testing.assert_array_equal(ours.lengths, [len(r) for r in ref])
    for i, r in enumerate(ref):
        np.testing.assert_array_equal(ours.input_ids[i, : len(r)], r, err_msg=f"cell {i}")


def _full_values(X, ensembl, n_counts, tokens, medians, vocab_size, gene_mapping=None):
    """Per cell, the official normalised value of every token (NaN where not detected)."""
    out = []
    for X_norm, col_tokens in normalised_chunks(
        X, ensembl, n_counts, tokens, medians, gene_mapping
    ):
        for i in range(X_norm.shape[0]):
            row = np.full(vocab_size, np.nan)
            row[col_tokens[X_norm[i].indices]] = X_norm[i].data
            out.append(row)
    return out


# ----------------------------------------------------------------------------- parity
@pytest.mark.parametrize("max_len", [2048, 300])
def test_official_tie_break_equals_reference_v1(bench, v1, max_len):
    X, ensembl, n_counts, gene_ids = bench
    tokens, medians, by_id = v1
    ours = tokenize_geneformer(
        X, gene_ids, by_id, n_counts=n_counts, max_len=max_len, tie_break="official"
    )
    ref = tokenize_reference(X, ensembl, n_counts, tokens, medians, model_input_size=max_len)
    _assert_equal_rows(ours, ref)
    assert ours.input_ids.dtype == np.int64 and ours.input_ids.shape[1] == max_len
    full = tokenize_reference(X, ensembl, n_counts, tokens, medians, model_input_size=10**6)
    np.testing.assert_array_equal(ours.n_genes, [len(r) for r in full])
    assert (ours.n_genes > max_len).any()  # truncation happened
    # The real medians give no exact ties on these cells: the default order is the same.
    _assert_equal_rows(tokenize_geneformer(X, gene_ids, by_id, max_len=max_len), ref)


def test_official_tie_break_equals_reference_v2(bench, v2):
    X, ensembl, n_counts, gene_ids = bench
    tokens, medians, by_id = v2
    cls_id, eos_id = tokens["<cls>"], tokens["<eos>"]
    ref = tokenize_reference(
        X, ensembl, n_counts, tokens, medians, model_input_size=4096, special_token=True
    )
    for tie_break in ("official", "deterministic"):
        ours = tokenize_geneformer(
            X, gene_ids, by_id, max_len=4096, cls_id=cls_id, eos_id=eos_id, tie_break=tie_break
        )
        _assert_equal_rows(ours, ref)
    assert ours.lengths.max() == 4096 and (ours.n_genes > 4094).any()
    assert (ours.input_ids[:, 0] == cls_id).all()
    assert (ours.input_ids[np.arange(len(ours)), ours.lengths - 1] == eos_id).all()


def test_ties_official_exact_and_deterministic_by_token(bench, v2):
    """Medians rounded to 0.1 make many exact ties, also across the truncation cut."""
    X, ensembl, n_counts, gene_ids = bench
    X, n_counts = X[::3], n_counts[::3]
    tokens, medians, by_id = v2
    medians = {g: round(m, 1) for g, m in medians.items()}
    by_id = np.round(by_id, 1)
    cls_id, eos_id = tokens["<cls>"], tokens["<eos>"]
    for max_len, special in ((2048, False), (1000, True)):
        ids = {"cls_id": cls_id, "eos_id": eos_id} if special else {}
        ref = tokenize_reference(
            X, ensembl, n_counts, tokens, medians, model_input_size=max_len, special_token=special
        )
        official = tokenize_geneformer(
            X, gene_ids, by_id, max_len=max_len, tie_break="official", **ids
        )
        _assert_equal_rows(official, ref)
        det = tokenize_geneformer(X, gene_ids, by_id, max_len=max_len, **ids)
        np.testing.assert_array_equal(det.lengths, official.lengths)
        values = _full_values(X, ensembl, n_counts, tokens, medians, len(by_id))
        n_tied_cells = 0
        for i, row_values in enumerate(values):
            body = slice(1, -1) if special else slice(None)
            d, r = det.input_ids[i, : det.lengths[i]][body], ref[i][body]
            # same value sequence: the two orders differ only within tied groups ...
            np.testing.assert_array_equal(row_values[d], row_values[r])
            # ... and the deterministic one is (-value, token id) over all the cell's genes
            detected = np.flatnonzero(~np.isnan(row_values))
            expected = detected[np.lexsort((detected, -row_values[detected]))][: len(d)]
            np.testing.assert_array_equal(d, expected)
            n_tied_cells += len(np.unique(row_values[d])) < len(d)
            if not np.array_equal(d, r):  # a tied group reordered: same tokens above the cut
                above = row_values[d] > row_values[d][-1]
                assert set(d[above]) == set(r[above])
        assert n_tied_cells > len(values) // 2


def test_nearly_equal_values_are_ordered_exactly(bench, v1):
    """Values one ulp apart, against token order: ranked by value, not by their key bits."""
    X, ensembl, n_counts, gene_ids = bench
    X, n_counts = X[:40], n_counts[:40]
    tokens, medians, by_id = v1
    near = by_id.copy()
    near[3::2] = np.nextafter(by_id[2:-1:2], 0)  # token 2j+1 just below token 2j
    near_dict = {g: float(near[t]) for g, t in tokens.items() if g in medians}
    values = _full_values(X, ensembl, n_counts, tokens, near_dict, len(near))
    for max_len in (2048, 30_000):
        det = tokenize_geneformer(X, gene_ids, near, n_counts=n_counts, max_len=max_len)
        n_close = 0
        for i, row_values in enumerate(values):
            detected = np.flatnonzero(~np.isnan(row_values))
            order = detected[np.lexsort((detected, -row_values[detected]))][:max_len]
            np.testing.assert_array_equal(det.input_ids[i, : det.lengths[i]], order)
            gaps = np.diff(row_values[order])
            n_close += np.sum((gaps < 0) & (gaps > -1e-12 * row_values[order][1:]))
        assert n_close > 100  # many neighbours closer than the keys can tell apart


def test_duplicate_ids_are_summed_in_official_order(bench, v1):
    """Alias IDs mapped to the same gene: summed, placed after the other genes (official)."""
    X, ensembl, n_counts, base_ids = bench
    X, n_counts = X[::2], n_counts[::2]
    tokens, medians, by_id = v1
    rng = np.random.default_rng(0)
    in_vocab = np.flatnonzero([e in tokens for e in ensembl])
    split = np.sort(rng.choice(in_vocab, 40, replace=False))
    # Move about half of each chosen gene's counts to a new alias column at the end.
    part = X[:, split].toarray()
    moved = np.floor(part * rng.random(part.shape))
    dense = X.toarray()
    dense[:, split] -= moved
    X_dup = sp.csr_matrix(np.hstack([dense, moved]).astype(np.float32))
    aliases = [f"ENSGALIAS{j:05d}" for j in range(len(split))]
    ids_dup = np.concatenate([ensembl, aliases])
    mapping = {g: g for g in tokens} | dict(zip(aliases, ensembl[split], strict=True))
    vocab = GeneVocab(tokens, pad_token="<pad>", cls_token=None)
    canonical = np.array([mapping.get(g, g) for g in ids_dup])
    gene_ids = match_genes(canonical, vocab, keep_duplicates=True).token_ids
    assert (np.bincount(gene_ids[gene_ids >= 0]) == 2).sum() == len(split)

    ref = tokenize_reference(X_dup, ids_dup, n_counts, tokens, medians, gene_mapping=mapping)
    ours = tokenize_geneformer(X_dup, gene_ids, by_id, n_counts=n_counts, tie_break="official")
    _assert_equal_rows(ours, ref)
    # Summing restores the original counts: the default output equals the undivided data's.
    det = tokenize_geneformer(X_dup, gene_ids, by_id, n_counts=n_counts)
    base = tokenize_geneformer(X, base_ids, by_id, n_counts=n_counts)
    np.testing.assert_array_equal(det.input_ids, base.input_ids)
    np.testing.assert_array_equal(det.n_genes, base.n_genes)
    lengths = geneformer_sequence_lengths(X_dup, gene_ids, max_len=2048)
    np.testing.assert_array_equal(lengths, det.lengths)


# ----------------------------------------------------------------------------- invariances
def test_column_and_cell_order_invariance(bench, v1):
    X, _, n_counts, gene_ids = bench
    by_id = np.round(v1[2], 1)  # with ties
    base = tokenize_geneformer(X, gene_ids, by_id)
    perm = np.random.default_rng(1).permutation(X.shape[1])
    permuted = tokenize_geneformer(X[:, perm], gene_ids[perm], by_id)
    np.testing.assert_array_equal(permuted.input_ids, base.input_ids)
    # every cell gets the same tokens whatever else is in its batch
    cells = np.random.default_rng(2).permutation(X.shape[0])[:100]
    part = tokenize_geneformer(X[cells], gene_ids, by_id, n_counts=n_counts[cells])
    for j, i in enumerate(cells):
        np.testing.assert_array_equal(
            part.input_ids[j, : part.lengths[j]], base.input_ids[i, : base.lengths[i]]
        )


def test_blocks_dense_and_other_formats_agree(bench, v1, monkeypatch):
    X, _, _, gene_ids = bench
    X, by_id = X[:60], np.round(v1[2], 1)
    base = tokenize_geneformer(X, gene_ids, by_id, max_len=500)
    monkeypatch.setattr(rank_module, "_BLOCK_ELEMENTS", 20_000)  # many small padded blocks
    blocked = tokenize_geneformer(X, gene_ids, by_id, max_len=500)
    np.testing.assert_array_equal(blocked.input_ids, base.input_ids)
    before = X.copy()
    for other in (X.toarray(), X.tocsc(), X.tocoo(), X.astype(np.int64)):
        np.testing.assert_array_equal(
            tokenize_geneformer(other, gene_ids, by_id, max_len=500).input_ids, base.input_ids
        )
    assert (X != before).nnz == 0  # input untouched


def test_truncation(bench, v1):
    X, _, _, gene_ids = bench
    X, by_id = X[:50], v1[2]
    full = tokenize_geneformer(X, gene_ids, by_id, max_len=30_000)
    assert (full.lengths == full.n_genes).all()
    for max_len in (1, 7, 2048):
        short = tokenize_geneformer(X, gene_ids, by_id, max_len=max_len)
        np.testing.assert_array_equal(short.lengths, np.minimum(full.n_genes, max_len))
        np.testing.assert_array_equal(
            short.input_ids, full.input_ids[:, : short.input_ids.shape[1]]
        )
        special = tokenize_geneformer(X, gene_ids, by_id, max_len=max_len + 2, cls_id=7, eos_id=9)
        np.testing.assert_array_equal(special.input_ids[:, 0], 7)
        for i in range(len(short)):
            row = special.input_ids[i, : special.lengths[i]]
            np.testing.assert_array_equal(row[1:-1], short.input_ids[i, : short.lengths[i]])
            assert row[-1] == 9
        np.testing.assert_array_equal(
            geneformer_sequence_lengths(X, gene_ids, max_len=max_len + 2, special_tokens=True),
            special.lengths,
        )


def test_empty_cells_are_kept(bench, v1):
    X, _, _, gene_ids = bench
    outside = np.flatnonzero(gene_ids < 0)[:3]
    only_outside = np.zeros((1, X.shape[1]), dtype=np.float32)
    only_outside[0, outside] = [4, 1, 2]
    X_e = sp.vstack(
        [sp.csr_matrix((1, X.shape[1]), dtype=np.float32), X[:3], sp.csr_matrix(only_outside)]
    ).tocsr()
    v1_tokens = tokenize_geneformer(X_e, gene_ids, v1[2])
    np.testing.assert_array_equal(v1_tokens.n_genes[[0, 4]], 0)
    np.testing.assert_array_equal(v1_tokens.lengths[[0, 4]], 0)
    assert (v1_tokens.input_ids[[0, 4]] == 0).all()
    np.testing.assert_array_equal(v1_tokens.empty, [True, False, False, False, True])
    v2_tokens = tokenize_geneformer(X_e, gene_ids, v1[2], cls_id=5, eos_id=6, pad_id=3)
    np.testing.assert_array_equal(v2_tokens.lengths[[0, 4]], 2)
    np.testing.assert_array_equal(v2_tokens.input_ids[0, :3], [5, 6, 3])
    np.testing.assert_array_equal(v2_tokens.attention_mask[0, :3], [1, 1, 0])
    # all cells empty
    none = tokenize_geneformer(sp.csr_matrix((2, X.shape[1])), gene_ids, v1[2])
    assert none.input_ids.shape == (2, 0) and (none.n_genes == 0).all()


def test_n_counts_include_genes_outside_the_vocabulary(bench, v1):
    X, _, n_counts, gene_ids = bench
    X, n_counts, by_id = X[:40], n_counts[:40], v1[2]
    assert (gene_ids < 0).any()
    default = tokenize_geneformer(X, gene_ids, by_id, tie_break="official")
    explicit = tokenize_geneformer(X, gene_ids, by_id, n_counts=n_counts, tie_break="official")
    np.testing.assert_array_equal(default.input_ids, explicit.input_ids)
    # Only the vocabulary columns, with the totals of the full matrix: the same tokens.
    inside = np.flatnonzero(gene_ids >= 0)
    sub = tokenize_geneformer(X[:, inside], gene_ids[inside], by_id, n_counts=n_counts)
    np.testing.assert_array_equal(sub.input_ids, explicit.input_ids)
    with pytest.raises(ValueError, match="smaller than the cell's counts"):
        tokenize_geneformer(X, gene_ids, by_id, n_counts=n_counts / 100)


# ----------------------------------------------------------------------------- validation
def test_bad_input_raises(bench, v1):
    X, _, _, gene_ids = bench
    X, by_id = X[:5], v1[2]
    for bad_value, match in ((-1.0, "negative"), (np.nan, "NaN"), (np.inf, "infinite")):
        bad = X.copy()
        bad.data[0] = bad_value
        with pytest.raises(ValueError, match=match):
            tokenize_geneformer(bad, gene_ids, by_id)
        with pytest.raises(ValueError, match=match):
            geneformer_sequence_lengths(bad, gene_ids)
    frac = X.copy()
    frac.data = frac.data * 0.5
    frac.data[frac.data > 0] += 0.25
    with pytest.raises(ValueError, match="non-integer"):
        tokenize_geneformer(frac, gene_ids, by_id)
    assert tokenize_geneformer(frac, gene_ids, by_id, require_integer=False).lengths.min() > 0
    cases = [
        ({"gene_ids": gene_ids[:-1]}, "one entry per column"),
        ({"gene_ids": gene_ids.astype(float)}, "integers"),
        ({"gene_ids": np.where(gene_ids < 0, -2, gene_ids)}, ">= 0, or -1"),
        ({"gene_ids": np.where(gene_ids == gene_ids.max(), 0, gene_ids)}, "no positive finite"),
        ({"medians": by_id[:100]}, "only 100 entries"),
        ({"cls_id": 2}, "both cls_id and eos_id"),
        ({"cls_id": 2, "eos_id": 3, "max_len": 2}, "max_len must be an integer >= 3"),
        ({"max_len": 0}, "max_len must be an integer >= 1"),
        ({"tie_break": "random"}, "tie_break"),
        ({"n_counts": np.ones(3)}, "one total per cell"),
        ({"n_counts": np.zeros(5)}, "finite and positive"),
    ]
    for kwargs, match in cases:
        args = {"gene_ids": gene_ids, "medians": by_id, **kwargs}
        with pytest.raises(ValueError, match=match):
            tokenize_geneformer(X, args.pop("gene_ids"), args.pop("medians"), **args)
    with pytest.raises(ValueError, match="2-D"):
        tokenize_geneformer(np.ones(3), gene_ids[:3], by_id)
