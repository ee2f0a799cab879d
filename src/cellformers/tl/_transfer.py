"""Zero-shot reference mapping: transfer labels by nearest neighbours in an embedding."""

from __future__ import annotations

import logging
from typing import Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData
from mudata import MuData

logger = logging.getLogger(__name__)

_CHUNK = 65536  # query cells voted on at once (bounds the vote table's memory)


def _check_embedding(X, *, name: str, n_obs: int) -> np.ndarray:
    """Return ``X`` as a finite 2-D float array with ``n_obs`` rows, else raise a ValueError."""
    if isinstance(X, pd.DataFrame):
        X = X.to_numpy()
    elif sp.issparse(X):
        X = X.toarray()
    X = np.asarray(X)
    if X.ndim != 2 or X.shape[0] != n_obs:
        raise ValueError(
            f"{name} must be a 2-D array with one row per cell ({n_obs}), got shape {X.shape}."
        )
    if not np.issubdtype(X.dtype, np.number) or np.issubdtype(X.dtype, np.complexfloating):
        raise ValueError(f"{name} must hold real numbers, got dtype {X.dtype}.")
    X = X.astype(np.float64 if X.dtype == np.float64 else np.float32, copy=False)
    bad = ~np.isfinite(X)
    if bad.any():
        n_cells = int(bad.any(axis=1).sum())
        raise ValueError(
            f"{name} contains non-finite values (NaN or inf) in {n_cells} cells. "
            "Recompute the embedding or drop those cells."
        )
    return X


def _embedding(adata: AnnData, use_rep: str, model, *, which: str) -> np.ndarray:
    """``adata.obsm[use_rep]``, computed with ``model`` (and stored there) if missing."""
    if use_rep in adata.obsm:
        return _check_embedding(
            adata.obsm[use_rep], name=f"{which}.obsm[{use_rep!r}]", n_obs=adata.n_obs
        )
    if model is None:
        raise KeyError(
            f"{use_rep!r} not found in {which}.obsm (available: {list(adata.obsm)}). Compute "
            f"the embedding first, e.g. `{which}.obsm[{use_rep!r}] = "
            f"model.get_latent_representation({which})`, or pass `model=`."
        )
    logger.info("Computing %s.obsm[%r] with %s.", which, use_rep, type(model).__name__)
    X = _check_embedding(
        model.get_latent_representation(adata),
        name=f"The embedding of {which} from {type(model).__name__}",
        n_obs=adata.n_obs,
    )
    adata.obsm[use_rep] = X
    return X


