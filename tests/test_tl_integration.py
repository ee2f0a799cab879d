from __future__ import annotations

import sys

import anndata as ad
import matplotlib
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
from scipy.sparse.csgraph import connected_components
from sklearn.metrics import silhouette_score
from sklearn.neighbors import kneighbors_graph

import cellformers as cf

matplotlib.use("Agg")

_benchmark = pytest.importorskip("scib_metrics.benchmark")
BioConservation = _benchmark.BioConservation
BatchCorrection = _benchmark.BatchCorrection

# A fast subset (seconds on CellBench); kBET and BRAS take about a minute to compile.
FAST_BIO = BioConservation(
    isolated_labels=False,
    nmi_ari_cluster_labels_kmeans=False,
    silhouette_label=True,
    clisi_knn=False,
)
FAST_BATCH = BatchCorrection(
    bras=False, ilisi_knn=False, kbet_per_label=False, graph_connectivity=True, pcr_comparison=False
)
ONLY_PCR = BatchCorrection(
    bras=False, ilisi_knn=False, kbet_per_label=False, graph_connectivity=False, pcr_comparison=True
)


@pytest.fixture(scope="module")
def embedded(cellbench_path):
    """CellBench (raw counts) with a PCA embedding and a random-noise embedding."""
    adata = ad.read_h5ad(cellbench_path)
    norm = adata.copy()
    sc.pp.normalize_total(norm, target_sum=1e4)
    sc.pp.log1p(norm)
    sc.pp.highly_variable_genes(norm, n_top_genes=1000)
    sc.pp.pca(norm, n_comps=20, mask_var="highly_variable", random_state=0)
    adata.obsm["X_pca"] = norm.obsm["X_pca"]
    adata.obsm["X_random"] = np.random.default_rng(0).normal(size=(adata.n_obs, 20))
    return adata


@pytest.fixture(scope="module")
def results(embedded):
    return cf.tl.evaluate_integration(
        embedded,
        ["X_pca", "X_random"],
        batch_key="batch",
        label_key="cell_line",
        bio_conservation=FAST_BIO,
        batch_correction=FAST_BATCH,
        neighbors="exact",
    )


def _score(df, embedding, metric):
    row = df[(df["embedding"] == embedding) & (df["metric"] == metric)]
    assert len(row) == 1
    return row["value"].item()


def test_tidy_table(results):
    assert list(results.columns) == ["embedding", "metric", "category", "value"]
    assert set(results["embedding"]) == {"X_pca", "X_random"}
    expected = {
        ("Silhouette label", "bio_conservation"),
        ("Graph connectivity", "batch_correction"),
        ("Bio conservation", "aggregate"),
        ("Batch correction", "aggregate"),
        ("Total", "aggregate"),
    }
    for embedding in ("X_pca", "X_random"):
        rows = results[results["embedding"] == embedding]
        assert set(zip(rows["metric"], rows["category"], strict=True)) == expected
    assert results["value"].dtype == np.float64
    assert results["value"].between(0, 1).all()


def test_pca_conserves_biology_better_than_random(results):
    pca = _score(results, "X_pca", "Bio conservation")
    random = _score(results, "X_random", "Bio conservation")
    assert pca > random + 0.1
    for emb in ("X_pca", "X_random"):
        total = 0.6 * _score(results, emb, "Bio conservation") + 0.4 * _score(
            results, emb, "Batch correction"
        )
        assert _score(results, emb, "Total") == pytest.approx(total)


def test_values_match_independent_computation(embedded, results):
    labels = embedded.obs["cell_line"].to_numpy()
    for emb in ("X_pca", "X_random"):
        X = embedded.obsm[emb]
        # scib's label silhouette: the mean silhouette width rescaled to [0, 1]
        expected = (silhouette_score(X, labels) + 1) / 2
        assert _score(results, emb, "Silhouette label") == pytest.approx(expected, abs=1e-4)
        # graph connectivity: per label, the share of its cells in the largest strongly
        # connected component of the directed 15-nearest-neighbour graph (the cell itself is
        # one of the 15) restricted to that label
        graph = kneighbors_graph(X, n_neighbors=14)
        shares = []
        for label in np.unique(labels):
            mask = labels == label
            _, comp = connected_components(graph[mask][:, mask], connection="strong")
            shares.append(np.bincount(comp).max() / mask.sum())
        assert _score(results, emb, "Graph connectivity") == pytest.approx(np.mean(shares))


def test_input_is_unchanged_and_key_added(embedded):
    adata = embedded.copy()
    before = {
        "obs": list(adata.obs.columns),
        "obsm": list(adata.obsm),
        "uns": list(adata.uns),
        "varm": list(adata.varm),
        "obsp": list(adata.obsp),
        "var": list(adata.var.columns),
    }
    pca = adata.obsm["X_pca"].copy()
    # PCR comparison without a pre-integrated embedding: Benchmarker runs a PCA of X (into
    # "X_pca", the name of one of our embeddings) on its own copy
    df = cf.tl.evaluate_integration(
        adata,
        ["X_pca", "X_random"],
        batch_key="batch",
        label_key="cell_line",
        bio_conservation=False,
        batch_correction=ONLY_PCR,
        neighbors="exact",
        key_added="scib",
    )
    assert set(df["metric"]) == {"PCR comparison", "Batch correction"}
    assert list(adata.obs.columns) == before["obs"]
    assert list(adata.obsm) == before["obsm"]
    assert list(adata.uns) == before["uns"] + ["scib"]
    assert list(adata.varm) == before["varm"]
    assert list(adata.obsp) == before["obsp"]
    assert list(adata.var.columns) == before["var"]
    np.testing.assert_array_equal(adata.obsm["X_pca"], pca)
    pd.testing.assert_frame_equal(adata.uns["scib"], df)


