from __future__ import annotations

import anndata as ad
import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
import scipy.sparse as sp

import cellformers as cf

KEY = "perturbation"
CTRL = "non-targeting"
TEST = ["STAT1", "IRF1", "JAK2", "SPI1", "CUL3"]


@pytest.fixture(scope="module")
def papalexi_path():
    from cellformers.data import is_available

    if not is_available("papalexi_eccite_lowmoi"):
        pytest.skip(
            "papalexi_eccite_lowmoi.h5ad not found: set CELLFORMERS_DATA to the shared data folder"
        )
    from cellformers.data import fetch_file

    return fetch_file("papalexi_eccite_lowmoi")


@pytest.fixture(scope="module")
def papalexi_small(papalexi_path):
    """At most 150 cells of every perturbation (seeded), raw counts in X."""
    adata = ad.read_h5ad(papalexi_path)
    rng = np.random.default_rng(0)
    keep = [
        rng.choice(idx, size=min(150, idx.size), replace=False)
        for idx in (np.flatnonzero(adata.obs[KEY] == p) for p in adata.obs[KEY].cat.categories)
    ]
    small = adata[np.sort(np.concatenate(keep))].copy()
    del small.obsm["grna_counts"]
    return small


@pytest.fixture(scope="module")
def lognorm(papalexi_small):
    """scanpy's normalize_total(1e4) + log1p of the same cells: the independent reference."""
    ref = papalexi_small.copy()
    ref.X = ref.X.astype(np.float64)
    sc.pp.normalize_total(ref, target_sum=1e4)
    sc.pp.log1p(ref)
    return ref


def _ref_means(ref, name):
    return np.asarray(ref[ref.obs[KEY] == name].X.mean(axis=0)).ravel()


def _value(df, method, perturbation, metric):
    sel = df[(df.method == method) & (df.perturbation == perturbation) & (df.metric == metric)]
    assert len(sel) == 1, (method, perturbation, metric)
    return sel["value"].iloc[0]


# ---------------------------------------------------------------- means and metrics on real data


def test_means_match_scanpy_normalisation(papalexi_small, lognorm):
    before = papalexi_small.X.copy()
    means = cf.tl.perturbation_means(papalexi_small, perturbation_key=KEY, control_label=CTRL)
    assert means.n_obs == papalexi_small.obs[KEY].nunique() == 26
    assert list(means.var_names) == list(papalexi_small.var_names)
    for name in ["STAT1", CTRL, "SPI1"]:
        np.testing.assert_allclose(means[name].X.ravel(), _ref_means(lognorm, name), atol=1e-10)
        assert means.obs.loc[name, "n_cells"] == (papalexi_small.obs[KEY] == name).sum()
    assert means.obs["is_control"].sum() == 1 and means.obs.loc[CTRL, "is_control"]
    assert (papalexi_small.X != before).nnz == 0  # the input is not modified

    # already log-normalised values with normalize=False give the same means
    same = cf.tl.perturbation_means(
        lognorm, perturbation_key=KEY, control_label=CTRL, normalize=False
    )
    np.testing.assert_allclose(same.X, means.X, atol=1e-12)


def test_observed_means_as_prediction_are_perfect(papalexi_small):
    means = cf.tl.perturbation_means(papalexi_small, perturbation_key=KEY, control_label=CTRL)
    df = cf.tl.evaluate_perturbation(
        papalexi_small, means, perturbation_key=KEY, control_label=CTRL, test_perturbations=TEST
    )
    model = df[df.method == "model"].set_index(["perturbation", "metric"])["value"]
    assert len(model) == len(TEST) * 5
    for name in TEST:
        for metric in ["pearson_delta", "pearson_delta_top20", "direction_accuracy_top20"]:
            assert model[(name, metric)] == pytest.approx(1.0, abs=1e-12)
        for metric in ["mse", "mse_top20"]:
            assert model[(name, metric)] == pytest.approx(0.0, abs=1e-20)
    assert set(df.method) == {"model", "control", "train_mean", "linear"}

    # a DataFrame with shuffled genes and extra rows scores the same
    frame = means.to_df().iloc[::-1, ::-1]
    df2 = cf.tl.evaluate_perturbation(
        papalexi_small, frame, perturbation_key=KEY, control_label=CTRL, test_perturbations=TEST
    )
    pd.testing.assert_frame_equal(df, df2)


