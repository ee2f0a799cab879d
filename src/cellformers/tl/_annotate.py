"""Cell-type annotation with a fine-tuned model, written into AnnData."""

from __future__ import annotations

import pandas as pd
from anndata import AnnData
from mudata import MuData


def annotate(
    adata: AnnData | MuData,
    model,
    *,
    key_added: str = "cf_celltype",
    unknown_threshold: float | None = None,
    store_probabilities: bool = False,
    batch_size: int | None = None,
    copy: bool = False,
) -> AnnData | MuData | None:
    """Annotate cells with a fine-tuned cellformers model.

    Runs ``model.predict_celltype`` (soft, then the most likely label per cell) and writes
    the labels and their probabilities into ``adata``. ``adata`` may hold any genes; it is
    set up with the model's setup arguments if it was not set up already.

    Parameters
    ----------
    adata
        Cells to annotate (an AnnData, or a MuData whose RNA modality the model reads; the
        results go into the MuData's own ``obs`` and ``obsm``).
    model
        A cellformers model with a fine-tuned classification head (``train(mode="finetune")``).
    key_added
        Name of the ``obs`` column for the labels.
    unknown_threshold
        Cells whose highest class probability is below this value are labelled ``"unknown"``
        (scBERT: ``"Unassigned"``).
    store_probabilities
        Also store all class probabilities in ``obsm[f"{key_added}_probabilities"]`` (a
        DataFrame with one column per label).
    batch_size
        Cells per forward pass (predictions do not depend on it).
    copy
        Return an annotated copy instead of writing into ``adata``.

    Returns
    -------
    With ``copy=True`` an annotated copy, else `None`. Sets

    ``adata.obs[key_added]``
        Predicted labels (categorical, in the model's label order).
    ``adata.obs[f"{key_added}_probability"]``
        Probability of the predicted label.
    ``adata.obsm[f"{key_added}_probabilities"]``
        All class probabilities (with ``store_probabilities=True``).

    """
    if not isinstance(adata, AnnData | MuData):
        raise TypeError(f"Expected an AnnData or MuData object, got {type(adata).__name__}.")
    if not hasattr(model, "predict_celltype"):
        raise TypeError(
            f"{type(model).__name__} has no predict_celltype; pass a cellformers model."
        )
    if unknown_threshold is not None and not 0.0 <= float(unknown_threshold) <= 1.0:
        raise ValueError(
            f"unknown_threshold must be a probability in [0, 1], got {unknown_threshold}."
        )
    adata = adata.copy() if copy else adata
    probabilities = model.predict_celltype(adata, batch_size=batch_size, soft=True)
    labels = probabilities.idxmax(axis=1)
    best = probabilities.max(axis=1).to_numpy()
    categories = list(probabilities.columns)
    if unknown_threshold is not None:
        unknown = getattr(model, "_unknown_label", "unknown")
        labels = labels.where(best >= float(unknown_threshold), unknown)
        categories = [*categories, unknown] if unknown not in categories else categories
    adata.obs[key_added] = pd.Categorical(labels.to_numpy(), categories=categories)
    adata.obs[f"{key_added}_probability"] = best.astype("float32")
    if store_probabilities:
        adata.obsm[f"{key_added}_probabilities"] = probabilities.set_axis(adata.obs_names)
    return adata if copy else None
