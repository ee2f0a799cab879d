"""Plots of perturbation responses: observed vs predicted change from control."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from anndata import AnnData

from ..tl._perturbation import (
    _check_control,
    _check_known,
    _expression_values,
    _group_stats,
    _labels,
    _prediction_frame,
    _top_de,
)

if TYPE_CHECKING:
    from matplotlib.axes import Axes

__all__ = ["perturbation_effect"]


def perturbation_effect(
    adata: AnnData,
    predicted: AnnData | pd.DataFrame | None,
    perturbation: str,
    *,
    perturbation_key: str,
    control_label: str,
    layer: str | None = None,
    normalize: bool = True,
    n_genes: int = 20,
    ax: Axes | None = None,
    show: bool | None = None,
    save: bool | str | None = None,
) -> Axes | None:
    """Observed and predicted change from control of the top DE genes of one perturbation.

    Paired bars per gene: the observed change ``mean(perturbation) - mean(control)`` and the
    predicted change ``prediction(perturbation) - mean(control)``, for the ``n_genes`` genes with
    the largest Welch ``|t|`` against the control cells (the genes and changes used by
    :func:`cellformers.tl.evaluate_perturbation`), in that order.

    Parameters
    ----------
    adata
        Cells × genes with the observed responses (raw counts when ``normalize`` is true).
    predicted
        Predicted mean profiles in the format of :func:`cellformers.tl.perturbation_means`
        (AnnData with one row per perturbation, or a DataFrame indexed by perturbation with one
        column per gene). If `None`, only the observed change is drawn.
    perturbation
        The perturbation to show.
    perturbation_key
        Column of ``adata.obs`` with the perturbation of every cell.
    control_label
        Label of the control cells.
    layer
        Layer to read instead of ``adata.X``.
    normalize
        Compare ``log1p`` of counts per 10,000 (true) or the values as given (false).
    n_genes
        Number of top DE genes to show.
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
    >>> import cellformers as cf
    >>> adata = cf.data.papalexi_eccite_lowmoi()
    >>> pred = cf.tl.perturbation_baseline(
    ...     adata,
    ...     perturbation_key="perturbation",
    ...     control_label="non-targeting",
    ...     test_perturbations=["STAT1"],
    ... )
    >>> cf.pl.perturbation_effect(
    ...     adata, pred, "STAT1", perturbation_key="perturbation", control_label="non-targeting"
    ... )

    """
    import matplotlib.pyplot as plt
    from scanpy import settings
    from scanpy.pl._utils import savefig_or_show

    if int(n_genes) < 1:
        raise ValueError(f"`n_genes` must be a positive integer, not {n_genes!r}.")
    labels = _labels(adata, perturbation_key)
    X = _expression_values(adata, layer=layer, normalize=normalize)
    stats = _group_stats(X, labels, adata.var_names)
    _check_control(stats, control_label, perturbation_key)
    _check_known([perturbation], stats, "perturbation", perturbation_key)
    if perturbation == control_label:
        raise ValueError(f"{perturbation!r} is the control; pick a perturbation to show.")

    ctrl = stats.mean[stats.row(control_label)]
    top = _top_de(stats, perturbation, control_label, min(int(n_genes), adata.n_vars))
    genes = adata.var_names[top]
    observed = (stats.mean[stats.row(perturbation)] - ctrl)[top]
    series = {"observed": observed}
    if predicted is not None:
        frame = _prediction_frame(predicted, adata.var_names, [perturbation])
        series["predicted"] = (frame.loc[perturbation].to_numpy() - ctrl)[top]

    if ax is None:
        _, ax = plt.subplots(figsize=(max(4.0, 0.35 * len(genes) + 1.5), 3.5))
    x = np.arange(len(genes))
    width = 0.8 / len(series)
    colors = {"observed": "0.35", "predicted": "tab:red"}
    for i, (name, values) in enumerate(series.items()):
        offset = (i - (len(series) - 1) / 2) * width
        ax.bar(x + offset, values, width=width, color=colors[name], label=name)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(x)
    ax.set_xticklabels(genes, rotation=90)
    ax.set_xlim(-0.6, len(genes) - 0.4)
    scale = "mean log1p(counts per 10k)" if normalize else "mean expression"
    ax.set_ylabel(f"change in {scale}")
    ax.set_title(f"{perturbation} vs {control_label}: top {len(genes)} DE genes")
    ax.legend(frameon=False)
    ax.grid(False)

    show = settings.autoshow if show is None else show
    savefig_or_show("perturbation_effect", show=show, save=save)
    if show:
        return None
    return ax
