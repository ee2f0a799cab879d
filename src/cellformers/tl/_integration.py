"""Integration benchmark of cell embeddings with scib-metrics, as a tidy table."""

from __future__ import annotations

import gc
import logging
import warnings
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import asdict
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd
from anndata import AnnData
from mudata import MuData

from ._transfer import _check_embedding

if TYPE_CHECKING:
    from scib_metrics.benchmark import BatchCorrection, BioConservation

_CATEGORY = {
    "Bio conservation": "bio_conservation",
    "Batch correction": "batch_correction",
    "Aggregate score": "aggregate",
}
_COLUMNS = ["embedding", "metric", "category", "value"]
_AGGREGATES = ["Bio conservation", "Batch correction", "Total"]


def _import_scib_metrics():
    try:
        import scib_metrics  # noqa: F401
        from scib_metrics import benchmark
    except ImportError as err:
        raise ImportError(
            'evaluate_integration needs scib-metrics: `pip install "cellformers[eval]"` (or '
            '`pip install "scib-metrics>=0.5"`).'
        ) from err
    return benchmark


def _metric_selection(value, cls, name: str):
    """Turn ``True``/``False``/a selection object into what Benchmarker takes."""
    if value is True:
        return cls()
    if value is False or value is None:
        return None
    if isinstance(value, cls):
        return value if any(v is not False for v in asdict(value).values()) else None
    raise TypeError(
        f"`{name}` must be a bool or a scib_metrics.benchmark.{cls.__name__}, "
        f"got {type(value).__name__}."
    )


def _exact_neighbors(n_jobs: int) -> Callable:
    """Exact kNN (scikit-learn) in scib-metrics' ``NeighborsResults`` format."""
    from scib_metrics.nearest_neighbors import NeighborsResults
    from sklearn.neighbors import NearestNeighbors

    def compute(X: np.ndarray, n_neighbors: int):
        dist, idx = NearestNeighbors(n_neighbors=n_neighbors, n_jobs=n_jobs).fit(X).kneighbors(X)
        return NeighborsResults(indices=idx, distances=dist)

    return compute


@contextmanager
def _benchmark_context(verbose: bool):
    """Quiet and fast conditions for a Benchmarker run.

    scib-metrics' own logger (kBET logs every skipped label) is silenced unless ``verbose``.
    Benchmarker calls ``gc.collect()`` before every metric; with torch and scvi-tools loaded
    each full collection takes about a second, so the objects that exist before the run are
    frozen (skipped by the collector) for its duration.
    scanpy's deprecation warning about Benchmarker's PCA call is hidden.
    """
    scib_logger = logging.getLogger("scib_metrics")
    level = scib_logger.level
    if not verbose:
        scib_logger.setLevel(logging.WARNING)
    freeze = gc.get_freeze_count() == 0  # leave a caller's own frozen objects alone
    if freeze:
        gc.freeze()
    try:
        with warnings.catch_warnings():
            # Benchmarker's own PCA call uses an argument that scanpy deprecated
            warnings.filterwarnings(
                "ignore", message=".*use_highly_variable.*", category=FutureWarning
            )
            yield
    finally:
        if freeze:
            gc.unfreeze()
        scib_logger.setLevel(level)


