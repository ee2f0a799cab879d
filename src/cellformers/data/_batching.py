"""Batching helpers: length buckets and tokenising collate functions."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import scipy.sparse as sp
import torch


def length_bucketed_batches(lengths: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Group cells of similar token length into batches.

    Cells are sorted by length (stable, so ties keep their order) and cut into batches of
    ``batch_size``; each batch is then padded only to its own longest cell.

    Parameters
    ----------
    lengths
        Token count of each cell.
    batch_size
        Cells per batch.

    Returns
    -------
    Index arrays into ``lengths``, one per batch; together they cover every cell once.

    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size}.")
    order = np.argsort(np.asarray(lengths), kind="stable")
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def to_csr(X) -> sp.csr_matrix:
    """Convert a minibatch matrix (dense, SciPy sparse or torch sparse CSR/CSC) to CSR.

    float16 values (which SciPy's sparse matrices cannot hold) become float32.
    """
    if isinstance(X, torch.Tensor):
        if X.layout == torch.sparse_csr:
            X = sp.csr_matrix(
                (X.values().numpy(), X.col_indices().numpy(), X.crow_indices().numpy()),
                shape=tuple(X.shape),
            )
        elif X.layout == torch.sparse_csc:
            X = sp.csc_matrix(
                (X.values().numpy(), X.row_indices().numpy(), X.ccol_indices().numpy()),
                shape=tuple(X.shape),
            )
        else:
            X = X.numpy()
    if not sp.issparse(X):
        X = np.asarray(X)
        if X.dtype == np.float16:
            X = X.astype(np.float32)
    return sp.csr_matrix(X)


class TokenizingCollator:
    """Collate function that turns an scvi-tools minibatch into token tensors.

    ``AnnDataLoader`` hands one dict per minibatch (``{"X": ..., "batch": ..., ...}``); the
    expression matrix under ``x_key`` is replaced by the arrays that ``tokenize`` returns
    (e.g. ``genes`` and ``values``), the other entries become tensors. Entries named in
    ``tokenize.registry_keys`` (if it has that attribute) are passed to it as keyword arguments
    (e.g. per-cell total counts). Keep ``tokenize``
    picklable (a module-level function or :func:`functools.partial` of one) so the collator
    works in DataLoader worker processes.

    Parameters
    ----------
    tokenize
        Maps a CSR matrix of cells × genes to a dict of arrays with one row per cell.
    x_key
        Registry key of the expression matrix.

    """

    def __init__(
        self, tokenize: Callable[[sp.csr_matrix], Mapping[str, np.ndarray]], x_key: str = "X"
    ) -> None:
        self.tokenize = tokenize
        self.x_key = x_key

    def __call__(self, batch: Mapping[str, object]) -> dict[str, torch.Tensor]:
        out = {k: torch.as_tensor(np.asarray(v)) for k, v in batch.items() if k != self.x_key}
        extra = {
            k: np.asarray(batch[k]).reshape(-1) for k in getattr(self.tokenize, "registry_keys", ())
        }
        for key, value in self.tokenize(to_csr(batch[self.x_key]), **extra).items():
            out[key] = torch.as_tensor(value)
        return out
