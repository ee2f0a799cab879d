"""Checks shared by every entry point that reads expression data."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

_CHUNK = 8192


def _value_chunks(X):
    """Yield the stored values of ``X`` chunk by chunk (dense, sparse or backed)."""
    if sp.issparse(X):
        data = X.data
        for start in range(0, data.shape[0], _CHUNK * 512):
            yield np.asarray(data[start : start + _CHUNK * 512])
    elif isinstance(X, np.ndarray):
        flat = X.reshape(-1)
        for start in range(0, flat.shape[0], _CHUNK * 512):
            yield flat[start : start + _CHUNK * 512]
    else:  # backed datasets and other array-likes: read rows in chunks
        for start in range(0, X.shape[0], _CHUNK):
            block = X[start : start + _CHUNK]
            block = block.data if sp.issparse(block) else np.asarray(block).reshape(-1)
            yield np.asarray(block)


def check_expression(X, *, name: str = "adata.X", require_integer: bool = True) -> None:
    """Raise a :class:`ValueError` if ``X`` is not a valid expression matrix.

    Parameters
    ----------
    X
        Dense, sparse or backed matrix of cells × genes.
    name
        How the matrix is named in error messages (e.g. ``"adata.layers['counts']"``).
    require_integer
        Also require integer values (raw counts).

    """
    for values in _value_chunks(X):
        if values.size == 0:
            continue
        if not np.all(np.isfinite(values)):
            n_nan = int(np.isnan(values).sum())
            raise ValueError(
                f"{name} contains non-finite values ({n_nan} NaN, "
                f"{int(np.isinf(values).sum())} inf). Expression input must be finite counts."
            )
        if values.min() < 0:
            raise ValueError(
                f"{name} contains negative values (min {values.min():g}); it looks scaled or "
                "centred. Pass raw counts, e.g. `layer='counts'`."
            )
        if require_integer and not np.all(values == np.round(values)):
            bad = values[values != np.round(values)][:3]
            raise ValueError(
                f"{name} contains non-integer values (e.g. {', '.join(f'{v:g}' for v in bad)}), "
                "but raw counts are required. Pass the counts layer, e.g. `layer='counts'`, or "
                "set `is_count_data=False` if you really mean to use normalised values."
            )


def check_shape(adata: AnnData) -> None:
    """Raise a :class:`ValueError` if ``adata`` has no cells or no genes."""
    if adata.n_obs == 0 or adata.n_vars == 0:
        raise ValueError(
            f"The AnnData has {adata.n_obs} cells and {adata.n_vars} genes; it needs at least "
            "one of each. Check the subsetting that produced it."
        )


def check_obs_labels(adata: AnnData, key: str | None, *, role: str) -> None:
    """Raise a :class:`ValueError` if the categorical ``adata.obs[key]`` has missing values.

    Parameters
    ----------
    adata
        The AnnData.
    key
        Column of ``adata.obs`` (``None`` checks nothing).
    role
        The argument that named the column, for the message (e.g. ``"labels_key"``).

    """
    if key is None:
        return
    missing = adata.obs[key].isna()
    if missing.any():
        names = ", ".join(map(str, adata.obs_names[missing.to_numpy()][:3]))
        raise ValueError(
            f"adata.obs[{key!r}] ({role}) has {int(missing.sum())} missing values (e.g. cells "
            f"{names}). Give those cells a label of their own (e.g. 'unknown') or drop them."
        )


def check_unique(names: Sequence[str] | pd.Index, *, what: str = "adata.var_names") -> None:
    """Raise a :class:`ValueError` naming the duplicates if ``names`` are not unique."""
    index = pd.Index(names)
    if index.is_unique:
        return
    dups = index[index.duplicated()].unique()
    raise ValueError(
        f"{what} are not unique ({len(dups)} duplicated, e.g. {list(dups[:5])}). "
        "Call `adata.var_names_make_unique()` or pass a unique gene column."
    )


def check_setup_keys(
    adata: AnnData,
    *,
    layer: str | None = None,
    obs_keys: Sequence[str | None] = (),
    var_keys: Sequence[str | None] = (),
) -> None:
    """Raise a :class:`KeyError` if a layer, ``obs`` or ``var`` column is missing."""
    if layer is not None and layer not in adata.layers:
        raise KeyError(
            f"Layer {layer!r} not found in adata.layers (available: {list(adata.layers)}). "
            "Pass `layer=None` to use adata.X."
        )
    for key in obs_keys:
        if key is not None and key not in adata.obs:
            raise KeyError(f"Column {key!r} not found in adata.obs (available: {list(adata.obs)}).")
    for key in var_keys:
        if key is not None and key not in adata.var:
            raise KeyError(f"Column {key!r} not found in adata.var (available: {list(adata.var)}).")
