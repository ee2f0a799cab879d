"""Shared scvi-tools model base class for transformer foundation models."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from uuid import uuid4

import numpy as np
import pandas as pd
import torch
from anndata import AnnData
from scvi import REGISTRY_KEYS
from scvi.data import AnnDataManager
from scvi.data.fields import CategoricalObsField, LayerField
from scvi.model.base import BaseModelClass, UnsupervisedTrainingMixin

from ..data import (
    TokenizingCollator,
    check_expression,
    check_setup_keys,
    check_unique,
    length_bucketed_batches,
    to_csr,
)
from ..train import PretrainingPlan

logger = logging.getLogger(__name__)

_CHUNK_CELLS = 8192
_SCVI_UUID_KEY = "_scvi_uuid"  # where scvi-tools keeps an AnnData's registration id (adata.uns)


def _resolve_indices(indices: Sequence[int] | np.ndarray | None, n_obs: int) -> np.ndarray:
    """Turn ``None``, integer positions or a boolean mask into non-negative positions."""
    if indices is None:
        return np.arange(n_obs)
    indices = np.asarray(indices)
    if indices.dtype == bool:
        if indices.shape != (n_obs,):
            raise ValueError("A boolean `indices` mask must have one entry per cell.")
        return np.flatnonzero(indices)
    if indices.size == 0:
        raise ValueError("`indices` selects no cells.")
    if not np.issubdtype(indices.dtype, np.integer) or indices.ndim != 1:
        raise TypeError("`indices` must be a 1-d array of integer positions or a boolean mask.")
    if indices.min() < -n_obs or indices.max() >= n_obs:
        raise IndexError(f"`indices` out of range for {n_obs} cells.")
    return indices % n_obs


class FoundationModelBase(UnsupervisedTrainingMixin, BaseModelClass):
    """Behaviour shared by every cellformers model class.

    Subclasses provide the tokenizer (``_tokenizer``) and pass the per-batch forward pass to
    ``_map_cells``; this class holds AnnData registration with input
    validation, the handling of query data whose genes differ from the registered ones, and the
    length-bucketed, batch-size-invariant inference loop.
    """

    _training_plan_cls = PretrainingPlan

    # ------------------------------------------------------------------ registration
    @classmethod
    def _register_anndata(
        cls,
        adata: AnnData,
        *,
        setup_method_args: dict,
        layer: str | None,
        batch_key: str | None,
        labels_key: str | None,
        gene_key: str | None,
        is_count_data: bool,
        extra_fields: Sequence = (),
        **kwargs,
    ) -> None:
        """Validate ``adata`` and register the fields every model reads (plus ``extra_fields``)."""
        if not isinstance(adata, AnnData):
            raise TypeError(f"Expected an AnnData object, got {type(adata).__name__}.")
        check_setup_keys(adata, layer=layer, obs_keys=[batch_key, labels_key], var_keys=[gene_key])
        check_unique(adata.var_names)
        if gene_key is not None and adata.var[gene_key].isna().all():
            raise ValueError(f"adata.var[{gene_key!r}] holds no gene names.")
        X = adata.X if layer is None else adata.layers[layer]
        if X is None:
            raise ValueError("adata.X is empty; pass `layer=` naming the counts layer.")
        where = "adata.X" if layer is None else f"adata.layers[{layer!r}]"
        check_expression(X, name=where, require_integer=is_count_data)
        fields = [
            LayerField(REGISTRY_KEYS.X_KEY, layer, is_count_data=is_count_data),
            CategoricalObsField(REGISTRY_KEYS.BATCH_KEY, batch_key),
            CategoricalObsField(REGISTRY_KEYS.LABELS_KEY, labels_key),
            *extra_fields,
        ]
        uuid = adata.uns.get(_SCVI_UUID_KEY)
        registered = cls._setup_adata_manager_store.get(uuid) if uuid is not None else None
        if registered is not None and registered.adata is not adata:
            # a copy of a registered AnnData: give it its own id so the original stays set up
            adata.uns[_SCVI_UUID_KEY] = str(uuid4())
        manager = AnnDataManager(fields=fields, setup_method_args=setup_method_args)
        manager.register_fields(adata, **kwargs)
        cls.register_manager(manager)

    # ------------------------------------------------------------------ genes
    def _gene_names(self, adata: AnnData) -> pd.Index:
        """Gene names of ``adata`` as registered (``var[gene_key]`` or ``var_names``)."""
        manager = self.get_anndata_manager(adata, required=True)
        gene_key = manager.registry["setup_args"].get("gene_key")
        if gene_key is None:
            return pd.Index(adata.var_names.astype(str))
        return pd.Index(adata.var[gene_key].astype(str))

    def _validate_anndata(self, adata: AnnData | None = None, copy_if_view: bool = True) -> AnnData:
        """Validate ``adata``; query data may carry any genes.

        A foundation model reads genes through its vocabulary, so a query AnnData whose genes
        differ from the registered ones is set up afresh (with its own setup if the user ran
        :meth:`setup_anndata` on it, else with the model's setup arguments) instead of being
        rejected by scvi-tools' field transfer, which requires the registered genes.
        """
        if adata is None or self._has_registered_genes(adata):
            return super()._validate_anndata(adata, copy_if_view)
        if adata.is_view:
            raise ValueError("Received a view of an AnnData; pass `adata.copy()` instead.")
        uuid = adata.uns.get(_SCVI_UUID_KEY)
        # look the stores up directly: scvi-tools' getters try a field transfer on copies
        manager = type(self)._per_instance_manager_store.get(self.id, {}).get(uuid)
        if manager is not None and manager.adata is adata:
            manager.validate()
            return adata
        manager = type(self)._setup_adata_manager_store.get(uuid)
        if manager is None or manager.adata is not adata:
            # Not set up, or the registration was copied from another AnnData with the data.
            adata.uns[_SCVI_UUID_KEY] = str(uuid4())
            logger.info("Setting up query AnnData with the model's setup arguments.")
            getattr(type(self), self.registry_["setup_method_name"])(
                adata, **self.registry_["setup_args"]
            )
            manager = self._get_most_recent_anndata_manager(adata, required=True)
        self._register_manager_for_instance(manager)
        return adata

    def _has_registered_genes(self, adata: AnnData) -> bool:
        """Whether ``adata`` has exactly the genes (and order) the model was registered with."""
        registered = self.get_state_registry(REGISTRY_KEYS.X_KEY).column_names
        return adata.n_vars == len(registered) and np.array_equal(
            np.asarray(adata.var_names), np.asarray(registered)
        )

    # ------------------------------------------------------------------ inference loop
    def _tokenizer(self, adata: AnnData):  # pragma: no cover - abstract
        """Return a tokenizer for ``adata``'s columns.

        It has ``lengths(X) -> np.ndarray`` (tokens per cell) and is callable on a CSR batch,
        returning a dict of arrays with one row per cell. A tokenizer that also needs per-cell
        registry fields (e.g. total counts) names them in ``registry_keys``; they are passed as
        keyword arguments of the same names.
        """
        raise NotImplementedError

    def _train_on_tokens(
        self,
        tokenize,
        *,
        max_epochs: int | None,
        batch_size: int,
        plan_kwargs: dict,
        datasplitter_kwargs: dict | None,
        **kwargs,
    ):
        """Train through scvi-tools with minibatches tokenized on the fly by ``tokenize``."""
        # scvi-tools leaves the module in eval mode after training; Lightning keeps that mode,
        # which would switch dropout off in a second training run
        self.module.train()
        datasplitter_kwargs = {
            "collate_fn": TokenizingCollator(tokenize),
            **(datasplitter_kwargs or {}),
        }
        return UnsupervisedTrainingMixin.train(
            self,
            max_epochs=max_epochs,
            batch_size=batch_size,
            load_sparse_tensor=True,
            plan_kwargs=plan_kwargs,
            datasplitter_kwargs=datasplitter_kwargs,
            **kwargs,
        )

    def _iter_token_batches(
        self,
        adata: AnnData,
        indices: np.ndarray,
        batch_size: int,
    ):
        """Yield ``(positions, tokens)`` over the cells at ``indices`` in length-sorted batches.

        ``positions`` index the output rows (the order of ``indices``). Cells are read in
        chunks, sorted by token length inside each chunk and batched, so padding is minimal and
        every cell's tokens depend on that cell alone.
        """
        manager = self.get_anndata_manager(adata, required=True)
        X = manager.get_from_registry(REGISTRY_KEYS.X_KEY)
        tokenizer = self._tokenizer(adata)
        fields = {
            key: np.asarray(manager.get_from_registry(key)).reshape(adata.n_obs, -1)
            for key in getattr(tokenizer, "registry_keys", ())
        }
        for start in range(0, len(indices), _CHUNK_CELLS):
            chunk = indices[start : start + _CHUNK_CELLS]
            order = np.argsort(chunk, kind="stable")  # backed files need increasing indices
            Xc = to_csr(X[chunk[order]])
            positions = start + order
            for batch in length_bucketed_batches(tokenizer.lengths(Xc), batch_size):
                extra = {key: value[chunk[order][batch]] for key, value in fields.items()}
                yield positions[batch], tokenizer(Xc[batch], **extra)

    def _map_cells(
        self,
        adata: AnnData | None,
        indices: Sequence[int] | np.ndarray | None,
        batch_size: int | None,
        fn: Callable[[dict[str, torch.Tensor]], torch.Tensor],
    ) -> np.ndarray:
        """Run ``fn`` on token batches of the requested cells and gather rows in input order."""
        self._check_if_trained(warn=False)
        adata = self._validate_anndata(adata)
        batch_size = 64 if batch_size is None else int(batch_size)
        indices = _resolve_indices(indices, adata.n_obs)
        out: np.ndarray | None = None
        was_training = self.module.training
        self.module.eval()
        try:
            with torch.inference_mode():
                for positions, tokens in self._iter_token_batches(adata, indices, batch_size):
                    tensors = {k: torch.as_tensor(v, device=self.device) for k, v in tokens.items()}
                    result = fn(tensors).float().cpu().numpy()
                    if out is None:
                        out = np.empty((len(indices), *result.shape[1:]), dtype=np.float32)
                    out[positions] = result
        finally:
            self.module.train(was_training)
        if out is None:
            raise ValueError("No cells selected.")
        return out
