"""Heatmap of integration scores from :func:`cellformers.tl.evaluate_integration`."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from matplotlib.axes import Axes

__all__ = ["integration_scores"]

_ORDER = ["bio_conservation", "batch_correction", "aggregate"]
_TITLES = {
    "bio_conservation": "bio conservation",
    "batch_correction": "batch correction",
    "aggregate": "aggregate",
}
_COLUMNS = ["embedding", "metric", "category", "value"]


def integration_scores(
    results: pd.DataFrame,
    *,
    ax: Axes | None = None,
    show: bool | None = None,
    save: bool | str | None = None,
) -> Axes | None:
    """Heatmap of integration scores: embeddings × metrics, grouped by category.

    Each cell shows the score (written in it) of one embedding on one metric; columns are
    grouped into bio conservation, batch correction and the aggregate scores, separated by
    white lines. Colours run from 0 to 1 (higher is better).

    Parameters
    ----------
    results
        The table returned by :func:`cellformers.tl.evaluate_integration` (columns
        ``embedding``, ``metric``, ``category``, ``value``).
    ax
        Axes to draw into; a new figure is made if `None`.
    show
        Show the plot, do not return the axes.
    save
        If `True` or a `str`, save the figure. A string is appended to the default filename.
        Infer the filetype if ending on {`'.pdf'`, `'.png'`, `'.svg'`}.

    Returns
    -------
    The axes if ``show`` is false, otherwise `None`.

    Examples
    --------
    >>> df = cf.tl.evaluate_integration(adata, ["X_pca", "X_scgpt"], batch_key="batch",
    ...                                 label_key="cell_type")
    >>> cf.pl.integration_scores(df)

    """
    import matplotlib.pyplot as plt
    from scanpy import settings
    from scanpy.pl._utils import savefig_or_show

    if not isinstance(results, pd.DataFrame):
        raise TypeError(f"Expected a DataFrame, got {type(results).__name__}.")
    missing = [c for c in _COLUMNS if c not in results.columns]
    if missing:
        raise ValueError(
            f"results lacks the columns {missing}; pass the DataFrame returned by "
            "cellformers.tl.evaluate_integration."
        )
    if results.empty:
        raise ValueError("results is empty: nothing to plot.")
    unknown = sorted(set(results["category"].astype(str)) - set(_ORDER))
    if unknown:
        raise ValueError(f"Unknown categories {unknown}; expected some of {_ORDER}.")
    if results.duplicated(["embedding", "category", "metric"]).any():
        raise ValueError("results has several values for the same embedding, category and metric.")

    data = results.assign(category=results["category"].astype(str))
    embeddings = list(pd.unique(data["embedding"]))
    columns = [
        (category, metric)
        for category in _ORDER
        for metric in pd.unique(data.loc[data["category"] == category, "metric"])
    ]
    table = data.pivot(index="embedding", columns=["category", "metric"], values="value")
    values = table.reindex(index=embeddings, columns=pd.MultiIndex.from_tuples(columns))
    values = values.to_numpy(dtype=float)

    if ax is None:
        width = max(4.0, 0.75 * len(columns) + 1.5 + 0.08 * max(len(str(e)) for e in embeddings))
        _, ax = plt.subplots(figsize=(width, 0.45 * len(embeddings) + 2.2))
    cmap = plt.get_cmap("viridis")
    image = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto")
    for i in range(values.shape[0]):
        for j in range(values.shape[1]):
            value = values[i, j]
            if np.isnan(value):
                continue
            r, g, b, _ = cmap(float(np.clip(value, 0.0, 1.0)))
            dark = 0.299 * r + 0.587 * g + 0.114 * b < 0.5
            ax.text(
                j, i, f"{value:.2f}", ha="center", va="center", fontsize=8,
                color="white" if dark else "black",
            )  # fmt: skip

    ax.set_xticks(np.arange(len(columns)))
    ax.set_xticklabels([metric for _, metric in columns], rotation=45, ha="right")
    ax.set_yticks(np.arange(len(embeddings)))
    ax.set_yticklabels([str(e) for e in embeddings])
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    ax.grid(False)
    categories = [category for category, _ in columns]
    start = 0
    for category in _ORDER:
        n = categories.count(category)
        if n == 0:
            continue
        if start > 0:
            ax.axvline(start - 0.5, color="white", linewidth=3)
        ax.text(
            start + (n - 1) / 2, -0.7, _TITLES[category], ha="center", va="bottom",
            fontsize=9, fontweight="bold",
        )  # fmt: skip
        start += n
    ax.set_ylim(len(embeddings) - 0.5, -0.5)
    ax.figure.colorbar(image, ax=ax, fraction=0.04, pad=0.02, label="score")

    show = settings.autoshow if show is None else show
    if save and hasattr(ax.figure, "number"):
        plt.figure(ax.figure.number)  # savefig_or_show saves the current figure
    savefig_or_show("integration_scores", show=show, save=save)
    if show:
        return None
    return ax
