from __future__ import annotations

import logging

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
from sklearn.neighbors import KNeighborsClassifier

import cellformers as cf


@pytest.fixture(scope="module")
def embedded(cellbench_path):
    """CellBench (raw counts) with a PCA embedding in obsm['X_pca'], computed on a copy."""
    adata = ad.read_h5ad(cellbench_path)
    norm = adata.copy()
    sc.pp.normalize_total(norm, target_sum=1e4)
    sc.pp.log1p(norm)
    sc.pp.highly_variable_genes(norm, n_top_genes=1000)
    sc.pp.pca(norm, n_comps=20, mask_var="highly_variable", random_state=0)
    adata.obsm["X_pca"] = norm.obsm["X_pca"]
    # a blurred version with mixed neighbourhoods (confidences below 1, some wrong labels)
    noise = np.random.default_rng(0).normal(size=(adata.n_obs, 5))
    adata.obsm["X_noisy"] = (
        adata.obsm["X_pca"][:, :5] + 0.5 * adata.obsm["X_pca"][:, :2].std() * noise
    )
    return adata


@pytest.fixture
def split(embedded):
    """Reference = CEL-seq2 cells, query = Drop-seq cells (another platform)."""
    reference = embedded[embedded.obs["batch"] == "CEL-seq2"].copy()
    query = embedded[embedded.obs["batch"] == "Drop-seq"].copy()
    return query, reference


def _sklearn_reference(query, reference, *, k, metric, weighting, use_rep="X_noisy"):
    clf = KNeighborsClassifier(n_neighbors=k, metric=metric, weights=weighting)
    clf.fit(reference.obsm[use_rep], reference.obs["cell_line"].astype(str).to_numpy())
    proba = clf.predict_proba(query.obsm[use_rep])
    return clf.classes_[proba.argmax(axis=1)], proba.max(axis=1)


def test_cross_platform_accuracy_well_above_chance(split):
    query, reference = split
    cf.tl.transfer_labels(query, reference, label_key="cell_line", use_rep="X_pca")
    truth = query.obs["cell_line"].astype(str).to_numpy()
    predicted = query.obs["transferred_label"].astype(str).to_numpy()
    accuracy = np.mean(predicted == truth)
    # chance: always guessing the most frequent reference label
    chance = np.mean(truth == reference.obs["cell_line"].value_counts().idxmax())
    assert chance < 0.5
    assert accuracy > 0.9
    assert accuracy > chance + 0.4


@pytest.mark.parametrize(
    ("metric", "weighting"), [("euclidean", "distance"), ("cosine", "uniform")]
)
def test_matches_sklearn_knn_classifier(split, metric, weighting):
    query, reference = split
    cf.tl.transfer_labels(
        query, reference, label_key="cell_line", use_rep="X_noisy", k=10, metric=metric,
        weighting=weighting,
    )  # fmt: skip
    labels, share = _sklearn_reference(query, reference, k=10, metric=metric, weighting=weighting)
    np.testing.assert_array_equal(query.obs["transferred_label"].astype(str).to_numpy(), labels)
    confidence = query.obs["transferred_label_confidence"].to_numpy()
    np.testing.assert_allclose(confidence, share, rtol=1e-6)
    assert confidence.min() >= 0.0
    assert confidence.max() <= 1.0
    assert confidence.min() < 1.0  # not all neighbourhoods are pure
    assert isinstance(query.obs["transferred_label"].dtype, pd.CategoricalDtype)
    assert list(query.obs["transferred_label"].cat.categories) == list(
        reference.obs["cell_line"].cat.categories
    )


