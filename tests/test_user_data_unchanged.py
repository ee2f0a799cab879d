"""No public call changes the user's AnnData beyond its documented outputs.

A deep snapshot (X, layers, obs with dtypes, var, obsm, uns, names, whether it is a view) is
taken before and after every public call of each model class and of ``cf.tl``. Allowed
changes are listed explicitly per call: the scvi-tools registry fields (``uns['_scvi_*']``,
``obs['_scvi_*']``) that registering an AnnData (``setup_anndata``, or using an AnnData that
was not set up as a query) documents, and each function's documented outputs.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import scvi
from tiny_models import CLASSES, FIT, cellbench_cells, class_id, setup, tiny_kwargs

import cellformers as cf

REGISTRY = "_scvi_"


def _frozen(value):
    """A deep, comparable copy of an AnnData slot value."""
    if isinstance(value, dict):
        return {k: _frozen(v) for k, v in value.items()}
    if isinstance(value, pd.DataFrame | pd.Series):
        return value.copy(deep=True)
    if sp.issparse(value):
        return value.copy()
    if isinstance(value, np.ndarray):
        return value.copy()
    return value


def _snapshot(adata) -> dict:
    return {
        "is_view": adata.is_view,
        "obs_names": list(adata.obs_names),
        "var_names": list(adata.var_names),
        "X": _frozen(adata.X),
        "layers": {k: _frozen(v) for k, v in adata.layers.items()},
        "obs": adata.obs.copy(deep=True),
        "var": adata.var.copy(deep=True),
        "obsm": {k: _frozen(v) for k, v in adata.obsm.items()},
        "uns": _frozen(dict(adata.uns)),
    }


def _assert_equal(a, b, where: str) -> None:
    assert type(a) is type(b), where
    if isinstance(a, dict):
        assert sorted(a) == sorted(b), where
        for k in a:
            _assert_equal(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, pd.DataFrame):
        pd.testing.assert_frame_equal(a, b, check_exact=True, obj=where)
    elif isinstance(a, pd.Series):
        pd.testing.assert_series_equal(a, b, check_exact=True, obj=where)
    elif sp.issparse(a):
        assert a.format == b.format and a.dtype == b.dtype, where
        assert (a != b).nnz == 0, where
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype, where
        np.testing.assert_array_equal(a, b, err_msg=where)
    else:
        assert a == b, where


def _check_unchanged(adata, before: dict, *, obs=(), obsm=(), uns=(), registry=False) -> None:
    """Compare ``adata`` with ``before``, ignoring the named outputs (and registry fields)."""
    after = _snapshot(adata)
    drop = {"obs": set(obs), "obsm": set(obsm), "uns": set(uns)}
    for snap in (before, after):
        for slot in ("obs", "obsm", "uns"):
            keys = [
                k
                for k in snap[slot]
                if k in drop[slot] or (registry and str(k).startswith(REGISTRY))
            ]
            if slot == "obs":
                snap[slot] = snap[slot].drop(columns=keys)
            else:
                snap[slot] = {k: v for k, v in snap[slot].items() if k not in keys}
    for slot in before:
        _assert_equal(before[slot], after[slot], slot)


def _call(adata, fn, **allowed):
    before = _snapshot(adata)
    result = fn()
    _check_unchanged(adata, before, **allowed)
    return result


@pytest.fixture(scope="module")
def cells():
    """40 CellBench cells and their 200 most detected genes, with a string obs column."""
    adata = cellbench_cells(seed=1)
    rng = np.random.default_rng(1)
    adata.obs["note"] = ["a", "b"] * (adata.n_obs // 2)  # strings anndata would categorise
    adata.layers["counts"] = adata.X.copy()
    adata.obsm["X_other"] = rng.normal(size=(adata.n_obs, 3)).astype(np.float32)
    adata.uns["user"] = {"kept": np.arange(3)}
    return adata


@pytest.mark.parametrize("cls", CLASSES, ids=class_id)
def test_model_calls_leave_the_data_alone(cells, cls, tmp_path):
    adata = cells.copy()
    _call(
        adata,
        lambda: setup(cls, adata, layer="counts", labels_key="cell_line", batch_key="batch"),
        registry=True,
    )
    scvi.settings.seed = 0
    model = _call(adata, lambda: cls(adata, **tiny_kwargs(cls)))
    _call(adata, lambda: model.train(mode="finetune", **FIT))
    _call(adata, lambda: model.get_latent_representation())
    _call(adata, lambda: model.predict_celltype())

    query = cells.copy()  # not set up: used as a query, it gets registry fields
    _call(query, lambda: model.get_latent_representation(query), registry=True)
    _call(query, lambda: model.predict_celltype(query, soft=True), registry=True)
    gene = str(model._gene_names(query)[0])
    _call(query, lambda: model.perturb(query, genes=[gene]), registry=True)

    view = cells[5:25]
    _call(view, lambda: model.get_latent_representation(view))  # stays a view, untouched
    _call(view, lambda: model.predict_celltype(view))

    _call(adata, lambda: model.save(tmp_path / "model", save_anndata=True))

    annotated = cells.copy()
    _call(
        annotated,
        lambda: cf.tl.annotate(annotated, model),
        obs=["cf_celltype", "cf_celltype_probability"],
        registry=True,
    )
    reference = cells.copy()
    reference.obsm["X_emb"] = model.get_latent_representation(reference)
    target = cells.copy()
    before = _snapshot(reference)
    _call(
        target,
        lambda: cf.tl.transfer_labels(
            target, reference, label_key="cell_line", use_rep="X_emb", model=model
        ),
        obs=["transferred_label", "transferred_label_confidence"],
        obsm=["X_emb"],
        registry=True,
    )
    _check_unchanged(reference, before)


def test_tl_functions_leave_the_data_alone():
    adata = cf.data.cellbench_2platform()[::4].copy()  # 113 cells
    rng = np.random.default_rng(0)
    adata.obsm["X_emb"] = rng.normal(size=(adata.n_obs, 8)).astype(np.float32)
    adata.obsm["X_pre"] = rng.normal(size=(adata.n_obs, 8)).astype(np.float32)
    adata.obs["note"] = np.where(np.arange(adata.n_obs) % 2, "a", "b").astype(object)
    _call(
        adata,
        lambda: cf.tl.evaluate_integration(
            adata,
            "X_emb",
            batch_key="batch",
            label_key="cell_line",
            pre_integrated_key="X_pre",
            neighbors="exact",
            key_added="scores",
        ),
        uns=["scores"],
    )

    screen = cf.data.papalexi_eccite_lowmoi()[::16].copy()
    screen.obs["note"] = np.where(np.arange(screen.n_obs) % 2, "a", "b").astype(object)
    args = {"perturbation_key": "perturbation", "control_label": "non-targeting"}
    means = _call(screen, lambda: cf.tl.perturbation_means(screen, **args))
    _call(
        screen,
        lambda: cf.tl.perturbation_baseline(screen, test_perturbations=["STAT1"], **args),
    )
    assert means.n_obs == screen.obs["perturbation"].nunique()
