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
import scvi

import cellformers as cf
from cellformers.model import SCBERT, SCGPT, Geneformer, SCFoundation

TINY = {
    "SCGPT": (SCGPT, {"d_model": 16, "nhead": 2, "d_hid": 16, "nlayers": 1, "max_seq_len": 64}),
    "SCBERT": (SCBERT, {"dim": 16, "depth": 1, "heads": 2, "dim_head": 8}),
    "SCFoundation": (
        SCFoundation,
        {
            "encoder_dim": 16,
            "encoder_depth": 1,
            "encoder_heads": 2,
            "encoder_d_hid": 32,
            "decoder_dim": 16,
            "decoder_depth": 1,
            "decoder_heads": 2,
            "decoder_dim_head": 8,
            "decoder_nb_features": 8,
        },
    ),
    "Geneformer": (
        Geneformer,
        {
            "hidden_size": 16,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "intermediate_size": 32,
            "max_input_size": 64,
        },
    ),
}
NAMES = list(TINY)
FIT = {"max_epochs": 1, "batch_size": 20, "enable_progress_bar": False}


@pytest.fixture(scope="module")
def cells():
    """40 CellBench cells (both platforms, all 3 lines) and their 200 most detected genes."""
    adata = cf.data.cellbench_2platform()
    rng = np.random.default_rng(0)
    adata = adata[np.sort(rng.choice(adata.n_obs, 40, replace=False))]
    detected = np.asarray((adata.X > 0).mean(0)).ravel()
    adata = adata[:, np.argsort(-detected, kind="stable")[:200]].copy()
    adata.obs["cell_line"] = adata.obs["cell_line"].cat.remove_unused_categories()
    return adata


def _setup(cls, adata, **kwargs):
    if cls is Geneformer:
        kwargs.setdefault("gene_key", "ensembl_id")
    cls.setup_anndata(adata, **kwargs)
    return adata


def _build(name, adata, **setup_kwargs):
    cls, kwargs = TINY[name]
    _setup(cls, adata, **setup_kwargs)
    scvi.settings.seed = 0
    return cls(adata, **kwargs)


@pytest.fixture(scope="module")
def models(cells):
    """One model per class, fine-tuned for an epoch on labels and batches of ``cells``."""
    out = {}
    for name in NAMES:
        model = _build(name, cells.copy(), labels_key="cell_line", batch_key="batch")
        model.train(mode="finetune", **FIT)
        out[name] = model
    return out


def _embed(model, adata):
    return model.get_latent_representation(adata, batch_size=16)


# ---------------------------------------------------------------- expression input
@pytest.mark.parametrize("name", NAMES)
def test_training_on_csc_input(cells, name):
    adata = cells.copy()
    adata.X = sp.csc_matrix(adata.X)
    model = _build(name, adata)
    model.train(**FIT)
    csr = cells.copy()
    np.testing.assert_allclose(_embed(model, adata), _embed(model, csr), atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_float16_input(cells, name):
    adata = cells.copy()
    adata.X = adata.X.toarray().astype(np.float16)  # the counts are exact in float16
    model = _build(name, adata)
    model.train(**FIT)
    np.testing.assert_allclose(_embed(model, adata), _embed(model, cells.copy()), atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_no_cells(cells, models, name):
    cls = TINY[name][0]
    with pytest.raises(ValueError, match="0 cells and 200 genes"):
        _setup(cls, cells[:0].copy())
    with pytest.raises(ValueError, match="0 cells and 200 genes"):
        _embed(models[name], cells[:0].copy())


@pytest.mark.parametrize("name", NAMES)
def test_non_integer_query_is_rejected(cells, models, name):
    query = cells.copy()
    query.X = query.X * 0.5
    with pytest.raises(ValueError, match="non-integer values"):
        _embed(models[name], query)


# ---------------------------------------------------------------- labels and batches
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("key", ["cell_line", "batch"])
def test_missing_labels_are_named(cells, name, key):
    adata = cells.copy()
    column = adata.obs[key].astype(object)
    column.iloc[3] = np.nan
    adata.obs[key] = column
    role = "labels_key" if key == "cell_line" else "batch_key"
    with pytest.raises(ValueError, match=rf"adata.obs\['{key}'\] \({role}\) has 1 missing"):
        _setup(TINY[name][0], adata, **{role: key})


@pytest.mark.parametrize("name", NAMES)
def test_query_with_new_label_and_batch_categories(cells, models, name):
    model = models[name]
    query = cells.copy()
    query.obs["cell_line"] = "a new cell line"
    query.obs["batch"] = "a new platform"
    expected = _embed(model, cells.copy())
    np.testing.assert_allclose(_embed(model, query), expected, atol=1e-5)
    np.testing.assert_array_equal(model.predict_celltype(query), model.predict_celltype())
    if name != "Geneformer":
        gene = str(model._gene_names(query)[0])
        assert model.perturb(query, genes=[gene]).shape == (query.n_obs, 1)


@pytest.mark.parametrize("name", NAMES)
def test_unused_label_category_is_rejected_before_fine_tuning(cells, name):
    adata = cells.copy()
    adata.obs["cell_line"] = adata.obs["cell_line"].cat.add_categories(["unused"])
    model = _build(name, adata, labels_key="cell_line")
    with pytest.raises(ValueError, match=r"categories without cells: \['unused'\]"):
        model.train(mode="finetune", **FIT)


@pytest.mark.parametrize("name", NAMES)
def test_predict_before_fine_tuning(cells, name):
    model = _build(name, cells.copy(), labels_key="cell_line")
    model.is_trained_ = True
    with pytest.raises(ValueError, match=r"train\(mode='finetune'\)"):
        model.predict_celltype()


@pytest.mark.parametrize("name", ["SCGPT", "SCBERT", "Geneformer"])
def test_perturbation_setup_names_the_class_that_has_it(cells, name):
    adata = cells.copy()
    adata.obs["perturbation"] = "non-targeting"
    with pytest.raises(TypeError, match="feature of SCFoundation"):
        _setup(TINY[name][0], adata, perturbation_key="perturbation", control_label="non-targeting")


# ---------------------------------------------------------------- Geneformer specifics
def test_geneformer_rejects_combinations_clearly(models):
    model = models["Geneformer"]
    with pytest.raises(TypeError, match="one gene at a time"):
        model.perturb(genes=[("ENSG00000075624", "ENSG00000111640")])


def test_geneformer_builds_on_backed_data(tmp_path, cells):
    path = tmp_path / "cells.h5ad"
    cells.write_h5ad(path)
    backed = ad.read_h5ad(path, backed="r")
    model = _build("Geneformer", backed)
    in_memory = _build("Geneformer", cells.copy())
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