def test_control_baseline_and_top_de_genes(papalexi_small, lognorm):
    df = cf.tl.evaluate_perturbation(
        papalexi_small,
        perturbation_key=KEY,
        control_label=CTRL,
        test_perturbations=TEST,
        baselines=["control"],
        n_top_de=15,
    )
    sc.tl.rank_genes_groups(
        lognorm, KEY, groups=TEST, reference=CTRL, method="t-test", n_genes=lognorm.n_vars
    )
    from cellformers.tl._perturbation import _group_stats, _labels, _welch_t

    stats = _group_stats(lognorm.X, _labels(lognorm, KEY), lognorm.var_names)
    ctrl = _ref_means(lognorm, CTRL)
    for name in TEST:
        delta = _ref_means(lognorm, name) - ctrl
        # top DE genes: largest |Welch t| (scanpy's t-test score)
        scores = sc.get.rank_genes_groups_df(lognorm, group=name).set_index("names")["scores"]
        expected = scores.abs().sort_values(ascending=False, kind="stable").index[:15]
        t = _welch_t(stats, name, CTRL)
        np.testing.assert_allclose(t, scores[lognorm.var_names].to_numpy(), rtol=1e-5, atol=1e-6)
        top = df.attrs["top_de_genes"][name]
        assert set(top) == set(expected)
        idx = lognorm.var_names.get_indexer(top)
        assert _value(df, "control", name, "mse") == pytest.approx(np.mean(delta**2), rel=1e-9)
        assert _value(df, "control", name, "mse_top15") == pytest.approx(
            np.mean(delta[idx] ** 2), rel=1e-9
        )
        assert np.isnan(_value(df, "control", name, "pearson_delta"))
        assert np.isnan(_value(df, "control", name, "pearson_delta_top15"))
        assert _value(df, "control", name, "direction_accuracy_top15") == 0.0


def test_stat1_knockout_lowers_stat1(papalexi_small):
    means = cf.tl.perturbation_means(papalexi_small, perturbation_key=KEY, control_label=CTRL)
    delta = means["STAT1"].X - means[CTRL].X
    stat1 = delta[0, means.var_names.get_loc("STAT1")]
    assert stat1 < -0.1
    df = cf.tl.evaluate_perturbation(
        papalexi_small,
        perturbation_key=KEY,
        control_label=CTRL,
        test_perturbations=["STAT1"],
        baselines=["control"],
    )
    assert "STAT1" in df.attrs["top_de_genes"]["STAT1"][:5]


def test_summary_is_mean_and_sd(papalexi_small):
    df = cf.tl.evaluate_perturbation(
        papalexi_small, perturbation_key=KEY, control_label=CTRL, test_perturbations=TEST
    )
    summary = cf.tl.summarize_perturbation_metrics(df)
    assert list(summary.index) == ["control", "train_mean", "linear"]
    values = df[(df.method == "linear") & (df.metric == "mse")]["value"].to_numpy()
    assert summary.loc["linear", ("mse", "mean")] == pytest.approx(values.mean())
    assert summary.loc["linear", ("mse", "sd")] == pytest.approx(values.std(ddof=1))
    assert summary.loc["linear", ("mse", "n")] == len(TEST)
    assert summary.loc["control", ("pearson_delta", "n")] == 0
    with pytest.raises(KeyError, match="evaluate_perturbation"):
        cf.tl.summarize_perturbation_metrics(df.drop(columns="metric"))


# ---------------------------------------------------------------- baselines on synthetic data


def _cells(profiles: dict[str, np.ndarray], genes, noise_scale=0.01, seed=0) -> ad.AnnData:
    """Four cells per perturbation whose mean is exactly the given profile."""
    rng = np.random.default_rng(seed)
    rows, labels = [], []
    for name, profile in profiles.items():
        e1, e2 = rng.normal(scale=noise_scale, size=(2, profile.size))
        rows += [profile + e1, profile - e1, profile + e2, profile - e2]
        labels += [name] * 4
    obs = pd.DataFrame({KEY: pd.Categorical(labels)}, index=[f"c{i}" for i in range(len(labels))])
    return ad.AnnData(np.array(rows), obs=obs, var=pd.DataFrame(index=genes))


