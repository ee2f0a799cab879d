from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scvi

import cellformers as cf
from cellformers.model import SCBERT

TINY = {"dim": 16, "depth": 2, "heads": 2, "dim_head": 8, "classifier_hidden": (32, 16)}


@pytest.fixture(scope="module")
def trained():
    adata = cf.data.cellbench_2platform()
    rng = np.random.default_rng(2)
    adata = adata[np.sort(rng.choice(adata.n_obs, 80, replace=False))].copy()
    detected = np.asarray((adata.X > 0).mean(0)).ravel()
    adata = adata[:, np.argsort(-detected, kind="stable")[:200]].copy()
    ref = adata.copy()
    SCBERT.setup_anndata(ref, labels_key="cell_line")
    scvi.settings.seed = 0
    model = SCBERT(ref, n_labels=3, **TINY)
    model.train(max_epochs=2, batch_size=16, mode="finetune", enable_progress_bar=False)
    return model, adata


def test_annotate_writes_labels_and_probabilities(trained):
    model, adata = trained
    query = adata.copy()
    expected = model.predict_celltype(query.copy(), soft=True)
    out = cf.tl.annotate(query, model, key_added="pred", store_probabilities=True, copy=True)
    assert "pred" not in query.obs  # copy=True leaves the input alone
    assert isinstance(out.obs["pred"].dtype, pd.CategoricalDtype)
    np.testing.assert_array_equal(out.obs["pred"].astype(str), expected.idxmax(axis=1))
    np.testing.assert_allclose(out.obs["pred_probability"], expected.max(axis=1), rtol=1e-6)
    np.testing.assert_allclose(out.obsm["pred_probabilities"].to_numpy(), expected.to_numpy())
    assert cf.tl.annotate(query, model, unknown_threshold=1.0) is None
    assert (query.obs["cf_celltype"] == "Unassigned").all()


def test_annotate_query_without_labels_and_other_genes(trained):
    model, adata = trained
    query = adata[:, ::-1].copy()  # other gene order
    del query.obs["cell_line"]
    cf.tl.annotate(query, model)
    same = adata.copy()
    del same.obs["cell_line"]  # registered genes, no label column
    cf.tl.annotate(same, model)
    np.testing.assert_array_equal(query.obs["cf_celltype"], same.obs["cf_celltype"])


def test_annotate_bad_input(trained):
    model, adata = trained
    with pytest.raises(TypeError, match="AnnData"):
        cf.tl.annotate(adata.X, model)
    with pytest.raises(TypeError, match="predict_celltype"):
        cf.tl.annotate(adata, object())
    with pytest.raises(ValueError, match="unknown_threshold"):
        cf.tl.annotate(adata, model, unknown_threshold=2)
