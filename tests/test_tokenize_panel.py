from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

import cellformers as cf
from cellformers.tokenize import panel_columns, tokenize_scbert


@pytest.fixture(scope="module")
def cellbench_panel():
    """CellBench counts, a panel of 1,500 of its genes (shuffled) plus 20 absent genes."""
    adata = cf.data.cellbench_2platform()
    rng = np.random.default_rng(1)
    symbols = adata.var["gene_symbol"].astype(str).to_numpy()
    named = np.flatnonzero(symbols != "")
    genes = list(symbols[rng.choice(named, 1500, replace=False)])
    genes += [f"ABSENT_{i}" for i in range(20)]
    panel = list(rng.permutation(genes))
    return adata, panel


def _reference(X, data_genes, panel, n_bins=5):
    """The official pipeline cell by cell: preprocess.py (scanpy), then the per-cell binning."""
    import anndata as ad
    import scanpy as sc

    obj = list(data_genes)
    counts = sp.lil_matrix((X.shape[0], len(panel)), dtype=np.float32)
    for i, gene in enumerate(panel):
        if gene in obj:
            counts[:, i] = X[:, obj.index(gene)].toarray()
    new = ad.AnnData(X=counts.tocsr())
    sc.pp.normalize_total(new, target_sum=1e4)
    sc.pp.log1p(new, base=2)
    rows = []
    for r in range(new.n_obs):
        x = new.X[r].toarray()[0]
        x[x > n_bins] = n_bins
        rows.append(np.concatenate([x.astype(np.int64), [0]]))
    return np.stack(rows)


def _panel_ids(data_genes, panel):
    where = {g: i for i, g in enumerate(panel)}
    return np.array([where.get(g, -1) for g in data_genes], dtype=np.int64)


def test_matches_the_official_pipeline_on_cellbench(cellbench_panel):
    adata, panel = cellbench_panel
    X = adata.X[:120]
    genes = adata.var["gene_symbol"].astype(str).to_numpy()
    ids = _panel_ids(genes, panel)
    tokens = tokenize_scbert(X, ids, n_genes=len(panel))
    expected = _reference(X, genes, panel)
    assert tokens.shape == (120, len(panel) + 1) and tokens.dtype == np.int64
    np.testing.assert_array_equal(tokens, expected)
    assert set(np.unique(tokens)) <= set(range(6)) and (tokens[:, -1] == 0).all()
    assert (tokens == 5).any() and (tokens == 1).any()


def test_duplicate_columns_keep_the_first(cellbench_panel):
    adata, panel = cellbench_panel
    X = sp.csr_matrix(adata.X[:30])
    genes = adata.var["gene_symbol"].astype(str).to_numpy().copy()
    # two more columns named like panel genes already in the data: the first column wins
    j0 = int(np.flatnonzero(genes == panel[0])[0])
    j1 = int(np.flatnonzero(genes == panel[1])[0])
    extra = sp.csr_matrix(np.asarray(X[:, [j1, j0]].todense()) * 3 + 1)
    X2 = sp.hstack([X, extra]).tocsr()
    genes2 = np.concatenate([genes, [panel[0], panel[1]]])
    tokens = tokenize_scbert(X2, _panel_ids(genes2, panel), n_genes=len(panel))
    np.testing.assert_array_equal(tokens, _reference(X2, genes2, panel))
    np.testing.assert_array_equal(
        tokens, tokenize_scbert(X, _panel_ids(genes, panel), n_genes=len(panel))
    )


def test_dense_input_normalize_false_and_bins():
    X = np.array([[0.0, 0.99, 1.0, 4.5, 7.0], [2.0, 0.0, 0.0, 0.0, 0.0]])
    ids = np.array([2, 0, 1, -1, 3])
    out = tokenize_scbert(X, ids, n_genes=4, normalize=False)
    np.testing.assert_array_equal(out, [[0, 1, 0, 5, 0], [0, 0, 2, 0, 0]])
    out3 = tokenize_scbert(X, ids, n_genes=4, normalize=False, n_bins=3)
    np.testing.assert_array_equal(out3, [[0, 1, 0, 3, 0], [0, 0, 2, 0, 0]])
    # a cell whose counts lie outside the panel stays all zeros
    counts = sp.csr_matrix(np.array([[0, 0, 0, 5, 0], [10, 0, 0, 0, 0]]))
    out = tokenize_scbert(counts, ids, n_genes=4)
    np.testing.assert_array_equal(out[0], 0)
    assert out[1, 2] == 5  # all 10,000 CP10k on one gene: log2(10001) > 5


def test_validation():
    X = sp.csr_matrix(np.ones((2, 3)))
    with pytest.raises(ValueError, match="one panel position"):
        tokenize_scbert(X, np.array([0, 1]), n_genes=3)
    with pytest.raises(ValueError, match=r"\[-1, 3\)"):
        tokenize_scbert(X, np.array([0, 1, 3]), n_genes=3)
    with pytest.raises(TypeError, match="integer"):
        tokenize_scbert(X, np.array([0.0, 1.0, 2.0]), n_genes=3)
    with pytest.raises(ValueError, match="negative"):
        tokenize_scbert(-X, np.array([0, 1, 2]), n_genes=3)
    with pytest.raises(ValueError, match="NaN"):
        tokenize_scbert(X * np.nan, np.array([0, 1, 2]), n_genes=3)
    np.testing.assert_array_equal(panel_columns(np.array([1, -1, 1, 0]), 2), [1, -1, -1, 0])
