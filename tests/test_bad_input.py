"""Every entry point of the four model classes gives a clear answer on awkward input.

One tiny model per class, trained from scratch on a few real CellBench cells, meets the same
cases: each either works (and gives the result of the plain input) or raises an error whose
message says what is wrong.
"""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
from tiny_models import CLASSES, FIT, build, cellbench_cells, class_id, setup

import cellformers as cf
from cellformers.model import SCBERT, SCGPT, Geneformer


@pytest.fixture(scope="module")
def cells():
    """40 CellBench cells (both platforms, all 3 lines) and their 200 most detected genes."""
    return cellbench_cells()


@pytest.fixture(scope="module")
def models(cells):
    """One model per class, fine-tuned for an epoch on labels and batches of ``cells``."""
    out = {}
    for cls in CLASSES:
        model = build(cls, cells.copy(), labels_key="cell_line", batch_key="batch")
        model.train(mode="finetune", **FIT)
        out[cls] = model
    return out


def _embed(model, adata):
    return model.get_latent_representation(adata, batch_size=16)


# ---------------------------------------------------------------- expression input
@pytest.mark.parametrize("cls", CLASSES, ids=class_id)
def test_training_on_csc_input(cells, cls):
    adata = cells.copy()
    adata.X = sp.csc_matrix(adata.X)
    model = build(cls, adata)
    model.train(**FIT)
    csr = cells.copy()
    np.testing.assert_allclose(_embed(model, adata), _embed(model, csr), atol=1e-5)


@pytest.mark.parametrize("cls", CLASSES, ids=class_id)
def test_float16_input(cells, cls):
    adata = cells.copy()
    assert adata.X.max() <= 2048  # the counts are exact in float16
    adata.X = adata.X.toarray().astype(np.float16)
    model = build(cls, adata)
    model.train(**FIT)
    np.testing.assert_allclose(_embed(model, adata), _embed(model, cells.copy()), atol=1e-5)


@pytest.mark.parametrize("cls", CLASSES, ids=class_id)
def test_no_cells(cells, models, cls):
    with pytest.raises(ValueError, match="0 cells and 200 genes"):
        setup(cls, cells[:0].copy())
    with pytest.raises(ValueError, match="0 cells and 200 genes"):
        _embed(models[cls], cells[:0].copy())


@pytest.mark.parametrize("cls", CLASSES, ids=class_id)
def test_query_must_be_an_anndata(cells, models, cls):
    with pytest.raises(TypeError, match="Expected an AnnData object, got DataFrame"):
        _embed(models[cls], cells.to_df())


@pytest.mark.parametrize("cls", CLASSES, ids=class_id)
def test_non_integer_query_is_rejected(cells, models, cls):
    query = cells.copy()
    query.X = query.X * 0.5
    with pytest.raises(ValueError, match="non-integer values"):
        _embed(models[cls], query)


# ---------------------------------------------------------------- labels and batches
@pytest.mark.parametrize("cls", CLASSES, ids=class_id)
@pytest.mark.parametrize("key", ["cell_line", "batch"])
def test_missing_labels_are_named(cells, cls, key):
    adata = cells.copy()
    column = adata.obs[key].astype(object)
    column.iloc[3] = np.nan
    adata.obs[key] = column
    role = "labels_key" if key == "cell_line" else "batch_key"
    with pytest.raises(ValueError, match=rf"adata.obs\['{key}'\] \({role}\) has 1 missing"):
        setup(cls, adata, **{role: key})


@pytest.mark.parametrize("cls", CLASSES, ids=class_id)
def test_query_with_new_label_and_batch_categories(cells, models, cls):
    model = models[cls]
    query = cells.copy()
    query.obs["cell_line"] = "a new cell line"
    query.obs["batch"] = "a new platform"
    expected = _embed(model, cells.copy())
    np.testing.assert_allclose(_embed(model, query), expected, atol=1e-5)
    np.testing.assert_array_equal(model.predict_celltype(query), model.predict_celltype())
    if cls is not Geneformer:
        gene = str(model._gene_names(query)[0])
        assert model.perturb(query, genes=[gene]).shape == (query.n_obs, 1)


@pytest.mark.parametrize("cls", CLASSES, ids=class_id)
def test_unused_label_category_is_rejected_before_fine_tuning(cells, cls):
    adata = cells.copy()
    adata.obs["cell_line"] = adata.obs["cell_line"].cat.add_categories(["unused"])
    model = build(cls, adata, labels_key="cell_line")
    with pytest.raises(ValueError, match=r"categories without cells: \['unused'\]"):
        model.train(mode="finetune", **FIT)


@pytest.mark.parametrize("cls", CLASSES, ids=class_id)
def test_predict_before_fine_tuning(cells, cls):
    model = build(cls, cells.copy(), labels_key="cell_line")
    model.is_trained_ = True
    with pytest.raises(ValueError, match=r"train\(mode='finetune'\)"):
        model.predict_celltype()


@pytest.mark.parametrize("cls", [SCGPT, SCBERT, Geneformer], ids=class_id)
def test_perturbation_setup_names_the_class_that_has_it(cells, cls):
    adata = cells.copy()
    adata.obs["perturbation"] = "non-targeting"
    with pytest.raises(TypeError, match="feature of SCFoundation"):
        setup(cls, adata, perturbation_key="perturbation", control_label="non-targeting")


# ---------------------------------------------------------------- Geneformer specifics
def test_geneformer_rejects_combinations_clearly(models):
    model = models[Geneformer]
    with pytest.raises(TypeError, match="one gene at a time"):
        model.perturb(genes=[("ENSG00000075624", "ENSG00000111640")])


def test_geneformer_builds_on_backed_data(tmp_path, cells):
    path = tmp_path / "cells.h5ad"
    cells.write_h5ad(path)
    backed = ad.read_h5ad(path, backed="r")
    model = build(Geneformer, backed)
    in_memory = build(Geneformer, cells.copy())
    np.testing.assert_allclose(model._medians, in_memory._medians)
    model.is_trained_ = in_memory.is_trained_ = True
    model.module.load_state_dict(in_memory.module.state_dict())
    np.testing.assert_allclose(_embed(model, backed), _embed(in_memory, cells.copy()), atol=1e-5)


# ---------------------------------------------------------------- dataset registry
def test_registry_names_a_damaged_file(tmp_path, monkeypatch):
    source = cf.data.fetch_file("merfish_motor_cortex")
    data = bytearray(source.read_bytes())
    data[len(data) // 2] ^= 0xFF
    (tmp_path / source.name).write_bytes(bytes(data))
    monkeypatch.setattr(cf.settings, "data_dir", tmp_path)
    monkeypatch.setattr(cf.settings, "cache_dir", tmp_path / "cache")
    assert not cf.data.is_available("merfish_motor_cortex")
    with pytest.raises(ValueError, match="sha256 does not match"):
        cf.data.fetch_file("merfish_motor_cortex")
    (tmp_path / source.name).write_bytes(source.read_bytes())
    assert cf.data.is_available("merfish_motor_cortex")