def test_only_outputs_are_written(split):
    query, reference = split
    q_before, r_before = query.copy(), reference.copy()
    cf.tl.transfer_labels(query, reference, label_key="cell_line", use_rep="X_pca", key_added="tl")
    assert list(query.obs.columns) == list(q_before.obs.columns) + ["tl", "tl_confidence"]
    pd.testing.assert_frame_equal(query.obs[q_before.obs.columns], q_before.obs)
    for before, after in ((q_before, query), (r_before, reference)):
        assert list(after.obsm) == list(before.obsm)
        assert list(after.uns) == list(before.uns)
        assert list(after.layers) == list(before.layers)
        assert (after.X != before.X).nnz == 0
    pd.testing.assert_frame_equal(reference.obs, r_before.obs)


def test_copy_returns_labelled_copy(split):
    query, reference = split
    out = cf.tl.transfer_labels(query, reference, label_key="cell_line", use_rep="X_pca", copy=True)
    assert "transferred_label" not in query.obs
    assert out is not query
    assert out.obs["transferred_label"].notna().all()
    assert cf.tl.transfer_labels(query, reference, label_key="cell_line", use_rep="X_pca") is None


def test_query_order_does_not_matter(split):
    query, reference = split
    order = np.random.default_rng(0).permutation(query.n_obs)
    shuffled = query[order].copy()
    cf.tl.transfer_labels(query, reference, label_key="cell_line", use_rep="X_noisy")
    cf.tl.transfer_labels(shuffled, reference, label_key="cell_line", use_rep="X_noisy")
    expected = query.obs.iloc[order]
    np.testing.assert_array_equal(
        shuffled.obs["transferred_label"].to_numpy(), expected["transferred_label"].to_numpy()
    )
    np.testing.assert_allclose(
        shuffled.obs["transferred_label_confidence"].to_numpy(),
        expected["transferred_label_confidence"].to_numpy(),
        rtol=1e-12,
    )


def test_unknown_threshold(split):
    query, reference = split
    kwargs = dict(label_key="cell_line", use_rep="X_noisy", weighting="uniform", k=15)
    cf.tl.transfer_labels(query, reference, **kwargs)
    plain = query.obs["transferred_label"].astype(str).to_numpy()
    confidence = query.obs["transferred_label_confidence"].to_numpy()
    threshold = float(np.quantile(confidence, 0.1)) + 1e-9
    assert 0 < np.sum(confidence < threshold) < query.n_obs
    cf.tl.transfer_labels(
        query, reference, unknown_threshold=threshold, unknown_label="none", **kwargs
    )
    labels = query.obs["transferred_label"].astype(str).to_numpy()
    low = confidence < threshold
    assert np.all(labels[low] == "none")
    np.testing.assert_array_equal(labels[~low], plain[~low])
    assert query.obs["transferred_label"].cat.categories[-1] == "none"
    # uniform votes: the confidence is the share of the k neighbours with the winning label
    np.testing.assert_allclose(confidence * 15, np.round(confidence * 15), atol=1e-9)


def test_unlabelled_reference_cells_are_left_out(split, caplog):
    query, reference = split
    dropped = np.zeros(reference.n_obs, dtype=bool)
    dropped[::7] = True
    masked = reference.copy()
    masked.obs["cell_line"] = masked.obs["cell_line"].astype(object)
    masked.obs.loc[dropped, "cell_line"] = np.nan
    with caplog.at_level(logging.WARNING, logger="cellformers"):
        out = cf.tl.transfer_labels(
            query, masked, label_key="cell_line", use_rep="X_noisy", copy=True
        )
    assert f"{dropped.sum()} of {reference.n_obs} reference cells have no label" in caplog.text
    expected = cf.tl.transfer_labels(
        query, reference[~dropped].copy(), label_key="cell_line", use_rep="X_noisy", copy=True
    )
    np.testing.assert_array_equal(
        out.obs["transferred_label"].astype(str), expected.obs["transferred_label"].astype(str)
    )
    np.testing.assert_allclose(
        out.obs["transferred_label_confidence"], expected.obs["transferred_label_confidence"]
    )