def test_train_mean_by_hand():
    counts = np.array(
        [[5, 0, 3], [2, 2, 2], [0, 4, 1], [7, 1, 0], [1, 1, 8], [3, 3, 3], [0, 0, 9], [6, 2, 1]],
        dtype=np.float32,
    )
    labels = ["ctrl", "ctrl", "A", "A", "A", "B", "C", "C"]
    adata = ad.AnnData(
        sp.csr_matrix(counts),
        obs=pd.DataFrame({KEY: labels}, index=[f"c{i}" for i in range(8)]),
        var=pd.DataFrame(index=["g0", "g1", "g2"]),
    )
    c64 = counts.astype(np.float64)
    logn = np.log1p(c64 / c64.sum(axis=1, keepdims=True) * 1e4)
    mean = {n: logn[np.array(labels) == n].mean(axis=0) for n in ["ctrl", "A", "B", "C"]}
    expected = (mean["A"] + mean["B"]) / 2
    with pytest.warns(UserWarning, match="fewer than 10 cells"):
        pred = cf.tl.perturbation_baseline(
            adata, perturbation_key=KEY, control_label="ctrl", test_perturbations="C",
            method="train_mean",
        )  # fmt: skip
    assert list(pred.obs_names) == ["C"]
    np.testing.assert_allclose(pred.X[0], expected, rtol=1e-12)
    with pytest.warns(UserWarning):
        df = cf.tl.evaluate_perturbation(
            adata, perturbation_key=KEY, control_label="ctrl", test_perturbations=["C"],
            baselines=["train_mean"], n_top_de=2,
        )  # fmt: skip
    delta_obs, delta_pred = mean["C"] - mean["ctrl"], expected - mean["ctrl"]
    assert _value(df, "train_mean", "C", "mse") == pytest.approx(
        np.mean((delta_pred - delta_obs) ** 2)
    )
    assert _value(df, "train_mean", "C", "pearson_delta") == pytest.approx(
        np.corrcoef(delta_pred, delta_obs)[0, 1]
    )
    # an explicit training set: only B
    with pytest.warns(UserWarning):
        pred_b = cf.tl.perturbation_baseline(
            adata, perturbation_key=KEY, control_label="ctrl", test_perturbations="C",
            train_perturbations=["B"], method="train_mean",
        )  # fmt: skip
    np.testing.assert_allclose(pred_b.X[0], mean["B"], rtol=1e-12)


def _linear_world(seed=0, n_pairs=20, rank=3):
    """Changes exactly ``A C a_gᵀ`` for a knockout of gene g; genes come in pairs a, -a."""
    rng = np.random.default_rng(seed)
    half = rng.normal(size=(n_pairs, rank))
    A = np.empty((2 * n_pairs, rank))
    A[0::2], A[1::2] = half, -half
    C = rng.normal(size=(rank, rank))
    genes = [f"g{i}" for i in range(2 * n_pairs)]
    ctrl = np.full(len(genes), 2.0)

    def profile(*targets):
        return ctrl + sum(A @ C @ A[genes.index(t)] for t in targets)

    return genes, ctrl, A, C, profile


def test_linear_baseline_recovers_exactly_linear_effects():
    genes, ctrl, A, _, profile = _linear_world()
    train = genes[:12]  # six complete pairs: their embeddings sum to zero
    test = ["g12", "g15", "g20", "g33"]
    profiles = {"ctrl": ctrl, **{g: profile(g) for g in train + test}}
    profiles["X1"] = ctrl + A @ np.array([0.3, -0.2, 0.5])  # a target that is not a gene
    profiles["X2"] = ctrl + 1.0
    adata = _cells(profiles, genes)
    kwargs = dict(perturbation_key=KEY, control_label="ctrl", normalize=False, min_cells=2)
    pred = cf.tl.perturbation_baseline(
        adata, test_perturbations=test + ["X2"], train_perturbations=train + ["X1"],
        method="linear", n_components=3, ridge=1e-9, **kwargs,
    )  # fmt: skip
    for name in test:
        np.testing.assert_allclose(pred[name].X.ravel(), profiles[name], atol=1e-6)
    # a target without a measured gene falls back to the training mean
    train_mean = np.mean([profiles[n] for n in train + ["X1"]], axis=0)
    np.testing.assert_allclose(pred["X2"].X.ravel(), train_mean, atol=1e-12)
    # the training mean cannot do this: the linear model is not just the fallback
    assert np.abs(train_mean - profiles["g12"]).max() > 0.1

    df = cf.tl.evaluate_perturbation(
        adata, pred, test_perturbations=test, train_perturbations=train + ["X1"],
        baselines=["train_mean"], method_name="linear K=3", **kwargs,
    )  # fmt: skip
    lin = df[df.method == "linear K=3"]
    assert np.allclose(lin[lin.metric == "pearson_delta"]["value"], 1.0, atol=1e-9)
    tm = df[(df.method == "train_mean") & (df.metric == "pearson_delta")]["value"]
    assert (tm < 0.99).all()


