"""scFoundation as a trained perturbation-response predictor, on real Papalexi ECCITE-seq cells."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import scipy.sparse as sp
import scvi
import torch

import cellformers as cf
from cellformers.model import SCFoundation

KEY = "perturbation"
CONTROL = "non-targeting"
TRAIN = ["STAT1", "JAK2", "IFNGR2", "IRF1", "ATF2"]  # IRF1 and ATF2 are not measured genes
HELD_OUT = "CMTM6"  # a measured gene, never seen perturbed
TINY = {
    "encoder_dim": 32,
    "encoder_depth": 2,
    "encoder_heads": 4,
    "encoder_d_hid": 64,
    "encoder_dropout": 0.0,
    "decoder_dim": 24,
    "decoder_depth": 2,
    "decoder_heads": 2,
    "decoder_dim_head": 12,
    "decoder_nb_features": 16,
}


@pytest.fixture(scope="module")
def papalexi():
    """100 control cells and 30 cells of each of 6 targets; the 100 most detected genes + targets."""
    if not cf.data.is_available("papalexi_eccite_lowmoi"):
        pytest.skip("papalexi_eccite_lowmoi.h5ad not found: set CELLFORMERS_DATA")
    adata = cf.data.papalexi_eccite_lowmoi()
    rng = np.random.default_rng(0)
    cells = [
        rng.choice(np.flatnonzero(adata.obs[KEY] == k), 100 if k == CONTROL else 30, replace=False)
        for k in [CONTROL, *TRAIN, HELD_OUT]
    ]
    adata = adata[np.sort(np.concatenate(cells))]
    detected = np.asarray((adata.X > 0).mean(0)).ravel()
    genes = set(adata.var_names[np.argsort(-detected, kind="stable")[:100]])
    genes |= {"STAT1", "JAK2", "IFNGR2", HELD_OUT}
    adata = adata[:, adata.var_names.isin(genes)].copy()
    adata.obs[KEY] = adata.obs[KEY].astype(str)
    return adata


def _setup(adata):
    adata = adata.copy()
    SCFoundation.setup_anndata(adata, perturbation_key=KEY, control_label=CONTROL)
    return adata


def _train(adata, *, seed=0, max_epochs=8, train=TRAIN, indices=None):
    scvi.settings.seed = seed
    model = SCFoundation(adata, **TINY)
    model.train(
        mode="perturbation",
        train_perturbations=train,
        indices=indices,
        max_epochs=max_epochs,
        batch_size=16,
        lr=1e-2,
        train_size=1.0,
        enable_progress_bar=False,
    )
    return model


@pytest.fixture(scope="module")
def trained(papalexi):
    adata = _setup(papalexi)
    return _train(adata), adata


def test_setup_checks_the_perturbation_labels(papalexi):
    adata = papalexi.copy()
    with pytest.raises(KeyError, match="'guide_target'"):
        SCFoundation.setup_anndata(adata, perturbation_key="guide_target", control_label=CONTROL)
    with pytest.raises(ValueError, match="'NT'.*non-targeting"):
        SCFoundation.setup_anndata(adata, perturbation_key=KEY, control_label="NT")
    with pytest.raises(ValueError, match="go together"):
        SCFoundation.setup_anndata(adata, perturbation_key=KEY)
    bad = adata.copy()
    bad.obs.loc[bad.obs_names[0], KEY] = "STAT1+"
    with pytest.raises(ValueError, match="'STAT1\\+' has an empty target"):
        SCFoundation.setup_anndata(bad, perturbation_key=KEY, control_label=CONTROL)
    bad.obs.loc[bad.obs_names[0], KEY] = f"STAT1+{CONTROL}"
    with pytest.raises(ValueError, match="combines the control label"):
        SCFoundation.setup_anndata(bad, perturbation_key=KEY, control_label=CONTROL)
    bad.obs.loc[bad.obs_names[0], KEY] = np.nan
    with pytest.raises(ValueError, match="1 missing label"):
        SCFoundation.setup_anndata(bad, perturbation_key=KEY, control_label=CONTROL)
    # targets the data do not measure are accepted, and the default gene list holds them
    adata = _setup(papalexi)
    model = SCFoundation(adata, **TINY)
    assert model.gene_list[: adata.n_vars] == list(adata.var_names)
    assert sorted(model.gene_list[adata.n_vars :]) == ["ATF2", "IRF1"]
    assert not model.module.perturbation_flags  # added by perturbation training
    with pytest.raises(ValueError, match="train it first"):
        model.predict_perturbation(["STAT1"])
    plain = papalexi.copy()
    SCFoundation.setup_anndata(plain)
    assert SCFoundation(plain, **TINY).gene_list == list(plain.var_names)
    with pytest.raises(ValueError, match="No perturbations are registered"):
        SCFoundation(plain, **TINY).train(mode="perturbation", max_epochs=1)


def test_training_pairs_controls_with_targets(papalexi, monkeypatch):
    """The minibatches: control inputs with T = S, flags on the targets, targets, no held-out cells."""
    adata = _setup(papalexi)
    scvi.settings.seed = 0
    model = SCFoundation(adata, **TINY)
    seen = {}

    def capture(tokenize, **kwargs):
        seen["tokenize"], seen["split"] = tokenize, kwargs["datasplitter_kwargs"]
        seen["objective"] = model.module.objective

    monkeypatch.setattr(model, "_train_on_tokens", capture)
    model.train(mode="perturbation", train_perturbations=TRAIN, max_epochs=1, train_size=0.8)
    assert model.module.perturbation_flags and seen["objective"] == "perturbation"
    assert model.module.objective == "mlm"  # restored
    train_idx, val_idx, rest = seen["split"]["external_indexing"]
    labels = adata.obs[KEY].to_numpy()
    used = np.concatenate([train_idx, val_idx])
    assert set(labels[used]) == {CONTROL, *TRAIN} and len(val_idx) > 0
    assert (labels == HELD_OUT).sum() == (labels[rest] == HELD_OUT).sum()
    assert len(used) + len(rest) == adata.n_obs

    pairs = seen["tokenize"]
    cells = np.r_[np.flatnonzero(labels == "STAT1")[:3], np.flatnonzero(labels == CONTROL)[:5]]
    codes = np.asarray(model.get_from_registry(adata, "perturbation")).ravel()[cells]
    torch.manual_seed(1)
    batch = pairs(adata.X[cells], codes)
    stat1 = model.gene_list.index("STAT1")
    np.testing.assert_array_equal(batch["flags"][:3].sum(1), 1)
    assert batch["flags"][:3, stat1].all() and not batch["flags"][3:].any()
    # targets: log1p of counts per 10,000 of the target cells, in the model's gene order
    X = adata.X[cells].toarray()
    expected = np.log1p(X / X.sum(1, keepdims=True) * 1e4)
    np.testing.assert_allclose(batch["target"][:, : adata.n_vars], expected, rtol=1e-5)
    measured = np.arange(len(model.gene_list)) < adata.n_vars
    np.testing.assert_array_equal(batch["measured"], np.broadcast_to(measured, (8, measured.size)))
    # inputs are control cells with T = S (the second-to-last and last tokens)
    t_and_s = batch["values"][np.arange(8)[:, None], batch["lengths"][:, None] - [2, 1]]
    np.testing.assert_allclose(t_and_s[:, 0], t_and_s[:, 1])
    controls = adata.X[labels == CONTROL].toarray()
    totals = np.log10(controls.sum(1))
    assert np.isin(np.round(t_and_s[:, 1], 5), np.round(totals, 5)).all()
    # a control target never gets itself as input: with a pool of two controls, each of them
    # always gets the other one
    two = np.flatnonzero(labels == CONTROL)[:2]
    small = dataclasses.replace(pairs, controls=sp.csr_matrix(adata.X[two]))
    own = small.tokenizer(adata.X[two])
    for _ in range(10):
        batch = small(adata.X[two], np.full(2, pairs.control_code))
        for i, j in ((0, 1), (1, 0)):
            np.testing.assert_array_equal(batch["values"][i], own["values"][j])
        assert not batch["flags"].any()
    with pytest.raises(ValueError, match="Unknown perturbations in `train_perturbations`"):
        model.train(mode="perturbation", train_perturbations=["STAT1", "MYC"], max_epochs=1)
    with pytest.raises(ValueError, match="control label"):
        model.train(mode="perturbation", train_perturbations=[CONTROL], max_epochs=1)
    with pytest.raises(ValueError, match="apply to mode='perturbation'"):
        model.train(train_perturbations=TRAIN, max_epochs=1)
    # targets outside the model's gene list cannot be flagged
    measured_only = SCFoundation(adata, gene_list=list(adata.var_names), **TINY)
    with pytest.raises(ValueError, match=r"\['IRF1', 'ATF2'\].*not in the model's gene list"):
        measured_only.train(mode="perturbation", train_perturbations=TRAIN, max_epochs=1)


def test_loss_decreases_and_control_prediction(trained):
    model, adata = trained
    loss = model.history["train_loss"].to_numpy(dtype=float).ravel()
    assert loss[-1] < 0.75 * loss[0]
    pred = model.predict_perturbation([CONTROL], batch_size=7)
    # no flag: exactly the network's output without the flag embedding, averaged over controls
    controls = np.flatnonzero(adata.obs[KEY] == CONTROL)
    plain = model.get_normalized_expression(indices=controls, target_depth="f1", batch_size=16)
    np.testing.assert_allclose(pred.X[0], plain.to_numpy().mean(0), rtol=1e-5, atol=1e-5)
    empty = model.predict_perturbation([()], batch_size=16)  # the empty tuple is the control
    assert list(empty.obs_names) == [CONTROL]
    np.testing.assert_allclose(empty.X, pred.X, rtol=1e-6, atol=1e-6)
    # and, after training, close to the observed control mean
    means = cf.tl.perturbation_means(adata, perturbation_key=KEY, control_label=CONTROL)
    observed = means[CONTROL].X.ravel()
    assert np.corrcoef(pred.X[0], observed)[0, 1] > 0.95
    assert np.mean((pred.X[0] - observed) ** 2) < 0.2 * np.mean(observed**2)


def test_on_target_knockdown_and_held_out_prediction(trained):
    model, adata = trained
    pred = model.predict_perturbation(
        [CONTROL, "STAT1", "JAK2", HELD_OUT, "IRF1", "STAT1+JAK2"], n_controls=60, batch_size=32
    )
    assert list(pred.obs_names) == [CONTROL, "STAT1", "JAK2", HELD_OUT, "IRF1", "STAT1+JAK2"]
    assert list(pred.obs[KEY]) == list(pred.obs_names)
    assert list(pred.var_names) == list(adata.var_names)
    assert (pred.obs["n_cells"] == 60).all() and list(pred.obs["is_control"]) == [True] + [
        False
    ] * 5
    assert np.isfinite(pred.X).all()
    # on target: a trained knockout lowers its own gene's predicted expression
    for gene in ("STAT1", "JAK2"):
        assert pred[gene, gene].X.item() < pred[CONTROL, gene].X.item() - 0.3
    # a held-out target is predicted, and the flag changes the prediction
    assert not np.allclose(pred[HELD_OUT].X, pred[CONTROL].X)
    df = cf.tl.evaluate_perturbation(
        adata,
        pred,
        perturbation_key=KEY,
        control_label=CONTROL,
        test_perturbations=[HELD_OUT],
        train_perturbations=TRAIN,
    )
    assert set(df["method"]) == {"model", "control", "train_mean", "linear"}
    assert np.isfinite(df.query("method == 'model' and metric == 'mse'")["value"]).all()
    # the mean over control cells does not depend on the batch size
    again = model.predict_perturbation(["STAT1"], n_controls=60, batch_size=5)
    np.testing.assert_allclose(again.X[0], pred["STAT1"].X[0], rtol=1e-5, atol=1e-6)


def test_unknown_perturbations_are_named(trained):
    model, _ = trained
    with pytest.raises(ValueError, match=r"\['NOTAGENE', 'STAT1\+ALSONOT'\].*ALSONOT"):
        model.predict_perturbation(["STAT1", "NOTAGENE", "STAT1+ALSONOT"])
    with pytest.raises(ValueError, match="more than once"):
        model.predict_perturbation(["STAT1", ("STAT1",)])
    with pytest.raises(ValueError, match="empty target"):
        model.predict_perturbation(["STAT1+"])
    with pytest.raises(ValueError, match="is empty"):
        model.predict_perturbation([])


def test_save_load_keeps_the_flag_embedding(trained, tmp_path):
    model, adata = trained
    model.save(tmp_path / "model", overwrite=True)
    loaded = SCFoundation.load(tmp_path / "model", adata=adata)
    assert loaded.module.perturbation_flags and loaded.perturbation_trained_
    a = model.predict_perturbation(["STAT1", HELD_OUT], n_controls=20, batch_size=20)
    b = loaded.predict_perturbation(["STAT1", HELD_OUT], n_controls=20, batch_size=20)
    np.testing.assert_allclose(a.X, b.X, rtol=1e-6, atol=1e-6)
    # the embedding, not just the pretrained network, is used: zeroing it changes the output
    with torch.no_grad():
        loaded.module.pert_encoder.weight.zero_()
    c = loaded.predict_perturbation(["STAT1", CONTROL], n_controls=20, batch_size=20)
    assert not np.allclose(c["STAT1"].X, a["STAT1"].X)
    np.testing.assert_allclose(c["STAT1"].X, c[CONTROL].X, rtol=1e-6, atol=1e-6)


def test_training_is_deterministic_under_a_seed(papalexi):
    adata = _setup(papalexi)
    labels = adata.obs[KEY].to_numpy()
    few = np.flatnonzero(np.isin(labels, [CONTROL, "STAT1", "JAK2"]))[::2]
    runs = [
        _train(
            adata, seed=s, max_epochs=1, train=["STAT1", "JAK2"], indices=few
        ).predict_perturbation(["STAT1", HELD_OUT], n_controls=10, batch_size=10)
        for s in (3, 3, 4)
    ]
    np.testing.assert_array_equal(runs[0].X, runs[1].X)
    assert not np.allclose(runs[0].X, runs[2].X)


def test_module_flags_reach_unexpressed_genes():
    """A flag on a gene the cell does not express changes the prediction through the decoder."""
    torch.manual_seed(0)
    module = cf.module.SCFoundationModule(12, perturbation_flags=True, **TINY).eval()
    expression = torch.zeros(2, 12)
    expression[:, :4] = torch.rand(2, 4) + 0.5
    values, positions, lengths = cf.module.gather_scfoundation_tokens(
        expression, torch.full((2,), 3.0), torch.full((2,), 3.0)
    )
    flags = torch.zeros(2, 12, dtype=torch.bool)
    with torch.no_grad():
        base = module.predict_expression(values, positions, lengths)
        same = module.predict_expression(values, positions, lengths, flags=flags)
        flags[0, 9] = True  # not expressed: no encoder token
        flagged = module.predict_expression(values, positions, lengths, flags=flags)
        hidden = module.encode(values, positions, lengths, flags=flags)
    torch.testing.assert_close(same, base, rtol=0, atol=0)
    assert not torch.allclose(flagged[0], base[0]) and torch.equal(flagged[1], base[1])
    torch.testing.assert_close(hidden, module.encode(values, positions, lengths))
    with pytest.raises(ValueError, match="flags must be"):
        module.predict_expression(values, positions, lengths, flags=flags[:, :5])
    plain = cf.module.SCFoundationModule(12, **TINY)
    assert "pert_encoder.weight" not in plain.state_dict()
    with pytest.raises(RuntimeError, match="perturbation_flags=True"):
        plain.encode(values, positions, lengths, flags=flags)
    with pytest.raises(ValueError, match="perturbation"):
        plain.objective = "perturbation"


def test_perturbation_loss_is_mse_over_measured_genes():
    module = cf.module.SCFoundationModule(6, perturbation_flags=True, **TINY)
    module.objective = "perturbation"
    pred = torch.tensor([[1.0, 2.0, 0.0, 0.0, 5.0, 0.0], [0.0] * 6])
    target = torch.tensor([[0.0, 2.0, 1.0, 0.0, 9.0, 0.0], [1.0] * 6])
    measured = torch.tensor([[True] * 4 + [False] * 2] * 2)
    out = module.loss({"target": target, "measured": measured}, {}, {"expression": pred})
    torch.testing.assert_close(
        out.reconstruction_loss["reconstruction_loss"], torch.tensor([0.5, 1.0])
    )
    torch.testing.assert_close(out.loss, torch.tensor(0.75))
    with pytest.raises(KeyError, match="measured"):
        module.loss({"target": target}, {}, {"expression": pred})


def test_query_without_perturbation_column(trained, papalexi):
    model, _ = trained
    query = papalexi[:20].copy()
    del query.obs[KEY]
    emb = model.get_latent_representation(query, pooling="mean")
    assert emb.shape == (20, TINY["encoder_dim"]) and np.isfinite(emb).all()