def transfer_labels(
    query: AnnData,
    reference: AnnData,
    *,
    label_key: str,
    use_rep: str,
    model=None,
    k: int = 15,
    metric: Literal["euclidean", "cosine"] = "euclidean",
    weighting: Literal["distance", "uniform"] = "distance",
    unknown_threshold: float | None = None,
    unknown_label: str = "unknown",
    key_added: str = "transferred_label",
    copy: bool = False,
) -> AnnData | None:
    """Transfer labels from a reference to query cells by nearest neighbours in an embedding.

    Zero-shot reference mapping: every query cell gets the label that wins a (weighted) vote
    among its ``k`` nearest labelled reference cells in a shared embedding space, such as a
    foundation model's cell embeddings. Each query cell is mapped on its own, so the result
    does not depend on which other cells are in the query or on their order.

    Parameters
    ----------
    query
        Cells to label.
    reference
        Labelled cells. Cells without a label (missing value in ``obs[label_key]``) are left
        out, with a warning.
    label_key
        Column of ``reference.obs`` with the labels to transfer.
    use_rep
        Key of the embedding in ``obsm`` of both AnnData objects (e.g. ``"X_scgpt"``).
    model
        A cellformers model (anything with ``get_latent_representation(adata)``). If given,
        the embedding of an AnnData that has no ``obsm[use_rep]`` is computed with it and
        stored there. Both embeddings must come from the same model.
    k
        Number of reference neighbours that vote.
    metric
        Distance in the embedding space: ``"euclidean"`` or ``"cosine"``.
    weighting
        ``"distance"``: each neighbour votes with weight 1 / distance (neighbours at distance
        0 share the whole vote); ``"uniform"``: every neighbour votes with weight 1.
    unknown_threshold
        Query cells whose confidence (see below) is below this value get ``unknown_label``.
        `None` keeps every winning label.
    unknown_label
        Label of cells below ``unknown_threshold``; it must not be a reference label.
    key_added
        Name of the ``query.obs`` column for the labels.
    copy
        Return a labelled copy of ``query`` instead of writing into it.

    Returns
    -------
    With ``copy=True`` a labelled copy of ``query``, else `None`. Sets

    ``query.obs[key_added]``
        Transferred labels: categorical with the reference's categories (plus
        ``unknown_label`` when ``unknown_threshold`` is given). Ties between labels go to the
        first in category order.
    ``query.obs[f"{key_added}_confidence"]``
        Share of the (weighted) vote that the winning label got, in [0, 1].
    ``query.obsm[use_rep]``, ``reference.obsm[use_rep]``
        The embeddings computed with ``model``, where they were missing (the query's in the
        returned copy when ``copy=True``).

    Examples
    --------
    >>> import cellformers as cf
    >>> cf.tl.transfer_labels(query, reference, label_key="cell_type", use_rep="X_scgpt")
    >>> query.obs[["transferred_label", "transferred_label_confidence"]]

    """
    from sklearn.neighbors import NearestNeighbors

    for name, obj in (("query", query), ("reference", reference)):
        if not isinstance(obj, AnnData | MuData):
            raise TypeError(
                f"`{name}` must be an AnnData or MuData object, got {type(obj).__name__}."
            )
    if metric not in ("euclidean", "cosine"):
        raise ValueError(f"metric must be 'euclidean' or 'cosine', got {metric!r}.")
    if weighting not in ("distance", "uniform"):
        raise ValueError(f"weighting must be 'distance' or 'uniform', got {weighting!r}.")
    if unknown_threshold is not None and not 0.0 <= float(unknown_threshold) <= 1.0:
        raise ValueError(f"unknown_threshold must be in [0, 1], got {unknown_threshold}.")
    if model is not None and not callable(getattr(model, "get_latent_representation", None)):
        raise TypeError(
            f"`model` ({type(model).__name__}) has no get_latent_representation method; pass a "
            "cellformers model or compute the embeddings yourself."
        )
    if label_key not in reference.obs:
        raise KeyError(
            f"Column {label_key!r} not found in reference.obs (available: {list(reference.obs)})."
        )

    labels = reference.obs[label_key]
    if isinstance(labels.dtype, pd.CategoricalDtype):
        categories = list(labels.cat.categories)
    else:
        categories = sorted(labels.dropna().unique().tolist(), key=str)
    labelled = labels.notna().to_numpy()
    n_labelled = int(labelled.sum())
    if n_labelled == 0:
        raise ValueError(f"reference.obs[{label_key!r}] has no labels (all values are missing).")
    if not isinstance(k, int | np.integer) or isinstance(k, bool) or not 1 <= k <= n_labelled:
        raise ValueError(
            f"k must be an integer between 1 and the number of labelled reference cells "
            f"({n_labelled}), got {k!r}."
        )
    if unknown_threshold is not None and unknown_label in categories:
        raise ValueError(
            f"unknown_label {unknown_label!r} is also a reference label in "
            f"reference.obs[{label_key!r}]; pass another `unknown_label`."
        )
    if n_labelled < reference.n_obs:
        logger.warning(
            "%d of %d reference cells have no label in reference.obs[%r] and are left out.",
            reference.n_obs - n_labelled,
            reference.n_obs,
            label_key,
        )

    query = query.copy() if copy else query
    ref_emb = _embedding(reference, use_rep, model, which="reference")
    query_emb = _embedding(query, use_rep, model, which="query")
    if ref_emb.shape[1] != query_emb.shape[1]:
        raise ValueError(
            f"The embeddings differ in dimension: query.obsm[{use_rep!r}] has "
            f"{query_emb.shape[1]} columns, reference.obsm[{use_rep!r}] has {ref_emb.shape[1]}. "
            "Embed both with the same model."
        )

    codes = pd.Categorical(labels[labelled], categories=categories).codes.astype(np.intp)
    nn = NearestNeighbors(n_neighbors=k, metric=metric).fit(ref_emb[labelled])
    best = np.empty(query.n_obs, dtype=np.intp)
    confidence = np.empty(query.n_obs, dtype=np.float64)
    for start in range(0, query.n_obs, _CHUNK):
        dist, idx = nn.kneighbors(query_emb[start : start + _CHUNK])
        if weighting == "uniform":
            weights = np.ones_like(dist)
        else:
            with np.errstate(divide="ignore"):
                weights = 1.0 / dist
            exact = np.isinf(weights).any(axis=1)
            weights[exact] = np.isinf(weights[exact]).astype(np.float64)
        votes = np.zeros((dist.shape[0], len(categories)))
        rows = np.arange(dist.shape[0])
        for j in range(k):  # one neighbour per row and step: no repeated (row, label) pairs
            votes[rows, codes[idx[:, j]]] += weights[:, j]
        winner = votes.argmax(axis=1)
        best[start : start + dist.shape[0]] = winner
        confidence[start : start + dist.shape[0]] = votes[rows, winner] / votes.sum(axis=1)

    predicted = np.asarray(categories, dtype=object)[best]
    if unknown_threshold is not None:
        predicted[confidence < float(unknown_threshold)] = unknown_label
        categories = [*categories, unknown_label]
    query.obs[key_added] = pd.Categorical(predicted, categories=categories)
    query.obs[f"{key_added}_confidence"] = np.clip(confidence, 0.0, 1.0)
    return query if copy else None