def test_linear_baseline_matches_the_published_formula(papalexi_small, lognorm):
    """K=10, lambda=0.1 on real data against the formula written out with sklearn's PCA."""
    from sklearn.decomposition import PCA

    train = [p for p in lognorm.obs[KEY].cat.categories if p not in TEST and p != CTRL]
    pred = cf.tl.perturbation_baseline(
        papalexi_small, perturbation_key=KEY, control_label=CTRL, test_perturbations=TEST
    )
    ctrl = _ref_means(lognorm, CTRL)
    Y = np.stack([_ref_means(lognorm, p) for p in [CTRL, *train]], axis=1)  # genes x conditions
    G = PCA(n_components=10, svd_solver="full").fit_transform(Y)  # genes as observations
    genes = list(lognorm.var_names)
    fitted = [CTRL] + [p for p in train if p in genes]
    P = np.stack([np.zeros(10) if p == CTRL else G[genes.index(p)] for p in fitted])
    D = np.stack([_ref_means(lognorm, p) - ctrl for p in fitted], axis=1)
    b = D.mean(axis=1, keepdims=True)
    W = np.linalg.inv(G.T @ G + 0.1 * np.eye(10)) @ G.T @ (D - b) @ P
    W = W @ np.linalg.inv(P.T @ P + 0.1 * np.eye(10))
    train_mean = np.mean([_ref_means(lognorm, p) for p in train], axis=0)
    for name in TEST:
        if name in genes:  # STAT1, JAK2
            expected = ctrl + b[:, 0] + G @ W @ G[genes.index(name)]
        else:
            expected = train_mean
        np.testing.assert_allclose(pred[name].X.ravel(), expected, rtol=1e-7, atol=1e-9)


def test_additive_baseline_for_combinations():
    genes, ctrl, _, _, profile = _linear_world(seed=1)
    profiles = {
        "ctrl": ctrl,
        "g0": profile("g0"),
        "g3": profile("g3"),
        "g5": profile("g5"),
        "g0+g3": profile("g0", "g3") + 0.05,  # not purely additive
        "g0+g7": profile("g0", "g7"),  # g7 alone is not in training
    }
    adata = _cells(profiles, genes)
    df = cf.tl.evaluate_perturbation(
        adata, perturbation_key=KEY, control_label="ctrl", normalize=False, min_cells=2,
        test_perturbations=["g0+g3", "g0+g7"], baselines=["additive", "control"],
    )  # fmt: skip
    assert set(df[df.method == "additive"].perturbation) == {"g0+g3"}
    expected = ctrl + (profiles["g0"] - ctrl) + (profiles["g3"] - ctrl)
    obs_delta = profiles["g0+g3"] - ctrl
    assert _value(df, "additive", "g0+g3", "mse") == pytest.approx(
        np.mean((expected - ctrl - obs_delta) ** 2)
    )
    with pytest.warns(UserWarning, match="cannot predict 'g0\\+g7'"):
        pred = cf.tl.perturbation_baseline(
            adata, perturbation_key=KEY, control_label="ctrl", normalize=False, min_cells=2,
            test_perturbations=["g0+g3", "g0+g7"], method="additive",
        )  # fmt: skip
    np.testing.assert_allclose(pred["g0+g3"].X.ravel(), expected, atol=1e-12)
    assert list(pred.obs_names) == ["g0+g3"]


# ---------------------------------------------------------------- errors


