"""Cell embeddings of a model, written where scanpy and muon look for them."""

from __future__ import annotations

from anndata import AnnData
from mudata import MuData


def embed(
    adata: AnnData | MuData,
    model,
    *,
    key_added: str | None = None,
    batch_size: int | None = None,
    copy: bool = False,
    **kwargs,
) -> AnnData | MuData | None:
    """Embed cells with a cellformers model and store the embedding in ``obsm``.

    Runs ``model.get_latent_representation`` on ``adata``, an AnnData or a MuData (the model
    reads its RNA modality), and writes the result into the object's own ``obsm``, so that
    ``sc.pp.neighbors(adata, use_rep=key_added)`` and ``muon``'s tools find it. ``adata`` may
    hold any genes; it is set up with the model's setup arguments if it was not set up
    already (a MuData with :meth:`setup_mudata`, an AnnData with :meth:`setup_anndata`).

    Parameters
    ----------
    adata
        Cells to embed.
    model
        A cellformers model (e.g. :class:`~cellformers.model.SCGPT`).
    key_added
        Key of the embedding in ``obsm`` and of its settings in ``uns``; by default
        ``"X_<model>"`` with the lower-case class name (``"X_scgpt"``, ``"X_geneformer"`` …).
    batch_size
        Cells per forward pass (the embedding does not depend on it).
    copy
        Return an embedded copy instead of writing into ``adata``.
    **kwargs
        Other options of the model's ``get_latent_representation`` (e.g. ``pooling="mean"``).

    Returns
    -------
    With ``copy=True`` an embedded copy, else `None`. Sets

    ``adata.obsm[key_added]``
        The cell embeddings, one row per cell.
    ``adata.uns[key_added]``
        The settings: ``model`` (class name), ``n_dims`` and the ``get_latent_representation``
        options.

    Examples
    --------
    >>> cf.tl.embed(mdata, model)  # mdata.obsm["X_scgpt"]
    >>> sc.pp.neighbors(mdata, use_rep="X_scgpt")

    """
    if not isinstance(adata, AnnData | MuData):
        raise TypeError(f"Expected an AnnData or MuData object, got {type(adata).__name__}.")
    if not hasattr(model, "get_latent_representation"):
        raise TypeError(
            f"{type(model).__name__} has no get_latent_representation; pass a cellformers model."
        )
    name = type(model).__name__
    key_added = f"X_{name.lower()}" if key_added is None else key_added
    if not isinstance(key_added, str) or not key_added:
        raise ValueError(f"key_added must be a non-empty string, got {key_added!r}.")
    adata = adata.copy() if copy else adata
    X = model.get_latent_representation(adata, batch_size=batch_size, **kwargs)
    adata.obsm[key_added] = X
    adata.uns[key_added] = {"model": name, "n_dims": int(X.shape[1]), **kwargs}
    return adata if copy else None
