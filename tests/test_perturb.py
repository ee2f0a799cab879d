"""The shared in-silico perturbation (model.perturb) of the model base, and perturb_counts."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import scvi

import cellformers as cf
from cellformers.model import SCBERT, SCGPT, SCFoundation
from cellformers.tokenize import perturb_counts

SCBERT_TINY = {"dim": 16, "depth": 2, "heads": 2, "dim_head": 8}
SCGPT_TINY = {"d_model": 32, "nhead": 4, "d_hid": 32, "nlayers": 2, "dropout": 0.0}
SCF_TINY = {
    "encoder_dim": 32,
    "encoder_depth": 2,
    "encoder_heads": 4,
    "encoder_d_hid": 64,
    "decoder_dim": 24,
    "decoder_depth": 2,
    "decoder_heads": 2,
    "decoder_dim_head": 12,
    "decoder_nb_features": 16,
}


def test_perturb_counts_modes():
    X = sp.csr_matrix(np.array([[0, 3, 1], [2, 0, 0], [0, 0, 0]], dtype=np.float32))
    Y, changed = perturb_counts(X, [1], "delete")
    np.testing.assert_array_equal(Y.toarray(), [[0, 0, 1], [2, 0, 0], [0, 0, 0]])
    np.testing.assert_array_equal(changed, [True, False, False])
    Y, changed = perturb_counts(X, [0, 1], "knockdown", 0.5)
    np.testing.assert_array_equal(Y.toarray(), [[0, 1.5, 1], [1, 0, 0], [0, 0, 0]])
    np.testing.assert_array_equal(changed, [True, True, False])
    Y, changed = perturb_counts(X, [1], "overexpress")
    np.testing.assert_array_equal(Y.toarray(), [[0, 6, 1], [2, 4, 0], [0, 0, 0]])
    np.testing.assert_array_equal(changed, [True, True, False])
    Y, changed = perturb_counts(X, [], "delete")
    assert (Y != X).nnz == 0 and not changed.any()
    assert X[0, 1] == 3  # input untouched
    with pytest.raises(ValueError, match="knockdown factor"):
        perturb_counts(X, [1], "knockdown", 1.5)
    with pytest.raises(ValueError, match="mode"):
        perturb_counts(X, [1], "activate")


@pytest.fixture(scope="module")
def cells():
    adata = cf.data.cellbench_2platform()
    rng = np.random.default_rng(3)
    adata = adata[np.sort(rng.choice(adata.n_obs, 30, replace=False))].copy()
    detected = np.asarray((adata.X > 0).mean(0)).ravel()
    order = np.argsort(-detected, kind="stable")
    return adata[:, np.r_[order[:150], order[2000:2050]]].copy()  # some rarely detected genes


def _trained(cls, cells, **kwargs):
    adata = cells.copy()
    cls.setup_anndata(adata)
    scvi.settings.seed = 0
    model = cls(adata, **kwargs)
    model.train(max_epochs=1, batch_size=10, enable_progress_bar=False)
    return model, adata


@pytest.mark.parametrize(
    "cls, kwargs", [(SCBERT, SCBERT_TINY), (SCFoundation, SCF_TINY), (SCGPT, SCGPT_TINY)]
)
def test_perturb_is_the_embedding_of_the_edited_cell(cells, cls, kwargs):
    model, adata = _trained(cls, cells, **kwargs)
    X = adata.X.toarray()
    expressed = adata.var_names[X[0] > 0][0]
    absent = adata.var_names[(X == 0).sum(0).argmax()]
    out = model.perturb(genes=[expressed, absent, (), (expressed, absent)], batch_size=7)
    assert list(out.var_names) == [expressed, absent, "control", f"{expressed}+{absent}"]
    assert out.shape == (adata.n_obs, 4)
    # the control and cells not expressing a deleted gene: exactly 0
    assert (out.X[:, 2] == 0).all() and not out.layers["changed"][:, 2].any()
    unexpressed = X[:, adata.var_names.get_loc(absent)] == 0
    assert (out.X[unexpressed, 1] == 0).all()
    # a deletion equals embedding the cell with that gene's counts removed
    edited = adata.copy()
    edited.X = sp.csr_matrix(np.where(adata.var_names == expressed, 0, X).astype(np.float32))
    cls.setup_anndata(edited)
    a = model.get_latent_representation(adata)
    b = model.get_latent_representation(edited)
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    changed = out.layers["changed"][:, 0]
    np.testing.assert_allclose(out.X[changed, 0], 1 - cos[changed], atol=1e-5)
    assert (out.X[changed, 0] > 0).all()
    # batch-size invariance and cell subsets
    again = model.perturb(genes=[expressed], indices=[5, 0, 3], batch_size=1)
    np.testing.assert_allclose(again.X[:, 0], out.X[[5, 0, 3], 0], atol=1e-6)
    assert list(again.obs_names) == list(adata.obs_names[[5, 0, 3]])
    np.testing.assert_allclose(out.var["n_cells_changed"], out.layers["changed"].sum(0))


def test_decoder_models_report_expression_change(cells):
    model, adata = _trained(SCFoundation, cells, **SCF_TINY)
    gene = adata.var_names[0]
    out = model.perturb(genes=[gene, ()], mode="delete")
    change = out.varm["expression_change"]
    assert list(change.columns) == list(adata.var_names)
    assert (change.loc["control"] == 0).all()
    base = model.get_normalized_expression(all_genes=False)
    changed = out.layers["changed"][:, 0]
    # the deleted gene's own prediction is 0 in the changed cells
    expected_own = -(base[gene].to_numpy() * changed).mean()
    np.testing.assert_allclose(change.loc[gene, gene], expected_own, rtol=1e-5)
    up = model.perturb(genes=[gene], mode="overexpress")
    assert np.isfinite(up.varm["expression_change"].to_numpy()).all()


def test_perturb_errors(cells):
    model, adata = _trained(SCBERT, cells, **SCBERT_TINY)
    with pytest.raises(ValueError, match="not in the data's genes.*NOPE1"):
        model.perturb(genes=["NOPE1", adata.var_names[0]])
    with pytest.raises(ValueError, match="Pass the perturbations"):
        model.perturb(genes=[])
    with pytest.raises(ValueError, match="twice"):
        model.perturb(genes=[adata.var_names[0], adata.var_names[0]])
    with pytest.raises(ValueError, match="mode"):
        model.perturb(genes=[adata.var_names[0]], mode="activate")
    with pytest.raises(ValueError, match="factor"):
        model.perturb(genes=[adata.var_names[0]], mode="knockdown", factor=2)


def test_scgpt_reports_expression_change_of_its_gene_tokens(cells):
    model, adata = _trained(SCGPT, cells, **SCGPT_TINY)
    X = adata.X.toarray()
    gene = adata.var_names[np.argmax((X > 0).sum(0))]
    out = model.perturb(genes=[gene, ()], mode="delete")
    change = out.varm["expression_change"]
    assert (change.loc["control"] == 0).all()
    assert np.isfinite(change.to_numpy()).all()
    predict, genes = model._perturbation_expression(adata)
    base = model._map_cells(adata, None, 16, predict)
    col = list(genes).index(gene)
    changed = out.layers["changed"][:, 0]
    expected = -base[changed, col].mean()  # the deleted gene's prediction becomes 0
    np.testing.assert_allclose(change.loc[gene, gene], expected, rtol=1e-5)