def evaluate_integration(
    adata: AnnData | MuData,
    embedding_keys: str | Sequence[str],
    *,
    batch_key: str,
    label_key: str,
    bio_conservation: bool | BioConservation = True,
    batch_correction: bool | BatchCorrection = True,
    pre_integrated_key: str | None = None,
    neighbors: Literal["pynndescent", "exact"] | Callable = "pynndescent",
    n_jobs: int = 1,
    verbose: bool = False,
    key_added: str | None = None,
) -> pd.DataFrame:
    """Score how well embeddings remove batch effects and keep biology (scIB metrics).

    Runs scib-metrics' :class:`~scib_metrics.benchmark.Benchmarker` on the embeddings in
    ``adata.obsm`` and returns its results (raw metric values, not min-max scaled) as a tidy
    table. The benchmark runs on a light AnnData holding only the embeddings and the two
    ``obs`` columns, so ``adata`` is left unchanged (except ``uns[key_added]``, if asked for).

    Parameters
    ----------
    adata
        Cells with the embeddings in ``obsm`` (an AnnData or a MuData, whose global ``obs`` and
        ``obsm`` are read).
    embedding_keys
        ``obsm`` keys of the embeddings to compare (e.g. ``["X_pca", "X_scgpt"]``).
    batch_key
        Column of ``adata.obs`` with the batches to integrate.
    label_key
        Column of ``adata.obs`` with the cell types (the biology to conserve).
    bio_conservation
        Bio-conservation metrics: `True` for scib-metrics' defaults, `False` for none, or a
        :class:`~scib_metrics.benchmark.BioConservation` choosing a subset, e.g.
        ``BioConservation(isolated_labels=False, clisi_knn=False)``.
    batch_correction
        Batch-correction metrics, as ``bio_conservation`` with a
        :class:`~scib_metrics.benchmark.BatchCorrection`.
    pre_integrated_key
        ``obsm`` key of an unintegrated embedding of the same cells, used by the PCR
        comparison metric. `None`: PCA of ``adata.X`` (as scib-metrics does; ``adata.X``
        should then hold normalised, log-transformed values), computed on the light copy.
    neighbors
        How the kNN graphs (15, 50 and 90 neighbours) are computed: ``"pynndescent"``
        (scib-metrics' default, approximate; its first call in a session compiles for about
        half a minute), ``"exact"`` (scikit-learn, exact; fast for up to some ten thousand
        cells), or a function ``(X, n_neighbors) -> scib_metrics.nearest_neighbors.NeighborsResults``.
    n_jobs
        Parallel jobs for the neighbour search.
    verbose
        Show scib-metrics' progress bars and log messages.
    key_added
        If given, also store the table in ``adata.uns[key_added]``.

    Returns
    -------
    A DataFrame with one row per embedding and metric and the columns

    ``embedding``
        The ``obsm`` key.
    ``metric``
        The metric's name as scib-metrics reports it (``"Silhouette label"``, ``"KMeans NMI"``,
        ``"iLISI"`` …); the aggregates are ``"Bio conservation"``, ``"Batch correction"``
        (means of their metrics) and ``"Total"`` (0.4 × batch correction + 0.6 × bio
        conservation, with both).
    ``category``
        ``"bio_conservation"``, ``"batch_correction"`` or ``"aggregate"``.
    ``value``
        The score (higher is better).

    Examples
    --------
    >>> from scib_metrics.benchmark import BioConservation
    >>> df = cf.tl.evaluate_integration(
    ...     adata, ["X_pca", "X_scgpt"], batch_key="batch", label_key="cell_type"
    ... )
    >>> cf.pl.integration_scores(df)

    """
    if not isinstance(adata, AnnData | MuData):
        raise TypeError(f"Expected an AnnData or MuData object, got {type(adata).__name__}.")
    benchmark = _import_scib_metrics()
    bio = _metric_selection(bio_conservation, benchmark.BioConservation, "bio_conservation")
    batch = _metric_selection(batch_correction, benchmark.BatchCorrection, "batch_correction")
    if bio is None and batch is None:
        raise ValueError(
            "No metric selected: pass `bio_conservation` and/or `batch_correction` as True or "
            "as a selection with at least one metric."
        )

    keys = [embedding_keys] if isinstance(embedding_keys, str) else list(embedding_keys)
    if not keys:
        raise ValueError("embedding_keys is empty; pass at least one obsm key.")
    if len(set(keys)) < len(keys):
        raise ValueError(f"embedding_keys contains duplicates: {keys}.")
    missing = [key for key in keys if key not in adata.obsm]
    if missing:
        raise KeyError(
            f"Embeddings {missing} not found in adata.obsm (available: {list(adata.obsm)})."
        )
    for key, role in ((batch_key, "batch_key"), (label_key, "label_key")):
        if key not in adata.obs:
            raise KeyError(f"{role} {key!r} not found in adata.obs (available: {list(adata.obs)}).")
        if adata.obs[key].isna().any():
            raise ValueError(
                f"adata.obs[{key!r}] has {int(adata.obs[key].isna().sum())} missing values; "
                "drop or label those cells first."
            )
    if adata.obs[label_key].nunique() < 2:
        raise ValueError(f"adata.obs[{label_key!r}] needs at least 2 labels to score.")
    if batch is not None and adata.obs[batch_key].nunique() < 2:
        raise ValueError(
            f"adata.obs[{batch_key!r}] has a single batch: nothing to integrate. "
            "Pass `batch_correction=False` to score bio conservation only."
        )
    if adata.n_obs < 90:
        raise ValueError(f"scib-metrics needs at least 90 cells, got {adata.n_obs}.")
    if neighbors == "exact":
        neighbor_computer = _exact_neighbors(n_jobs)
    elif neighbors == "pynndescent":
        neighbor_computer = None
    elif callable(neighbors):
        neighbor_computer = neighbors
    else:
        raise ValueError(
            f"neighbors must be 'pynndescent', 'exact' or a function, got {neighbors!r}."
        )

    # Benchmarker writes into the AnnData it gets (PCA into obsm/uns/varm, neighbour results,
    # obs columns of views): give it a light copy under neutral names.
    names = {f"emb{i}": key for i, key in enumerate(keys)}
    # copies: Benchmarker rescales the embeddings it gets in place
    obsm = {
        name: _check_embedding(
            adata.obsm[key], name=f"adata.obsm[{key!r}]", n_obs=adata.n_obs
        ).copy()
        for name, key in names.items()
    }
    needs_pre = batch is not None and batch.pcr_comparison is not False
    X = None
    if needs_pre and pre_integrated_key is not None:
        if pre_integrated_key not in adata.obsm:
            raise KeyError(
                f"pre_integrated_key {pre_integrated_key!r} not found in adata.obsm "
                f"(available: {list(adata.obsm)})."
            )
        obsm["pre"] = _check_embedding(
            adata.obsm[pre_integrated_key],
            name=f"adata.obsm[{pre_integrated_key!r}]",
            n_obs=adata.n_obs,
        ).copy()
    elif needs_pre:
        if isinstance(adata, MuData) or adata.X is None:
            raise ValueError(
                "The PCR comparison metric needs an unintegrated embedding: pass "
                "`pre_integrated_key` (for a MuData, e.g. a PCA of the RNA modality stored in "
                "mdata.obsm) or put normalised expression in adata.X."
            )
        X = adata.X
    obs = pd.DataFrame(
        {"batch": adata.obs[batch_key].to_numpy(), "label": adata.obs[label_key].to_numpy()},
        index=adata.obs_names.copy(),
    )
    light = AnnData(X=X, obs=obs, obsm=obsm)
    if X is None:
        # without PCR the pre-integrated embedding is unused: name one to skip Benchmarker's PCA
        pre = "pre" if "pre" in obsm else "emb0"
    else:
        pre = None

    bm = benchmark.Benchmarker(
        light,
        batch_key="batch",
        label_key="label",
        embedding_obsm_keys=list(names),
        bio_conservation_metrics=bio,
        batch_correction_metrics=batch,
        pre_integrated_embedding_obsm_key=pre,
        n_jobs=n_jobs,
        progress_bar=verbose,
    )
    with _benchmark_context(verbose):
        bm.prepare(neighbor_computer=neighbor_computer)
        bm.benchmark()
        wide = bm.get_results(min_max_scale=False, clean_names=True)

    metric_type = wide.loc["Metric Type"]
    scores = wide.drop(index="Metric Type")
    # bio conservation metrics, batch correction metrics, then the aggregates in _AGGREGATES
    # order (scib-metrics sorts them alphabetically); sorted() keeps the metric order
    order = list(_CATEGORY)
    metrics = sorted(
        scores.columns,
        key=lambda m: (
            order.index(metric_type[m]),
            _AGGREGATES.index(m) if m in _AGGREGATES else 0,
        ),
    )
    rows = [
        (names[name], metric, _CATEGORY[metric_type[metric]], float(scores.loc[name, metric]))
        for name in names
        for metric in metrics
    ]
    result = pd.DataFrame(rows, columns=_COLUMNS)
    if key_added is not None:
        adata.uns[key_added] = result
    return result
