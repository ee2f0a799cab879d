"""Shared fine-tuning machinery: schedules, macro-F1, class weights, freezing, determinism."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scvi
import torch
import torch.nn.functional as F
from scvi import REGISTRY_KEYS
from sklearn.metrics import f1_score

import cellformers as cf
from cellformers.model import SCBERT
from cellformers.module import SCBERTModule
from cellformers.train import lr_multiplier, macro_f1

TINY = {"dim": 16, "depth": 2, "heads": 2, "dim_head": 8, "classifier_hidden": (32, 16)}


# ---------------------------------------------------------------- schedules and scores
def test_lr_multiplier_schedules():
    kw = {"warmup_steps": 4, "total_steps": 24}
    for schedule in ("cosine", "linear", "step", "constant"):
        assert [lr_multiplier(s, schedule=schedule, **kw) for s in range(4)] == [
            0.25,
            0.5,
            0.75,
            1.0,
        ]
    assert lr_multiplier(4, schedule="cosine", **kw) == pytest.approx(1.0)
    assert lr_multiplier(14, schedule="cosine", **kw) == pytest.approx(0.5)
    assert lr_multiplier(24, schedule="cosine", min_lr_ratio=0.1, **kw) == pytest.approx(0.1)
    assert lr_multiplier(14, schedule="linear", **kw) == pytest.approx(0.5)
    assert lr_multiplier(24, schedule="linear", **kw) == pytest.approx(0.0)
    # step: gamma ** epoch, 6 steps per epoch
    assert lr_multiplier(
        13, schedule="step", steps_per_epoch=6, step_gamma=0.5, **kw
    ) == pytest.approx(0.25)
    assert lr_multiplier(20, schedule="constant", **kw) == 1.0
    with pytest.raises(ValueError, match="schedule"):
        lr_multiplier(5, schedule="exp", **kw)
    with pytest.raises(ValueError, match="lr_schedule"):
        cf.train.PretrainingPlan(SCBERTModule(n_genes=10, **TINY), lr_schedule="exp")


def test_macro_f1_matches_sklearn():
    rng = np.random.default_rng(0)
    for n_true, n_pred in ((5, 4), (3, 3), (4, 6)):
        y = rng.integers(0, n_true, 300)
        p = rng.integers(0, n_pred, 300)
        k = max(n_true, n_pred)
        confusion = np.zeros((k, k))
        np.add.at(confusion, (y, p), 1)
        expected = f1_score(y, p, average="macro")
        assert float(macro_f1(torch.tensor(confusion))) == pytest.approx(expected, abs=1e-12)
    assert math.isclose(float(macro_f1(torch.eye(3) * 5)), 1.0)


def test_class_weighted_loss_matches_torch():
    module = SCBERTModule(n_genes=10, n_labels=3, **TINY)
    logits = torch.randn(7, 3)
    labels = torch.tensor([0, 1, 2, 2, 1, 0, 2])
    tensors = {REGISTRY_KEYS.LABELS_KEY: labels[:, None].float()}
    out = module._classification_loss(tensors, logits)
    assert torch.allclose(out.loss, F.cross_entropy(logits, labels))
    module.class_weights = torch.tensor([1.0, 2.0, 0.5])
    out = module._classification_loss(tensors, logits)
    assert torch.allclose(out.loss, F.cross_entropy(logits, labels, weight=module.class_weights))
    assert out.reconstruction_loss["reconstruction_loss"].shape == (7,)
    assert torch.equal(out.true_labels, labels)
    with pytest.raises(ValueError, match="Label codes"):
        module._classification_loss({REGISTRY_KEYS.LABELS_KEY: torch.full((2, 1), 3.0)}, logits[:2])


# ---------------------------------------------------------------- model level (tiny scBERT)
@pytest.fixture(scope="module")
def cells():
    adata = cf.data.cellbench_2platform()
    rng = np.random.default_rng(1)
    keep = np.sort(rng.choice(adata.n_obs, 90, replace=False))
    adata = adata[keep].copy()
    detected = np.asarray((adata.X > 0).mean(0)).ravel()
    return adata[:, np.argsort(-detected, kind="stable")[:200]].copy()


def _model(cells, seed=0):
    adata = cells.copy()
    SCBERT.setup_anndata(adata, labels_key="cell_line")
    scvi.settings.seed = seed
    return SCBERT(adata, n_labels=3, **TINY)


def _fit(model, **kwargs):
    kwargs = {"max_epochs": 2, "batch_size": 16, "mode": "finetune", **kwargs}
    model.train(enable_progress_bar=False, **kwargs)
    return model


def test_freeze_all_trains_only_head(cells):
    model = _model(cells)
    before = {k: v.clone() for k, v in model.module.state_dict().items()}
    _fit(model, freeze_layers="all", lr=1e-2)
    after = model.module.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed, "nothing trained"
    assert all(k.startswith("to_out.") for k in changed), sorted(changed)[:5]
    assert all(p.requires_grad for p in model.module.parameters() if p.dtype.is_floating_point)


def test_early_stopping_on_macro_f1_and_class_weights(cells):
    model = _model(cells)
    _fit(
        model,
        max_epochs=3,
        class_weight="balanced",
        early_stopping=True,
        early_stopping_patience=1,
        check_val_every_n_epoch=1,
        train_size=0.7,
    )
    history = model.history
    assert "macro_f1_validation" in history and "macro_f1_train" in history
    values = history["macro_f1_validation"].to_numpy().ravel()
    assert ((values >= 0) & (values <= 1)).all()
    assert model.module.class_weights is None  # only set for the run
    with pytest.raises(ValueError, match="class_weight"):
        _fit(_model(cells), class_weight="inverse")
    with pytest.raises(ValueError, match="not registered"):
        _fit(_model(cells), class_weight={"H1975": 2.0, "nope": 1.0})
    with pytest.raises(ValueError, match="fine-tuning"):
        SCBERT(cells_setup(cells), **TINY).train(max_epochs=1, class_weight="balanced")


def cells_setup(cells):
    adata = cells.copy()
    SCBERT.setup_anndata(adata, labels_key="cell_line")
    return adata


def test_same_seed_same_weights_and_predictions(cells):
    runs = []
    for _ in range(2):
        model = _fit(_model(cells, seed=3), max_epochs=1)
        runs.append((model.module.state_dict(), model.predict_celltype(soft=True)))
    (sd1, p1), (sd2, p2) = runs
    assert all(torch.equal(sd1[k], sd2[k]) for k in sd1)
    np.testing.assert_array_equal(p1.to_numpy(), p2.to_numpy())
    other = _fit(_model(cells, seed=4), max_epochs=1)
    assert not all(torch.equal(sd1[k], other.module.state_dict()[k]) for k in sd1)


# ---------------------------------------------------------------- scGPT classification head
def test_scgpt_finetune_adds_official_head_and_round_trips(cells, tmp_path):
    adata = cells_setup(cells)
    cf.model.SCGPT.setup_anndata(adata, labels_key="cell_line")
    scvi.settings.seed = 0
    model = cf.model.SCGPT(adata, d_model=32, nhead=4, d_hid=32, nlayers=2, dropout=0.0)
    model.train(max_epochs=1, batch_size=16, enable_progress_bar=False)
    encoder_before = {
        k: v.clone() for k, v in model.module.state_dict().items() if not k.startswith("cls_")
    }
    with pytest.raises(ValueError, match="no classification head"):
        model.predict_celltype()
    model.train(
        max_epochs=3, batch_size=16, mode="finetune", freeze_layers="all", lr=1e-2,
        enable_progress_bar=False,
    )  # fmt: skip
    state = model.module.state_dict()
    assert {k for k in state if k.startswith("cls_decoder.")} == {
        f"cls_decoder._decoder.{i}.{p}" for i in (0, 2, 3, 5) for p in ("weight", "bias")
    } | {"cls_decoder.out_layer.weight", "cls_decoder.out_layer.bias"}
    assert all(torch.equal(encoder_before[k], state[k]) for k in encoder_before)
    probs = model.predict_celltype(soft=True)
    assert list(probs.columns) == ["H1975", "H2228", "HCC827"]
    hard = model.predict_celltype()
    assert (hard == probs.idxmax(axis=1).to_numpy()).all()
    model.save(tmp_path / "m", overwrite=True)
    loaded = cf.model.SCGPT.load(tmp_path / "m", adata=adata)
    np.testing.assert_allclose(loaded.predict_celltype(soft=True).to_numpy(), probs.to_numpy())


# ---------------------------------------------------------------- adversarial batch removal
@pytest.mark.parametrize("mode", ["pretrain", "finetune"])
def test_batch_adversarial_training(cells, mode):
    adata = cells.copy()
    SCBERT.setup_anndata(adata, labels_key="cell_line", batch_key="batch")
    scvi.settings.seed = 0
    model = SCBERT(adata, n_labels=3 if mode == "finetune" else 0, **TINY)
    before = {k: v.clone() for k, v in model.module.state_dict().items()}
    model.train(
        max_epochs=2, batch_size=16, mode=mode, batch_adversarial=1.0, enable_progress_bar=False
    )
    assert "batch_adversary_ce_train" in model.history
    ce = model.history["batch_adversary_ce_train"].to_numpy(dtype=float).ravel()
    assert np.isfinite(ce).all()
    # the model keeps its own module and state-dict layout; the encoder trained
    assert type(model.module) is SCBERTModule
    after = model.module.state_dict()
    assert set(after) == set(before)
    assert not torch.equal(before["token_emb.weight"], after["token_emb.weight"])
    z = model.get_latent_representation()
    assert np.isfinite(z).all()
    # no batch labels registered: a clear error
    plain = cells_setup(cells)
    with pytest.raises(ValueError, match="batch_key"):
        SCBERT(plain, **TINY).train(max_epochs=1, batch_adversarial=1.0)


def test_batch_adversary_reverses_the_encoder_gradient():
    from cellformers.module import BatchAdversarialModule

    backbone = SCBERTModule(n_genes=10, **TINY)
    tokens = torch.randint(0, 5, (6, 11))
    tensors = {
        "input_ids": tokens,
        REGISTRY_KEYS.BATCH_KEY: torch.tensor([0, 1, 0, 1, 0, 1.0])[:, None],
    }

    def embed(t):
        return backbone.encode(t["input_ids"]).mean(1)

    wrapper = BatchAdversarialModule(backbone, embed, n_batch=2, dim=16, weight=1.0)
    backbone.objective = "mlm"
    torch.manual_seed(0)
    _, _, with_adv = wrapper(tensors)
    torch.manual_seed(0)
    _, _, plain = backbone(tensors)
    ce = with_adv.extra_metrics["batch_adversary_ce"]
    assert torch.allclose(with_adv.loss, plain.loss + ce, atol=1e-6)
    # gradient of the discriminator CE alone w.r.t. the encoder is the reverse of plain CE's
    emb = embed(tensors)
    disc = wrapper.discriminator
    target = tensors[REGISTRY_KEYS.BATCH_KEY].reshape(-1).long()
    g_rev = torch.autograd.grad(F.cross_entropy(disc(emb), target), backbone.token_emb.weight)[0]
    disc.reverse_grad = False
    g_fwd = torch.autograd.grad(
        F.cross_entropy(disc(embed(tensors)), target), backbone.token_emb.weight
    )[0]
    assert torch.allclose(g_rev, -g_fwd, atol=1e-6) and g_fwd.abs().sum() > 0