class _StandIn:
    """Minimal model: looks each cell's embedding up by name and counts the calls."""

    def __init__(self, table: pd.DataFrame):
        self.table = table
        self.calls = 0

    def get_latent_representation(self, adata):
        self.calls += 1
        return self.table.loc[adata.obs_names].to_numpy()


def test_model_computes_and_stores_missing_embeddings(split, embedded):
    query, reference = split
    expected = cf.tl.transfer_labels(
        query, reference, label_key="cell_line", use_rep="X_noisy", copy=True
    )
    model = _StandIn(pd.DataFrame(embedded.obsm["X_noisy"], index=embedded.obs_names))
    with pytest.raises(KeyError, match="'X_emb' not found in reference.obsm.*pass `model=`"):
        cf.tl.transfer_labels(query, reference, label_key="cell_line", use_rep="X_emb")
    cf.tl.transfer_labels(query, reference, label_key="cell_line", use_rep="X_emb", model=model)
    assert model.calls == 2
    np.testing.assert_allclose(query.obsm["X_emb"], model.table.loc[query.obs_names])
    np.testing.assert_allclose(reference.obsm["X_emb"], model.table.loc[reference.obs_names])
    np.testing.assert_array_equal(
        query.obs["transferred_label"].to_numpy(), expected.obs["transferred_label"].to_numpy()
    )
    # stored embeddings are reused, not recomputed
    cf.tl.transfer_labels(query, reference, label_key="cell_line", use_rep="X_emb", model=model)
    assert model.calls == 2
    with pytest.raises(TypeError, match="no get_latent_representation"):
        cf.tl.transfer_labels(query, reference, label_key="cell_line", use_rep="X", model=object())


def test_errors(split):
    query, reference = split
    kw = dict(label_key="cell_line", use_rep="X_pca")
    with pytest.raises(KeyError, match="'celltype' not found in reference.obs"):
        cf.tl.transfer_labels(query, reference, label_key="celltype", use_rep="X_pca")
    with pytest.raises(KeyError, match="'X_umap' not found in reference.obsm"):
        cf.tl.transfer_labels(query, reference, label_key="cell_line", use_rep="X_umap")
    with pytest.raises(ValueError, match=r"k must be an integer between 1 and .*\(240\), got 0"):
        cf.tl.transfer_labels(query, reference, k=0, **kw)
    with pytest.raises(ValueError, match=r"labelled reference cells \(240\), got 241"):
        cf.tl.transfer_labels(query, reference, k=241, **kw)
    with pytest.raises(ValueError, match="metric must be"):
        cf.tl.transfer_labels(query, reference, metric="manhattan", **kw)
    with pytest.raises(ValueError, match="weighting must be"):
        cf.tl.transfer_labels(query, reference, weighting="rank", **kw)
    with pytest.raises(ValueError, match=r"unknown_threshold must be in \[0, 1\]"):
        cf.tl.transfer_labels(query, reference, unknown_threshold=1.5, **kw)
    with pytest.raises(ValueError, match="'H1975' is also a reference label"):
        cf.tl.transfer_labels(query, reference, unknown_threshold=0.5, unknown_label="H1975", **kw)
    narrow = query.copy()
    narrow.obsm["X_pca"] = narrow.obsm["X_pca"][:, :10]
    with pytest.raises(ValueError, match="differ in dimension.*10 columns.*has 20"):
        cf.tl.transfer_labels(narrow, reference, **kw)
    nan = query.copy()
    nan.obsm["X_pca"] = nan.obsm["X_pca"].copy()
    nan.obsm["X_pca"][3, 1] = np.nan
    with pytest.raises(ValueError, match=r"query.obsm\['X_pca'\] contains non-finite.*1 cells"):
        cf.tl.transfer_labels(nan, reference, **kw)
    assert "transferred_label" not in nan.obs
    unlabelled = reference.copy()
    unlabelled.obs["cell_line"] = np.nan
    with pytest.raises(ValueError, match="has no labels"):
        cf.tl.transfer_labels(query, unlabelled, **kw)