def test_errors(papalexi_small):
    kw = dict(perturbation_key=KEY, control_label=CTRL)
    evaluate = cf.tl.evaluate_perturbation
    with pytest.raises(ValueError, match="Unknown perturbations.*'STAT9'.*'FOO'"):
        evaluate(papalexi_small, test_perturbations=["STAT1", "STAT9", "FOO"], **kw)
    with pytest.raises(ValueError, match="Unknown perturbations in `train_perturbations`.*'BAR'"):
        evaluate(papalexi_small, test_perturbations=["STAT1"], train_perturbations=["BAR"], **kw)
    with pytest.raises(ValueError, match="Control label 'NT' not found.*'non-targeting'"):
        evaluate(
            papalexi_small, perturbation_key=KEY, control_label="NT", test_perturbations=["STAT1"]
        )
    with pytest.raises(ValueError, match="cannot be held out"):
        evaluate(papalexi_small, test_perturbations=[CTRL], **kw)
    with pytest.raises(ValueError, match="overlap: 'STAT1'"):
        evaluate(
            papalexi_small, test_perturbations=["STAT1"], train_perturbations=["STAT1", "IRF1"],
            **kw,
        )  # fmt: skip
    with pytest.raises(KeyError, match="'guide_rna' not found in adata.obs"):
        evaluate(
            papalexi_small, perturbation_key="guide_rna", control_label=CTRL,
            test_perturbations=["STAT1"],
        )  # fmt: skip
    with pytest.raises(ValueError, match="Unknown baselines \\['mean'\\]"):
        evaluate(papalexi_small, test_perturbations=["STAT1"], baselines=["mean"], **kw)

    means = cf.tl.perturbation_means(papalexi_small, **kw)
    with pytest.raises(ValueError, match="1 missing \\(e.g. 'STAT1'\\)"):
        evaluate(
            papalexi_small, means[:, means.var_names != "STAT1"], test_perturbations=["IRF1"], **kw
        )
    renamed = means.to_df().rename(columns={"JAK2": "JAK-2"})
    with pytest.raises(ValueError, match="'JAK2'.*1 not in adata \\(e.g. 'JAK-2'\\)"):
        evaluate(papalexi_small, renamed, test_perturbations=["IRF1"], **kw)
    with pytest.raises(ValueError, match="no row for 'IRF1'"):
        evaluate(papalexi_small, means[["STAT1"]], test_perturbations=["STAT1", "IRF1"], **kw)
    with pytest.raises(TypeError, match="must be an AnnData"):
        evaluate(papalexi_small, means.X, test_perturbations=["STAT1"], **kw)
    with pytest.raises(ValueError, match="also the name of a baseline"):
        evaluate(papalexi_small, means, test_perturbations=["STAT1"], method_name="linear", **kw)

    lognormed = papalexi_small.copy()
    sc.pp.normalize_total(lognormed, target_sum=1e4)
    sc.pp.log1p(lognormed)
    with pytest.raises(ValueError, match="non-integer values.*normalize=False"):
        cf.tl.perturbation_means(lognormed, **kw)
    with pytest.warns(UserWarning, match="fewer than 40 cells: SPI1"):
        evaluate(
            papalexi_small, test_perturbations=["SPI1"], baselines=["control"], min_cells=40, **kw
        )


# ---------------------------------------------------------------- plot


def test_perturbation_effect_plot(papalexi_small, tmp_path):
    kw = dict(perturbation_key=KEY, control_label=CTRL)
    pred = cf.tl.perturbation_baseline(
        papalexi_small, test_perturbations=["STAT1"], method="train_mean", **kw
    )
    ax = cf.pl.perturbation_effect(papalexi_small, pred, "STAT1", n_genes=8, show=False, **kw)
    assert isinstance(ax, matplotlib.axes.Axes)
    means = cf.tl.perturbation_means(papalexi_small, **kw)
    top = cf.tl.evaluate_perturbation(
        papalexi_small, test_perturbations=["STAT1"], baselines=["control"], n_top_de=8, **kw
    ).attrs["top_de_genes"]["STAT1"]
    assert [t.get_text() for t in ax.get_xticklabels()] == top
    observed = (means["STAT1", top].X - means[CTRL, top].X).ravel()
    predicted = (pred["STAT1", top].X - means[CTRL, top].X).ravel()
    heights = np.array([p.get_height() for p in ax.patches])
    np.testing.assert_allclose(heights, np.concatenate([observed, predicted]), atol=1e-12)
    plt.close("all")
    with pytest.raises(ValueError, match="is the control"):
        cf.pl.perturbation_effect(papalexi_small, None, CTRL, show=False, **kw)