def test_pcr_comparison_against_the_embedding_itself(embedded):
    # the same embedding before and after "integration": its batch variance did not change
    df = cf.tl.evaluate_integration(
        embedded,
        ["X_pca", "X_random"],
        batch_key="batch",
        label_key="cell_line",
        bio_conservation=False,
        batch_correction=ONLY_PCR,
        pre_integrated_key="X_pca",
        neighbors="exact",
    )
    assert _score(df, "X_pca", "PCR comparison") == pytest.approx(0.0, abs=1e-6)
    assert _score(df, "X_random", "PCR comparison") > 0.9  # noise carries no batch signal


def test_quiet_by_default(embedded, results, capfd):
    capfd.readouterr()
    cf.tl.evaluate_integration(
        embedded,
        "X_pca",
        batch_key="batch",
        label_key="cell_line",
        bio_conservation=FAST_BIO,
        batch_correction=False,
        neighbors="exact",
    )
    out, err = capfd.readouterr()
    assert out == ""
    assert err == ""


def test_metric_selection():
    from cellformers.tl._integration import _metric_selection

    assert _metric_selection(True, BioConservation, "b") == BioConservation()
    assert _metric_selection(False, BioConservation, "b") is None
    assert _metric_selection(FAST_BIO, BioConservation, "b") is FAST_BIO
    nothing = BatchCorrection(**dict.fromkeys(BatchCorrection.__dataclass_fields__, False))
    assert _metric_selection(nothing, BatchCorrection, "b") is None
    with pytest.raises(TypeError, match="must be a bool or a scib_metrics.benchmark.Batch"):
        _metric_selection(FAST_BIO, BatchCorrection, "batch_correction")


def test_errors(embedded):
    kw = dict(batch_key="batch", label_key="cell_line", neighbors="exact")
    fast = dict(bio_conservation=FAST_BIO, batch_correction=False)
    with pytest.raises(KeyError, match=r"\['X_scgpt'\] not found in adata.obsm"):
        cf.tl.evaluate_integration(embedded, ["X_pca", "X_scgpt"], **kw, **fast)
    with pytest.raises(KeyError, match="batch_key 'platforms' not found in adata.obs"):
        cf.tl.evaluate_integration(
            embedded, "X_pca", batch_key="platforms", label_key="cell_line", **fast
        )
    with pytest.raises(ValueError, match="No metric selected"):
        cf.tl.evaluate_integration(
            embedded, "X_pca", bio_conservation=False, batch_correction=False, **kw
        )
    with pytest.raises(ValueError, match="duplicates"):
        cf.tl.evaluate_integration(embedded, ["X_pca", "X_pca"], **kw, **fast)
    with pytest.raises(ValueError, match="neighbors must be"):
        cf.tl.evaluate_integration(
            embedded, "X_pca", batch_key="batch", label_key="cell_line", neighbors="faiss", **fast
        )
    one_batch = embedded[embedded.obs["batch"] == "CEL-seq2"].copy()
    with pytest.raises(ValueError, match="single batch.*batch_correction=False"):
        cf.tl.evaluate_integration(one_batch, "X_pca", batch_correction=FAST_BATCH, **kw)
    nan = embedded.copy()
    nan.obsm["X_pca"] = nan.obsm["X_pca"].copy()
    nan.obsm["X_pca"][0, 0] = np.nan
    with pytest.raises(ValueError, match=r"adata.obsm\['X_pca'\] contains non-finite"):
        cf.tl.evaluate_integration(nan, "X_pca", **kw, **fast)
    missing = embedded.copy()
    missing.obs["cell_line"] = missing.obs["cell_line"].astype(object)
    missing.obs.iloc[0, missing.obs.columns.get_loc("cell_line")] = np.nan
    with pytest.raises(ValueError, match=r"adata.obs\['cell_line'\] has 1 missing values"):
        cf.tl.evaluate_integration(missing, "X_pca", **kw, **fast)


def test_missing_scib_metrics_says_how_to_install(embedded, monkeypatch):
    monkeypatch.setitem(sys.modules, "scib_metrics", None)
    with pytest.raises(ImportError, match=r'pip install "cellformers\[eval\]"'):
        cf.tl.evaluate_integration(
            embedded, "X_pca", batch_key="batch", label_key="cell_line", neighbors="exact"
        )


def test_plot_integration_scores(results, tmp_path):
    import matplotlib.pyplot as plt
    from matplotlib.axes import Axes

    ax = cf.pl.integration_scores(results, show=False)
    assert isinstance(ax, Axes)
    ticks = [t.get_text() for t in ax.get_xticklabels()]
    # grouped: bio conservation, then batch correction, then the aggregates
    assert ticks == [
        "Silhouette label",
        "Graph connectivity",
        "Bio conservation",
        "Batch correction",
        "Total",
    ]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["X_pca", "X_random"]
    texts = {t.get_text() for t in ax.texts}
    assert f"{_score(results, 'X_pca', 'Total'):.2f}" in texts
    assert {"bio conservation", "batch correction", "aggregate"} <= texts
    plt.close("all")

    figdir = sc.settings.figdir
    sc.settings.figdir = tmp_path
    try:
        cf.pl.integration_scores(results, show=False, save="_test.png")
    finally:
        sc.settings.figdir = figdir
        plt.close("all")
    assert (tmp_path / "integration_scores_test.png").stat().st_size > 0

    with pytest.raises(ValueError, match=r"lacks the columns \['category'\]"):
        cf.pl.integration_scores(results.drop(columns="category"), show=False)
