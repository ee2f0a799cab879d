"""Results that used to be silently wrong or surprising: each now differs, warns or refuses."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import scipy.sparse as sp
import scvi
import torch
from tiny_models import TINY, cellbench_cells

import cellformers as cf
from cellformers.model import SCBERT, SCFoundation

SCBERT_TINY = {**TINY[SCBERT], "classifier_hidden": (16, 8)}
SCF_TINY = TINY[SCFoundation]
FIT = {"batch_size": 8, "enable_progress_bar": False}


@pytest.fixture(scope="module")
def cells():
    return cellbench_cells(30, 80, seed=1)


# ---------------------------------------------------------------- scBERT tells genes apart
def _shuffled_within_cells(adata, seed=0):
    """Each cell's values moved to other genes (the same values, other genes)."""
    rng = np.random.default_rng(seed)
    X = adata.X.toarray()
    out = adata.copy()
    out.X = sp.csr_matrix(np.stack([rng.permutation(row) for row in X]))
    return out


def test_scbert_from_scratch_tells_genes_apart(cells):
    adata = cells.copy()
    SCBERT.setup_anndata(adata)
    shuffled = _shuffled_within_cells(adata)
    SCBERT.setup_anndata(shuffled)
    scvi.settings.seed = 0
    model = SCBERT(adata, **SCBERT_TINY)  # the default: a learned position table
    assert model.module.pos_emb.emb.weight.requires_grad
    model.train(max_epochs=1, **FIT)
    diff = np.abs(
        model.get_latent_representation(adata) - model.get_latent_representation(shuffled)
    )
    assert diff.max(1).min() > 1e-3  # every cell's embedding changes
    # without a position table the same cell with shuffled values is the same cell
    blind = SCBERT(adata, position_embedding=False, **SCBERT_TINY)
    blind.train(max_epochs=1, **FIT)
    same = blind.get_latent_representation(adata) - blind.get_latent_representation(shuffled)
    assert np.abs(same).max() < 1e-4


# ---------------------------------------------------------------- one-class heads warn
def _constant_head(model, n_labels):
    last = [m for m in model.module.to_out.modules() if isinstance(m, torch.nn.Linear)][-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.zero_()
    assert last.out_features == n_labels


def test_one_class_predictions_and_chance_f1_warn(cells):
    adata = cells.copy()
    SCBERT.setup_anndata(adata, labels_key="cell_line")
    scvi.settings.seed = 0
    model = SCBERT(adata, n_labels=3, **SCBERT_TINY)
    _constant_head(model, 3)
    with pytest.warns(UserWarning, match="train macro-F1 of .* no better than chance"):
        model.train(
            mode="finetune", max_epochs=1, freeze_layers="all", lr=1e-12, train_size=0.6, **FIT
        )
    with pytest.warns(UserWarning, match="predicts .* for 30 of 30 cells"):
        labels = model.predict_celltype()
    assert len(set(labels)) == 1
    with pytest.warns(UserWarning, match="collapsed to one class"):
        model.predict_celltype(soft=True)
    with warnings.catch_warnings():  # a handful of cells may well be of one type
        warnings.simplefilter("error", UserWarning)
        model.predict_celltype(indices=np.arange(10))


# ---------------------------------------------------------------- perturbation labels
@pytest.fixture(scope="module")
def papalexi():
    if not cf.data.is_available("papalexi_eccite_lowmoi"):
        pytest.skip("papalexi_eccite_lowmoi.h5ad not found: set CELLFORMERS_DATA")
    adata = cf.data.papalexi_eccite_lowmoi()
    rng = np.random.default_rng(0)
    picks = [
        rng.choice(np.flatnonzero(adata.obs["perturbation"] == k), n, replace=False)
        for k, n in (("non-targeting", 30), ("STAT1", 12), ("IRF1", 12))
    ]
    adata = adata[np.sort(np.concatenate(picks)), :60].copy()
    labels = adata.obs["perturbation"].astype(str).to_numpy()
    labels[np.flatnonzero(labels == "non-targeting")[:10]] = "none"  # cells without a guide
    adata.obs["perturbation"] = labels
    return adata


def _setup_perturbations(adata, control_label="non-targeting", **kwargs):
    SCFoundation.setup_anndata(
        adata, perturbation_key="perturbation", control_label=control_label, **kwargs
    )


def test_perturbation_labels_that_name_no_gene_are_reported(papalexi):
    clean = papalexi[papalexi.obs["perturbation"] != "none"].copy()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # gene targets, measured or not: no warning
        _setup_perturbations(clean)
    adata = papalexi.copy()
    with pytest.raises(ValueError, match=r"1 label\(s\).*\['none'\].*exclude"):
        _setup_perturbations(adata, unmatched_perturbations="error")
    with pytest.raises(ValueError, match="unmatched_perturbations must be"):
        _setup_perturbations(adata, control_label="none", unmatched_perturbations="drop")
    # the default keeps them as targets, but says so
    with pytest.warns(UserWarning, match=r"\['none'\].*treated as gene targets"):
        _setup_perturbations(adata)
    assert "none" in SCFoundation(adata, **SCF_TINY).gene_list
    # excluded: not a gene, not trained on, not predicted
    with pytest.warns(UserWarning, match=r"\['none'\].*left out"):
        _setup_perturbations(adata, unmatched_perturbations="exclude")
    model = SCFoundation(adata, **SCF_TINY)
    assert "none" not in model.gene_list and "IRF1" in model.gene_list
    train, cells, controls = model._perturbation_training_cells(None, None)
    assert sorted(train) == ["IRF1", "STAT1"]
    none = np.flatnonzero(adata.obs["perturbation"] == "none")
    assert not np.isin(none, cells).any() and not np.isin(none, controls).any()
    with pytest.raises(ValueError, match="excluded"):
        model.train(mode="perturbation", train_perturbations=["none"], max_epochs=1)
    scvi.settings.seed = 0
    model.train(mode="perturbation", max_epochs=1, train_size=1.0, **FIT)
    with pytest.raises(ValueError, match="excluded"):
        model.predict_perturbation(["none"])
    assert model.predict_perturbation(["IRF1"]).n_obs == 1
    # a guide-ID column is not a column of target genes
    guides = papalexi.copy()
    with pytest.warns(UserWarning, match="name no gene"):
        SCFoundation.setup_anndata(guides, perturbation_key="guide", control_label="NTg1")
