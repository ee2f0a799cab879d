"""Cells without counts in the model's genes: one shared behaviour for every model class."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import scvi
from tiny_models import TINY, cellbench_cells

from cellformers.model import SCBERT, SCGPT, Geneformer, SCFoundation

MODELS = {"scbert": SCBERT, "scgpt": SCGPT, "geneformer": Geneformer, "scfoundation": SCFoundation}
EMPTY = [2, 7]


@pytest.fixture(scope="module")
def cells():
    return cellbench_cells(24, 120)


def _with_empty_cells(cells):
    """A copy of ``cells`` where the cells at ``EMPTY`` have no counts (as empty spots)."""
    adata = cells.copy()
    X = adata.X.toarray()
    X[EMPTY] = 0
    adata.X = sp.csr_matrix(X)
    return adata


@pytest.fixture(scope="module", params=list(MODELS))
def trained(request, cells):
    cls = MODELS[request.param]
    adata = cells.copy()
    cls.setup_anndata(adata)
    scvi.settings.seed = 0
    model = cls(adata, **TINY[cls])
    model.train(max_epochs=1, batch_size=8, enable_progress_bar=False)
    return model


def test_inference_names_empty_cells_or_gives_nan_rows(trained, cells):
    query = _with_empty_cells(cells)
    type(trained).setup_anndata(query)
    names = list(query.obs_names[EMPTY])
    with pytest.raises(ValueError, match=rf"2 cell\(s\) have no counts.*{names[0]}, {names[1]}"):
        trained.get_latent_representation(query)
    with pytest.warns(UserWarning, match=names[0]):
        emb = trained.get_latent_representation(query, empty_cells="nan", batch_size=5)
    assert np.isnan(emb[EMPTY]).all()
    others = np.setdiff1d(np.arange(query.n_obs), EMPTY)
    assert np.isfinite(emb[others]).all()
    np.testing.assert_allclose(
        emb[others], trained.get_latent_representation(query, indices=others), atol=1e-5
    )
    with pytest.raises(ValueError, match="empty_cells must be one of"):
        trained.get_latent_representation(query, empty_cells="skip")
    # indices that leave the empty cells out need no option
    assert np.isfinite(trained.get_latent_representation(query, indices=others[:3])).all()


def test_training_refuses_empty_cells_before_any_work(cells):
    for cls in MODELS.values():
        adata = _with_empty_cells(cells)
        cls.setup_anndata(adata)
        model = cls(adata, **TINY[cls])
        with pytest.raises(ValueError, match=rf"{adata.obs_names[EMPTY[0]]}.*cannot train"):
            model.train(max_epochs=1, enable_progress_bar=False)
        assert not model.is_trained_


def test_predict_and_perturb_follow_empty_cells(cells):
    adata = cells.copy()
    SCBERT.setup_anndata(adata, labels_key="cell_line")
    scvi.settings.seed = 0
    model = SCBERT(adata, **TINY[SCBERT], classifier_hidden=(16, 8))
    model.train(mode="finetune", max_epochs=1, batch_size=8, enable_progress_bar=False)
    query = _with_empty_cells(cells)
    SCBERT.setup_anndata(query)
    with pytest.raises(ValueError, match=query.obs_names[EMPTY[0]]):
        model.predict_celltype(query)
    with pytest.warns(UserWarning, match="no counts"):
        labels = model.predict_celltype(query, empty_cells="nan")
    assert all(isinstance(v, float) and np.isnan(v) for v in labels[EMPTY])
    assert set(np.delete(labels, EMPTY)) <= set(adata.obs["cell_line"])
    with pytest.warns(UserWarning, match="no counts"):
        probs = model.predict_celltype(query, soft=True, empty_cells="nan")
    assert (
        probs.iloc[EMPTY].isna().all().all() and probs.drop(probs.index[EMPTY]).notna().all().all()
    )
    gene = query.var_names[0]
    with pytest.raises(ValueError, match=query.obs_names[EMPTY[1]]):
        model.perturb(query, genes=[gene])
    with pytest.warns(UserWarning, match="no counts"):
        out = model.perturb(query, genes=[gene], empty_cells="nan")
    assert np.isnan(out.X[EMPTY]).all() and not out.layers["changed"][EMPTY].any()
    assert np.isfinite(np.delete(out.X, EMPTY, axis=0)).all()
    # a deletion that leaves a cell without counts gives that cell NaN, not an error
    lonely = cells.copy()
    X = lonely.X.toarray()
    X[0, 1:] = 0
    X[0, 0] = 5
    lonely.X = sp.csr_matrix(X)
    SCBERT.setup_anndata(lonely)
    out = model.perturb(lonely, genes=[gene])
    assert np.isnan(out.X[0, 0]) and out.layers["changed"][0, 0]
    assert np.isfinite(out.var["mean_shift"]).all()
