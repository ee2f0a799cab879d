"""Evaluation of perturbation-response predictions against simple, honest baselines.

Predictions follow one contract: an :class:`~anndata.AnnData` with one row per perturbation
(``obs_names`` are the perturbation labels) and the genes of the data as ``var_names``, or a
:class:`~pandas.DataFrame` indexed by perturbation with one column per gene. The values are mean
expression profiles on the same scale as :func:`perturbation_means` (by default the mean of
``log1p`` of counts per 10,000).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from ..data._validation import check_expression, check_setup_keys, check_unique

__all__ = [
    "evaluate_perturbation",
    "perturbation_baseline",
    "perturbation_means",
    "summarize_perturbation_metrics",
]

BaselineName = Literal["control", "train_mean", "linear", "additive"]
_BASELINES: tuple[str, ...] = ("control", "train_mean", "linear", "additive")
_COMBINATION_SEP = "+"
_TARGET_SUM = 1e4


# --------------------------------------------------------------------------------------------
# cell-level values and per-perturbation statistics
# --------------------------------------------------------------------------------------------


def _expression_values(adata: AnnData, *, layer: str | None, normalize: bool):
    """Per-cell values used everywhere: log1p(counts per 10,000) or the values as given."""
    check_setup_keys(adata, layer=layer)
    X = adata.X if layer is None else adata.layers[layer]
    name = "adata.X" if layer is None else f"adata.layers[{layer!r}]"
    if X is None:
        raise ValueError(f"{name} is empty. Pass `layer=` to use a layer that holds the data.")
    if not (sp.issparse(X) or isinstance(X, np.ndarray)):
        X = X[:] if hasattr(X, "__getitem__") else X  # backed or array-like: read into memory
        X = X if sp.issparse(X) else np.asarray(X)
    if normalize:
        check_expression(X, name=name, require_integer=False)
        values = X.data if sp.issparse(X) else np.asarray(X).reshape(-1)
        bad = values[values != np.round(values)][:3]
        if bad.size:
            raise ValueError(
                f"{name} contains non-integer values (e.g. {', '.join(f'{v:g}' for v in bad)}), "
                "but `normalize=True` expects raw counts. Pass the counts layer, e.g. "
                "`layer='counts'`, or `normalize=False` if the values are already log-normalised."
            )
        X = sp.csr_matrix(X, dtype=np.float64) if sp.issparse(X) else np.asarray(X, np.float64)
        totals = np.asarray(X.sum(axis=1)).ravel()
        scale = np.divide(_TARGET_SUM, totals, out=np.zeros_like(totals), where=totals > 0)
        if sp.issparse(X):
            X = sp.csr_matrix(sp.diags(scale) @ X)
            X.data = np.log1p(X.data)
        else:
            X = np.log1p(X * scale[:, None])
        return X
    values = X.data if sp.issparse(X) else np.asarray(X)
    if not np.all(np.isfinite(values)):
        raise ValueError(f"{name} contains NaN or infinite values; expression must be finite.")
    return sp.csr_matrix(X, dtype=np.float64) if sp.issparse(X) else np.asarray(X, np.float64)


def _labels(adata: AnnData, perturbation_key: str) -> pd.Categorical:
    check_setup_keys(adata, obs_keys=[perturbation_key])
    labels = adata.obs[perturbation_key]
    cat = labels.astype("category").cat.remove_unused_categories()
    cat = cat.cat.rename_categories([str(c) for c in cat.cat.categories])
    if not cat.cat.categories.is_unique:
        raise ValueError(
            f"adata.obs[{perturbation_key!r}] has labels that are equal as strings "
            f"({list(cat.cat.categories[cat.cat.categories.duplicated()][:5])}); make them unique."
        )
    return cat.values


@dataclass
class _GroupStats:
    """Mean and variance (ddof=1) of every gene in every perturbation group."""

    names: pd.Index
    n_cells: np.ndarray
    mean: np.ndarray
    var: np.ndarray
    var_names: pd.Index

    def row(self, name: str) -> int:
        return int(self.names.get_loc(name))


def _group_stats(X, labels: pd.Categorical, var_names: pd.Index) -> _GroupStats:
    codes = np.asarray(labels.codes)
    keep = np.flatnonzero(codes >= 0)  # cells without a label belong to no group
    n_groups = len(labels.categories)
    indicator = sp.csr_matrix(
        (np.ones(keep.size), (codes[keep], keep)), shape=(n_groups, X.shape[0])
    )
    n = np.asarray(indicator.sum(axis=1)).ravel()
    squares = X.multiply(X) if sp.issparse(X) else X * X
    sums, sums_sq = (indicator @ X, indicator @ squares)
    sums = sums.toarray() if sp.issparse(sums) else np.asarray(sums)
    sums_sq = sums_sq.toarray() if sp.issparse(sums_sq) else np.asarray(sums_sq)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = sums / n[:, None]
        var = (sums_sq - n[:, None] * mean**2) / (n[:, None] - 1)
    var = np.where(n[:, None] > 1, np.maximum(var, 0.0), np.nan)
    return _GroupStats(pd.Index(labels.categories), n.astype(int), mean, var, var_names)


def _welch_t(stats: _GroupStats, group: str, control: str) -> np.ndarray:
    """Welch t-statistic of every gene, ``group`` vs ``control`` (NaN, from 0/0, set to 0)."""
    i, c = stats.row(group), stats.row(control)
    se = np.sqrt(stats.var[i] / stats.n_cells[i] + stats.var[c] / stats.n_cells[c])
    with np.errstate(invalid="ignore", divide="ignore"):
        t = (stats.mean[i] - stats.mean[c]) / se
    return np.nan_to_num(t, nan=0.0, posinf=np.inf, neginf=-np.inf)


def _top_de(stats: _GroupStats, group: str, control: str, n: int) -> np.ndarray:
    """Return the indices of the ``n`` genes with the largest ``|t|`` (ties: first gene first)."""
    t = _welch_t(stats, group, control)
    return np.argsort(-np.abs(t), kind="stable")[:n]


# --------------------------------------------------------------------------------------------
# argument checks
# --------------------------------------------------------------------------------------------


def _preview(names: Sequence[str], k: int = 10) -> str:
    names = list(names)
    more = f", … ({len(names)} in all)" if len(names) > k else ""
    return ", ".join(repr(n) for n in names[:k]) + more


def _check_control(stats: _GroupStats, control_label: str, perturbation_key: str) -> None:
    if control_label not in stats.names:
        raise ValueError(
            f"Control label {control_label!r} not found in adata.obs[{perturbation_key!r}] "
            f"(labels: {_preview(stats.names)}). Pass the label of the control cells as "
            "`control_label`, e.g. 'non-targeting'."
        )


def _as_name_list(names: str | Iterable[str], what: str) -> list[str]:
    if isinstance(names, str):
        names = [names]
    out = list(dict.fromkeys(str(n) for n in names))
    if not out:
        raise ValueError(f"`{what}` is empty; pass at least one perturbation.")
    return out


def _check_known(names: Sequence[str], stats: _GroupStats, what: str, key: str) -> None:
    unknown = [n for n in names if n not in stats.names]
    if unknown:
        raise ValueError(
            f"Unknown perturbations in `{what}`: {_preview(unknown)}. They have no cells in "
            f"adata.obs[{key!r}] (labels: {_preview(stats.names)})."
        )


def _resolve_split(
    stats: _GroupStats,
    *,
    perturbation_key: str,
    control_label: str,
    test_perturbations: str | Iterable[str],
    train_perturbations: str | Iterable[str] | None,
    min_cells: int,
) -> tuple[list[str], list[str]]:
    _check_control(stats, control_label, perturbation_key)
    test = _as_name_list(test_perturbations, "test_perturbations")
    _check_known(test, stats, "test_perturbations", perturbation_key)
    if control_label in test:
        raise ValueError(
            f"The control label {control_label!r} is in `test_perturbations`; the control is "
            "the reference of every comparison and cannot be held out."
        )
    if train_perturbations is None:
        train = [n for n in stats.names if n != control_label and n not in set(test)]
    else:
        train = _as_name_list(train_perturbations, "train_perturbations")
        _check_known(train, stats, "train_perturbations", perturbation_key)
        if control_label in train:
            raise ValueError(
                f"The control label {control_label!r} is in `train_perturbations`; the control "
                "is always used as the reference, leave it out."
            )
        overlap = [n for n in train if n in set(test)]
        if overlap:
            raise ValueError(
                f"`train_perturbations` and `test_perturbations` overlap: {_preview(overlap)}. "
                "A held-out perturbation must not be used for training."
            )
    small = [
        f"{n} ({stats.n_cells[stats.row(n)]})"
        for n in [control_label, *test, *train]
        if stats.n_cells[stats.row(n)] < min_cells
    ]
    if small:
        warnings.warn(
            f"Perturbations with fewer than {min_cells} cells: {', '.join(small)}. Their mean "
            "profiles and DE genes are noisy.",
            UserWarning,
            stacklevel=3,
        )
    return test, train


def _prediction_frame(
    predicted: AnnData | pd.DataFrame, var_names: pd.Index, names: Sequence[str]
) -> pd.DataFrame:
    """``predicted`` as a float DataFrame (perturbations × ``var_names``) after checks."""
    if isinstance(predicted, AnnData):
        X = predicted.X.toarray() if sp.issparse(predicted.X) else np.asarray(predicted.X)
        frame = pd.DataFrame(X, index=predicted.obs_names, columns=predicted.var_names)
    elif isinstance(predicted, pd.DataFrame):
        frame = predicted
    else:
        raise TypeError(
            "`predicted` must be an AnnData with one row per perturbation or a DataFrame "
            f"indexed by perturbation with one column per gene, not {type(predicted).__name__}."
        )
    frame = frame.set_axis(frame.index.astype(str), axis=0).set_axis(
        frame.columns.astype(str), axis=1
    )
    if not frame.index.is_unique:
        dups = frame.index[frame.index.duplicated()].unique()
        raise ValueError(f"`predicted` has duplicated perturbations: {_preview(dups)}.")
    check_unique(frame.columns, what="the genes of `predicted`")
    columns = set(frame.columns)
    missing = [g for g in var_names if g not in columns]
    extra = [g for g in frame.columns if g not in set(var_names)]
    if missing or extra:
        raise ValueError(
            f"The genes of `predicted` do not match adata.var_names: {len(missing)} missing "
            f"(e.g. {_preview(missing, 5)}), {len(extra)} not in adata (e.g. {_preview(extra, 5)}). "
            "Predict every gene of adata with the same names (the order does not matter)."
        )
    absent = [n for n in names if n not in frame.index]
    if absent:
        raise ValueError(
            f"`predicted` has no row for {_preview(absent)}. Predict every perturbation in "
            f"`test_perturbations` (rows present: {_preview(frame.index)})."
        )
    frame = frame.loc[list(names), list(var_names)].astype(np.float64)
    if not np.all(np.isfinite(frame.to_numpy())):
        raise ValueError("`predicted` contains NaN or infinite values.")
    return frame


# --------------------------------------------------------------------------------------------
# baselines on mean profiles
# --------------------------------------------------------------------------------------------


def _targets(name: str) -> list[str]:
    return [t.strip() for t in name.split(_COMBINATION_SEP)]


def _linear_predictions(
    stats: _GroupStats,
    control: str,
    train: Sequence[str],
    test: Sequence[str],
    fallback: np.ndarray,
    *,
    n_components: int,
    ridge: float,
) -> dict[str, np.ndarray]:
    ctrl = stats.mean[stats.row(control)]
    conditions = [control, *train]
    expr = stats.mean[[stats.row(n) for n in conditions]].T  # genes × conditions
    centred = expr - expr.mean(axis=0, keepdims=True)  # PCA with genes as observations
    u, s, _ = np.linalg.svd(centred, full_matrices=False)
    k = min(n_components, s.size)
    gene_emb = u[:, :k] * s[:k]  # genes × K: the principal-component scores of the genes
    gene_row = {g: i for i, g in enumerate(stats.var_names)}

    def embed(name: str) -> np.ndarray | None:
        if name == control:
            return np.zeros(k)
        parts = _targets(name)
        if not all(p in gene_row for p in parts):
            return None
        return gene_emb[[gene_row[p] for p in parts]].sum(axis=0)

    fit = [(n, e) for n in conditions if (e := embed(n)) is not None]
    if len(fit) < 2:  # only the control: nothing to learn from
        warnings.warn(
            "No training perturbation targets a measured gene; the linear baseline falls back "
            "to the training mean for every perturbation.",
            UserWarning,
            stacklevel=4,
        )
        return {n: fallback for n in test}
    change = (stats.mean[[stats.row(n) for n, _ in fit]] - ctrl).T  # genes × fitted conditions
    center = change.mean(axis=1)
    pert_emb = np.stack([e for _, e in fit], axis=1)  # K × fitted conditions
    eye = np.eye(k)
    left = np.linalg.solve(gene_emb.T @ gene_emb + ridge * eye, gene_emb.T)
    right = np.linalg.solve(pert_emb @ pert_emb.T + ridge * eye, pert_emb).T
    weights = left @ (change - center[:, None]) @ right  # K × K
    out = {}
    for name in test:
        e = embed(name)
        out[name] = fallback if e is None else ctrl + center + gene_emb @ (weights @ e)
    return out


def _baseline_predictions(
    stats: _GroupStats,
    method: str,
    *,
    control: str,
    train: Sequence[str],
    test: Sequence[str],
    n_components: int = 10,
    ridge: float = 0.1,
) -> dict[str, np.ndarray]:
    """Predicted mean profiles of ``test`` perturbations (missing keys: not predictable)."""
    ctrl = stats.mean[stats.row(control)]
    if method == "control":
        return {n: ctrl for n in test}
    if method == "additive":
        known = set(train)
        out = {}
        for name in test:
            parts = _targets(name)
            if len(parts) > 1 and all(p in known for p in parts):
                out[name] = ctrl + sum(stats.mean[stats.row(p)] - ctrl for p in parts)
        return out
    if not train:
        raise ValueError(
            f"The {method!r} baseline needs training perturbations, but there are none. Pass "
            "`train_perturbations` or hold out fewer perturbations."
        )
    train_mean = stats.mean[[stats.row(n) for n in train]].mean(axis=0)
    if method == "train_mean":
        return {n: train_mean for n in test}
    if method == "linear":
        return _linear_predictions(
            stats, control, train, test, train_mean, n_components=n_components, ridge=ridge
        )
    raise ValueError(f"Unknown baseline {method!r}; choose from {list(_BASELINES)}.")


# --------------------------------------------------------------------------------------------
# metrics
# --------------------------------------------------------------------------------------------


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    a = a - a.mean()
    b = b - b.mean()
    denom = np.sqrt((a @ a) * (b @ b))
    return float(a @ b / denom) if denom > 0 else float("nan")


def _metrics(pred_delta: np.ndarray, obs_delta: np.ndarray, top: np.ndarray) -> dict[str, float]:
    n = top.size
    err = (pred_delta - obs_delta) ** 2
    return {
        "pearson_delta": _pearson(pred_delta, obs_delta),
        f"pearson_delta_top{n}": _pearson(pred_delta[top], obs_delta[top]),
        "mse": float(err.mean()),
        f"mse_top{n}": float(err[top].mean()),
        f"direction_accuracy_top{n}": float(
            np.mean(np.sign(pred_delta[top]) == np.sign(obs_delta[top]))
        ),
    }


# --------------------------------------------------------------------------------------------
# public functions
# --------------------------------------------------------------------------------------------


def perturbation_means(
    adata: AnnData,
    *,
    perturbation_key: str,
    control_label: str,
    layer: str | None = None,
    normalize: bool = True,
) -> AnnData:
    """Mean expression profile of every perturbation (pseudobulk).

    This is also the format that perturbation predictions are expected in: one row per
    perturbation, the genes of ``adata`` as columns, values on the same scale.

    Parameters
    ----------
    adata
        Cells × genes. Raw counts in ``X`` (or ``layer``) when ``normalize`` is true.
    perturbation_key
        Column of ``adata.obs`` with the perturbation of every cell. Cells with a missing label
        are ignored. Combinations are written ``"A+B"``.
    control_label
        Label of the control cells (e.g. ``"non-targeting"``).
    layer
        Layer to read instead of ``adata.X``.
    normalize
        If true, every cell is scaled to 10,000 counts and ``log1p``-transformed (natural log,
        as ``sc.pp.normalize_total(target_sum=1e4)`` followed by ``sc.pp.log1p``) before
        averaging; the input must be non-negative integer counts. If false, the values are
        averaged as they are (for data that are already log-normalised).

    Returns
    -------
    AnnData with one row per perturbation (``obs_names``; in category order when the column is
    categorical, otherwise sorted), dense float64 ``X`` of mean profiles, ``obs['n_cells']`` and
    ``obs['is_control']``, a copy of ``adata.var`` and the settings in
    ``uns['perturbation_means']``. ``adata`` is not modified.

    Examples
    --------
    >>> import cellformers as cf
    >>> adata = cf.data.papalexi_eccite_lowmoi()
    >>> means = cf.tl.perturbation_means(
    ...     adata, perturbation_key="perturbation", control_label="non-targeting"
    ... )
    >>> means["STAT1"].X - means["non-targeting"].X  # change from control

    """
    labels = _labels(adata, perturbation_key)
    X = _expression_values(adata, layer=layer, normalize=normalize)
    stats = _group_stats(X, labels, adata.var_names)
    _check_control(stats, control_label, perturbation_key)
    obs = pd.DataFrame(
        {"n_cells": stats.n_cells, "is_control": stats.names == control_label},
        index=stats.names,
    )
    out = AnnData(X=stats.mean, obs=obs, var=adata.var.copy())
    out.uns["perturbation_means"] = {
        "perturbation_key": perturbation_key,
        "control_label": control_label,
        "layer": layer,
        "normalize": normalize,
    }
    return out


def perturbation_baseline(
    adata: AnnData,
    *,
    perturbation_key: str,
    control_label: str,
    test_perturbations: str | Sequence[str],
    train_perturbations: Sequence[str] | None = None,
    method: BaselineName = "linear",
    layer: str | None = None,
    normalize: bool = True,
    n_components: int = 10,
    ridge: float = 0.1,
    min_cells: int = 10,
) -> AnnData:
    """Predict the mean profiles of held-out perturbations with a simple baseline.

    All baselines are fitted on the mean profiles (see :func:`perturbation_means`) of the
    control and the training perturbations only.

    ``"control"``
        Predicts the control mean: no change.
    ``"train_mean"``
        The unweighted mean of the training perturbations' mean profiles.
    ``"linear"``
        The linear model of Ahlmann-Eltze, Huber & Anders (2025, *Nat Methods*; their
        ``run_linear_pretrained_model.R`` with gene and perturbation embeddings from the
        training data). Let ``Y`` be the genes ×
        conditions matrix of mean profiles of the control and the training perturbations. The
        gene embedding ``G`` (genes × K) holds the scores of the top ``K = n_components``
        principal components of ``Y`` with genes as observations (columns centred, not scaled;
        ``K`` is at most the number of conditions). A perturbation's embedding is the row of
        ``G`` of its target gene (the sum of the rows for a combination ``"A+B"``), and zero for
        the control. ``W`` (K × K) is the ridge solution of ``D - b ≈ G W Pᵀ``, where ``D`` is
        ``Y`` minus the control mean for the control and the training perturbations whose
        targets are all measured genes, ``P`` their embeddings and ``b`` the row means of ``D``:
        ``W = (GᵀG + λI)⁻¹ Gᵀ (D - b) P (PᵀP + λI)⁻¹`` with ``λ = ridge``. The prediction is
        ``control mean + b + G W p``. Perturbations with a target that is not a measured gene
        have no embedding and get the ``"train_mean"`` prediction.
    ``"additive"``
        For combinations ``"A+B"`` whose single perturbations are all in training: the control
        mean plus the sum of the singles' observed changes from control. Other perturbations
        are not predicted (left out of the result, with a warning).

    Parameters
    ----------
    adata
        Cells × genes.
    perturbation_key
        Column of ``adata.obs`` with the perturbation of every cell.
    control_label
        Label of the control cells.
    test_perturbations
        Perturbations to predict.
    train_perturbations
        Perturbations the baseline may learn from; by default every perturbation that is
        neither the control nor in ``test_perturbations``.
    method
        The baseline (see above).
    layer
        Layer to read instead of ``adata.X``.
    normalize
        Average ``log1p`` of counts per 10,000 (true) or the values as given (false).
    n_components
        Number of principal components ``K`` of the linear baseline (10 in the paper).
    ridge
        Ridge penalty ``λ`` of the linear baseline (0.1 in the paper).
    min_cells
        Warn about perturbations (and the control) with fewer cells than this.

    Returns
    -------
    Predictions in the format of :func:`perturbation_means`: one row per predicted
    perturbation, the genes of ``adata`` as ``var_names``; ``uns['perturbation_baseline']``
    holds the settings.

    """
    if method not in _BASELINES:
        raise ValueError(f"Unknown baseline {method!r}; choose from {list(_BASELINES)}.")
    labels = _labels(adata, perturbation_key)
    X = _expression_values(adata, layer=layer, normalize=normalize)
    stats = _group_stats(X, labels, adata.var_names)
    test, train = _resolve_split(
        stats,
        perturbation_key=perturbation_key,
        control_label=control_label,
        test_perturbations=test_perturbations,
        train_perturbations=train_perturbations,
        min_cells=min_cells,
    )
    preds = _baseline_predictions(
        stats,
        method,
        control=control_label,
        train=train,
        test=test,
        n_components=n_components,
        ridge=ridge,
    )
    skipped = [n for n in test if n not in preds]
    if skipped:
        warnings.warn(
            f"The {method!r} baseline cannot predict {_preview(skipped)} (only combinations "
            f"'A{_COMBINATION_SEP}B' whose singles are all in training); they are left out.",
            UserWarning,
            stacklevel=2,
        )
    names = [n for n in test if n in preds]
    X_pred = np.stack([preds[n] for n in names]) if names else np.zeros((0, adata.n_vars))
    out = AnnData(X=X_pred, obs=pd.DataFrame(index=pd.Index(names)), var=adata.var.copy())
    out.uns["perturbation_baseline"] = {
        "method": method,
        "perturbation_key": perturbation_key,
        "control_label": control_label,
        "train_perturbations": list(train),
        "normalize": normalize,
        "n_components": n_components,
        "ridge": ridge,
    }
    return out


def evaluate_perturbation(
    adata: AnnData,
    predicted: AnnData | pd.DataFrame | None = None,
    *,
    perturbation_key: str,
    control_label: str,
    test_perturbations: str | Sequence[str],
    train_perturbations: Sequence[str] | None = None,
    layer: str | None = None,
    normalize: bool = True,
    n_top_de: int = 20,
    baselines: Sequence[BaselineName] = ("control", "train_mean", "linear"),
    method_name: str = "model",
    min_cells: int = 10,
) -> pd.DataFrame:
    """Score predicted perturbation responses of held-out perturbations against baselines.

    The prediction (if given) and every baseline (see :func:`perturbation_baseline`, with the
    paper's ``K = 10`` and ``λ = 0.1`` for ``"linear"``) are scored by the same code. For every
    held-out perturbation ``p``, the observed change is ``δ = mean(p) - mean(control)`` and the
    predicted change is ``δ̂ = prediction(p) - mean(control)``, both with the observed means
    from ``adata`` (see :func:`perturbation_means`). The metrics are

    ``pearson_delta``
        Pearson correlation of ``δ̂`` and ``δ`` over all genes.
    ``pearson_delta_top{n}``
        The same over the top ``n`` DE genes of ``p``.
    ``mse``, ``mse_top{n}``
        Mean of ``(δ̂ - δ)²`` (equal to the squared error of the profiles) over all genes and
        over the top ``n`` DE genes.
    ``direction_accuracy_top{n}``
        Fraction of the top ``n`` DE genes where ``sign(δ̂) == sign(δ)``; a predicted change of
        exactly zero counts as wrong unless the observed change is zero too.

    The top ``n`` DE genes of ``p`` are the ``n = min(n_top_de, n_genes)`` genes with the
    largest ``|t|``, where ``t`` is Welch's t-statistic of the cells of ``p`` against the
    control cells on the per-cell values (the score of ``sc.tl.rank_genes_groups(...,
    method='t-test', reference=control_label)``; ``0/0``, from genes without variance, counts as
    0; ties keep the gene order of ``adata``). The target gene itself is included when it is
    measured and DE.

    The ``"control"`` baseline predicts ``δ̂ = 0``: its correlations are undefined (NaN), its
    ``mse`` is the mean squared observed change and its direction accuracy is 0 (unless
    ``δ`` is exactly 0).

    Parameters
    ----------
    adata
        Cells × genes with the observed responses (raw counts when ``normalize`` is true).
    predicted
        Predicted mean profiles: an AnnData with one row per perturbation (``obs_names``) and
        the genes of ``adata`` as ``var_names``, or a DataFrame indexed by perturbation with one
        column per gene (any order), on the scale of :func:`perturbation_means` with the same
        ``normalize``. It must have a row for every test perturbation; other rows are ignored.
        If `None`, only the baselines are scored.
    perturbation_key
        Column of ``adata.obs`` with the perturbation of every cell.
    control_label
        Label of the control cells.
    test_perturbations
        Held-out perturbations to score.
    train_perturbations
        Perturbations the baselines may learn from; by default every perturbation that is
        neither the control nor held out. Must not overlap ``test_perturbations``.
    layer
        Layer to read instead of ``adata.X``.
    normalize
        Compare ``log1p`` of counts per 10,000 (true) or the values as given (false).
    n_top_de
        Number of top DE genes for the ``_top{n}`` metrics.
    baselines
        Baselines to score, from ``"control"``, ``"train_mean"``, ``"linear"`` and
        ``"additive"``. ``"additive"`` scores only combinations ``"A+B"`` whose singles are all
        in training; other perturbations get no ``"additive"`` rows.
    method_name
        Name of the prediction in the ``method`` column.
    min_cells
        Warn about perturbations (and the control) with fewer cells than this.

    Returns
    -------
    Tidy table with columns ``method``, ``perturbation``, ``metric`` and ``value``, one row per
    method, held-out perturbation and metric (model first, then the baselines in the given
    order). ``attrs['top_de_genes']`` maps every held-out perturbation to its top DE genes.
    Use :func:`summarize_perturbation_metrics` for mean and sd per method.

    Examples
    --------
    >>> import cellformers as cf
    >>> adata = cf.data.papalexi_eccite_lowmoi()
    >>> df = cf.tl.evaluate_perturbation(
    ...     adata,
    ...     perturbation_key="perturbation",
    ...     control_label="non-targeting",
    ...     test_perturbations=["STAT1", "IRF1", "JAK2"],
    ... )
    >>> cf.tl.summarize_perturbation_metrics(df)

    """
    baselines = [baselines] if isinstance(baselines, str) else list(baselines)
    unknown = [b for b in baselines if b not in _BASELINES]
    if unknown:
        raise ValueError(f"Unknown baselines {unknown}; choose from {list(_BASELINES)}.")
    if predicted is not None and method_name in baselines:
        raise ValueError(
            f"`method_name={method_name!r}` is also the name of a baseline; pick another name."
        )
    if predicted is None and not baselines:
        raise ValueError("Nothing to evaluate: pass `predicted` or at least one baseline.")
    if int(n_top_de) < 1:
        raise ValueError(f"`n_top_de` must be a positive integer, not {n_top_de!r}.")

    labels = _labels(adata, perturbation_key)
    X = _expression_values(adata, layer=layer, normalize=normalize)
    stats = _group_stats(X, labels, adata.var_names)
    test, train = _resolve_split(
        stats,
        perturbation_key=perturbation_key,
        control_label=control_label,
        test_perturbations=test_perturbations,
        train_perturbations=train_perturbations,
        min_cells=min_cells,
    )
    methods: dict[str, dict[str, np.ndarray]] = {}
    if predicted is not None:
        frame = _prediction_frame(predicted, adata.var_names, test)
        methods[method_name] = {n: frame.loc[n].to_numpy() for n in test}
    for baseline in baselines:
        methods[baseline] = _baseline_predictions(
            stats, baseline, control=control_label, train=train, test=test
        )

    n_top = min(int(n_top_de), adata.n_vars)
    ctrl = stats.mean[stats.row(control_label)]
    tops = {n: _top_de(stats, n, control_label, n_top) for n in test}
    rows = []
    for method, preds in methods.items():
        for name in test:
            if name not in preds:
                continue
            obs_delta = stats.mean[stats.row(name)] - ctrl
            scores = _metrics(preds[name] - ctrl, obs_delta, tops[name])
            rows += [(method, name, metric, value) for metric, value in scores.items()]
    df = pd.DataFrame(rows, columns=["method", "perturbation", "metric", "value"])
    df.attrs["top_de_genes"] = {n: list(adata.var_names[tops[n]]) for n in test}
    return df


def summarize_perturbation_metrics(df: pd.DataFrame) -> pd.DataFrame:
    """Mean and standard deviation of every metric over perturbations, per method.

    Parameters
    ----------
    df
        Tidy output of :func:`evaluate_perturbation` (columns ``method``, ``perturbation``,
        ``metric``, ``value``).

    Returns
    -------
    Wide table indexed by method (in order of appearance) with columns ``(metric, stat)``, where
    ``stat`` is ``mean``, ``sd`` (ddof 1) or ``n`` (number of perturbations with a defined
    value; NaN values are skipped).

    """
    required = ["method", "perturbation", "metric", "value"]
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise KeyError(
            f"Columns {missing} not found (columns: {list(df.columns)}); pass the output of "
            "`evaluate_perturbation`."
        )
    methods = list(dict.fromkeys(df["method"]))
    metrics = list(dict.fromkeys(df["metric"]))
    stats = df.groupby(["method", "metric"], sort=False)["value"].agg(
        mean="mean", sd="std", n="count"
    )
    wide = stats.unstack("metric").swaplevel(axis=1)
    columns = pd.MultiIndex.from_product([metrics, ["mean", "sd", "n"]], names=["metric", "stat"])
    return wide.reindex(index=methods, columns=columns)
