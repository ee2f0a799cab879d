"""Shared scvi-tools model base class for transformer foundation models."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from uuid import uuid4

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from anndata import AnnData
from scvi import REGISTRY_KEYS
from scvi.data import AnnDataManager
from scvi.data.fields import CategoricalObsField, LayerField, NumericalObsField
from scvi.model.base import BaseModelClass, UnsupervisedTrainingMixin

from ..data import (
    TokenizingCollator,
    check_expression,
    check_obs_labels,
    check_setup_keys,
    check_shape,
    check_unique,
    length_bucketed_batches,
    to_csr,
)
from ..module import BatchAdversarialModule
from ..tokenize import COUNT_PERTURB_MODES, perturb_counts
from ..train import PretrainingPlan
from ._lora import LoRAMixin

logger = logging.getLogger(__name__)

_CHUNK_CELLS = 8192
MODES: tuple[str, ...] = ("pretrain", "finetune")
_SCVI_UUID_KEY = "_scvi_uuid"  # where scvi-tools keeps an AnnData's registration id (adata.uns)
# keyword arguments of setup_anndata passed on to scvi-tools' transfer of a registration
_TRANSFER_ARGS = frozenset({"source_registry", "extend_categories", "allow_missing_labels"})


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


class FoundationModelBase(LoRAMixin, UnsupervisedTrainingMixin, BaseModelClass):
    """Behaviour shared by every cellformers model class.

    Subclasses provide the tokenizer (``_tokenizer``) and pass the per-batch forward pass to
    ``_map_cells``; this class holds AnnData registration with input
    validation, the handling of query data whose genes differ from the registered ones, and the
    length-bucketed, batch-size-invariant inference loop.
    """

    _training_plan_cls = PretrainingPlan
    _unknown_label = "unknown"  # label of cells below `unknown_threshold` in predict_celltype
    finetuned_ = False  # whether the classification head has been trained

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
        unknown = sorted(set(kwargs) - _TRANSFER_ARGS)
        if unknown:
            raise TypeError(
                f"{cls.__name__}.setup_anndata() got unexpected arguments {unknown}."
                + (
                    " Perturbation training (perturbation_key, control_label) is a feature of "
                    "SCFoundation; the other models perturb with `model.perturb(...)`."
                    if {"perturbation_key", "control_label"} & set(unknown)
                    else ""
                )
            )
        check_shape(adata)
        check_setup_keys(adata, layer=layer, obs_keys=[batch_key, labels_key], var_keys=[gene_key])
        check_obs_labels(adata, labels_key, role="labels_key")
        check_obs_labels(adata, batch_key, role="batch_key")
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

    @staticmethod
    def _total_counts_field(
        adata: AnnData, obs_key: str, registry_key: str, *, name: str, strictly_positive: bool
    ) -> NumericalObsField:
        """Check that ``adata.obs[obs_key]`` holds total counts and return its registry field."""
        if obs_key not in adata.obs:
            raise KeyError(f"{name} {obs_key!r} is not a column of adata.obs.")
        totals = pd.to_numeric(adata.obs[obs_key], errors="coerce").to_numpy()
        bad = (totals <= 0) if strictly_positive else (totals < 0)
        if not np.all(np.isfinite(totals)) or np.any(bad):
            kind = "positive" if strictly_positive else "non-negative"
            raise ValueError(f"adata.obs[{obs_key!r}] must hold {kind} finite total counts.")
        return NumericalObsField(registry_key, obs_key)

    def save(self, dir_path: str, *args, save_anndata: bool = False, **kwargs) -> None:
        """Save the model as :meth:`scvi.model.base.BaseModelClass.save` does.

        With ``save_anndata=True`` the AnnData is written as it is: anndata would otherwise turn
        its string ``obs``/``var`` columns into categoricals in place, changing the user's
        object. Pass ``convert_strings_to_categoricals=True`` to write them as categoricals.
        """
        if save_anndata:
            kwargs.setdefault("convert_strings_to_categoricals", False)
        super().save(dir_path, *args, save_anndata=save_anndata, **kwargs)

    # ------------------------------------------------------------------ genes
    def _gene_names(self, adata: AnnData) -> pd.Index:
        """Gene names of ``adata`` as registered (``var[gene_key]`` or ``var_names``)."""
        manager = self.get_anndata_manager(adata, required=True)
        gene_key = manager.registry["setup_args"].get("gene_key")
        if gene_key is None:
            return pd.Index(adata.var_names.astype(str))
        return pd.Index(adata.var[gene_key].astype(str))

    def _validate_anndata(self, adata: AnnData | None = None, copy_if_view: bool = True) -> AnnData:
        """Validate ``adata``; query data may carry any genes, labels and batches.

        A foundation model reads genes through its vocabulary, so a query AnnData whose genes
        differ from the registered ones, or whose label or batch column is missing or holds
        categories the reference lacks, is set up afresh (with its own setup if the user ran
        :meth:`setup_anndata` on it, else with the model's setup arguments minus the label
        column and, unless the model reads batches, the batch column) instead of being
        rejected by scvi-tools' field transfer, which requires the registered genes and
        categories. Inference never reads labels. A view is validated as a copy (the
        returned AnnData), so the user's view stays a view; the expression of a query is
        checked as :meth:`setup_anndata` checks it.
        """
        if adata is None:
            return super()._validate_anndata(adata, copy_if_view)
        if not isinstance(adata, AnnData):
            raise TypeError(f"Expected an AnnData object, got {type(adata).__name__}.")
        if adata is self.adata:
            return super()._validate_anndata(adata, copy_if_view)
        if adata.is_view:
            adata = adata.copy()
        check_shape(adata)
        setup_args = self._query_setup_args(adata)
        uuid = adata.uns.get(_SCVI_UUID_KEY)
        # look the stores up directly: scvi-tools' getters try a field transfer on copies
        own = type(self)._setup_adata_manager_store.get(uuid)
        own = own if own is not None and own.adata is adata else None  # set up by the user
        if (
            own is None
            and self._has_registered_genes(adata)
            and setup_args == self.registry_["setup_args"]
        ):
            adata = super()._validate_anndata(adata, copy_if_view)
            self._check_query_expression(adata)
            return adata
        manager = type(self)._per_instance_manager_store.get(self.id, {}).get(uuid)
        if manager is not None and manager.adata is adata:
            manager.validate()
            self._check_query_expression(adata)
            return adata
        manager = own
        if manager is None:
            # Not set up, or the registration was copied from another AnnData with the data.
            adata.uns[_SCVI_UUID_KEY] = str(uuid4())
            logger.info("Setting up query AnnData with the model's setup arguments.")
            getattr(type(self), self.registry_["setup_method_name"])(adata, **setup_args)
            manager = self._get_most_recent_anndata_manager(adata, required=True)
        self._register_manager_for_instance(manager)
        if own is not None:  # set up by the user, possibly before the data changed
            self._check_query_expression(adata)
        return adata

    def _check_query_expression(self, adata: AnnData) -> None:
        """Check the registered expression of a query as :meth:`setup_anndata` does."""
        manager = self.get_anndata_manager(adata, required=True)
        layer = manager.registry["setup_args"].get("layer")
        field = next(f for f in manager.fields if f.registry_key == REGISTRY_KEYS.X_KEY)
        check_expression(
            manager.get_from_registry(REGISTRY_KEYS.X_KEY),
            name="adata.X" if layer is None else f"adata.layers[{layer!r}]",
            require_integer=field.is_count_data,
        )

    def _reads_batches(self) -> bool:
        """Whether inference reads each cell's batch (then a query must register it)."""
        return False

    def _query_setup_args(self, adata: AnnData | None) -> dict:
        """Return the model's setup arguments for a query AnnData.

        Inference reads only the expression (and per-cell fields the tokenizer needs), so the
        label column is left out, as is the batch column unless :meth:`_reads_batches`, or
        when ``adata`` lacks it: a query can be embedded and classified whatever its labels.
        """
        args = dict(self.registry_["setup_args"])
        if adata is not None and adata is not self.adata:
            if args.get("labels_key") is not None:
                args["labels_key"] = None
            key = args.get("batch_key")
            if key is not None and (not self._reads_batches() or key not in adata.obs):
                args["batch_key"] = None
        return args

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
        X=None,
    ):
        """Yield ``(positions, tokens)`` over the cells at ``indices`` in length-sorted batches.

        ``positions`` index the output rows (the order of ``indices``). Cells are read in
        chunks, sorted by token length inside each chunk and batched, so padding is minimal and
        every cell's tokens depend on that cell alone. ``X`` replaces the registered expression
        of the selected cells (one row per entry of ``indices``, in that order), e.g. for
        in-silico perturbations; per-cell registry fields are still read from ``adata``.
        """
        manager = self.get_anndata_manager(adata, required=True)
        source = manager.get_from_registry(REGISTRY_KEYS.X_KEY) if X is None else None
        tokenizer = self._tokenizer(adata)
        fields = {
            key: np.asarray(manager.get_from_registry(key)).reshape(adata.n_obs, -1)
            for key in getattr(tokenizer, "registry_keys", ())
        }
        for start in range(0, len(indices), _CHUNK_CELLS):
            chunk = indices[start : start + _CHUNK_CELLS]
            if X is None:
                order = np.argsort(chunk, kind="stable")  # backed files need increasing indices
                Xc = to_csr(source[chunk[order]])
            else:
                order = np.arange(len(chunk))
                Xc = to_csr(X[start : start + len(chunk)])
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
        *,
        reduce: bool = False,
        X=None,
    ) -> np.ndarray:
        """Run ``fn`` on token batches of the requested cells and gather rows in input order.

        With ``reduce=True`` the rows are summed over all cells instead (in float64), for
        per-cell outputs too large to keep (e.g. one vector per gene and cell). ``X`` replaces
        the expression of the selected cells (see :meth:`_iter_token_batches`).
        """
        self._check_if_trained(warn=False)
        adata = self._validate_anndata(adata)
        batch_size = 64 if batch_size is None else int(batch_size)
        indices = _resolve_indices(indices, adata.n_obs)
        out: np.ndarray | None = None
        was_training = self.module.training
        self.module.eval()
        try:
            with torch.inference_mode():
                for positions, tokens in self._iter_token_batches(adata, indices, batch_size, X=X):
                    tensors = {k: torch.as_tensor(v, device=self.device) for k, v in tokens.items()}
                    result = fn(tensors)
                    if reduce:
                        total = result.double().sum(0).cpu().numpy()
                        out = total if out is None else out + total
                        continue
                    result = result.float().cpu().numpy()
                    if out is None:
                        out = np.empty((len(indices), *result.shape[1:]), dtype=np.float32)
                    out[positions] = result
        finally:
            self.module.train(was_training)
        if out is None:
            raise ValueError("No cells selected.")
        return out

    # ------------------------------------------------------------------ labels
    def _has_labels(self) -> bool:
        """Whether the model's AnnData was set up with a ``labels_key``."""
        if self.adata_manager is None:
            return False
        return self.adata_manager.registry["setup_args"].get("labels_key") is not None

    def _check_label_categories(self) -> None:
        """Raise if a registered label has no cell: the head would learn it as a class."""
        codes = np.asarray(self.get_from_registry(self.adata, REGISTRY_KEYS.LABELS_KEY))
        names = self._label_names()
        unused = names[np.bincount(codes.reshape(-1).astype(np.int64), minlength=len(names)) == 0]
        if len(unused):
            key = self._setup_arg(self.adata, "labels_key")
            raise ValueError(
                f"adata.obs[{key!r}] has categories without cells: {list(unused[:10])}. They would "
                "become classes the model can predict but never learns; drop them with "
                f"`adata.obs[{key!r}] = adata.obs[{key!r}].cat.remove_unused_categories()` and "
                "run setup_anndata and build the model again."
            )

    def _label_names(self) -> np.ndarray:
        """Return the registered label categories, in the order of the classifier's outputs."""
        return np.asarray(self.get_state_registry(REGISTRY_KEYS.LABELS_KEY).categorical_mapping)

    # ------------------------------------------------------------------ fine-tuning hooks
    def _backbone_layers(self) -> Sequence[torch.nn.Module]:  # pragma: no cover - abstract
        """Return the encoder layers in order (``freeze_layers=k`` keeps the first ``k`` fixed)."""
        raise NotImplementedError

    def _head_modules(self) -> Sequence[torch.nn.Module]:  # pragma: no cover - abstract
        """Return the classification head (the only part trained with ``freeze_layers="all"``)."""
        raise NotImplementedError

    def _class_logits(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:  # pragma: no cover
        """Class logits ``[batch, n_labels]`` of a token batch."""
        raise NotImplementedError

    def _prepare_classifier(self, n_classes: int) -> None:
        """Make sure the module has a head for ``n_classes`` classes (may build one)."""
        if self.module.n_labels != n_classes:
            raise ValueError(
                f"The model's classification head has {self.module.n_labels} classes but the "
                f"registered labels have {n_classes}; build the model with this AnnData's labels."
            )

    def _replace_module(self, module: torch.nn.Module, **init_params) -> None:
        """Put ``module`` in place of the current one (same device and mode).

        ``init_params`` update the saved constructor arguments (e.g. ``n_labels`` after a new
        head), so :meth:`save` / :meth:`load` rebuild the new network.
        """
        module.to(self.device)
        module.train(self.module.training)
        self.module = module
        for group in ("non_kwargs", "kwargs"):
            params = self.init_params_.get(group, {})
            params.update({k: v for k, v in init_params.items() if k in params})

    def _training_tokenizer(self):
        """Tokenizer of the training minibatches (by default the inference one)."""
        return self._tokenizer(self.adata)

    def _check_cells(self, adata: AnnData, indices: np.ndarray) -> None:
        """Reject cells the model cannot read (hook; every cell is fine by default)."""

    def _frozen_parameters(self, freeze_layers: int | str) -> list[torch.nn.Parameter]:
        """Trainable parameters to hold fixed for ``freeze_layers`` (an int or ``"all"``)."""
        layers = list(self._backbone_layers())
        if isinstance(freeze_layers, str):
            if freeze_layers != "all":
                raise ValueError(
                    f"freeze_layers must be an integer or 'all', got {freeze_layers!r}."
                )
            keep = {id(p) for m in self._head_modules() for p in m.parameters()}
            return [p for p in self.module.parameters() if p.requires_grad and id(p) not in keep]
        if isinstance(freeze_layers, bool) or not 0 <= int(freeze_layers) <= len(layers):
            raise ValueError(
                f"freeze_layers must be in [0, {len(layers)}] or 'all', got {freeze_layers!r}."
            )
        return [
            p
            for layer in layers[: int(freeze_layers)]
            for p in layer.parameters()
            if p.requires_grad
        ]

    def _class_weight_tensor(
        self, class_weight: str | Mapping[str, float] | None
    ) -> torch.Tensor | None:
        """Per-class loss weights: ``"balanced"`` (``n / (k * n_c)``) or a label -> weight map."""
        if class_weight is None:
            return None
        names = self._label_names()
        if isinstance(class_weight, str):
            if class_weight != "balanced":
                raise ValueError(
                    f"class_weight must be None, 'balanced' or a mapping label -> weight, got "
                    f"{class_weight!r}."
                )
            codes = np.asarray(self.get_from_registry(self.adata, REGISTRY_KEYS.LABELS_KEY))
            counts = np.bincount(codes.reshape(-1).astype(np.int64), minlength=len(names))
            present = counts > 0
            weights = np.zeros(len(names))
            weights[present] = counts.sum() / (present.sum() * counts[present])
        elif isinstance(class_weight, Mapping):
            unknown = sorted(set(map(str, class_weight)) - set(map(str, names)))
            if unknown:
                raise ValueError(f"class_weight names labels that are not registered: {unknown}.")
            weights = np.array([float(class_weight.get(str(n), 1.0)) for n in names])
            if not np.all(np.isfinite(weights)) or (weights < 0).any() or weights.sum() <= 0:
                raise ValueError("class_weight values must be finite, >= 0 and not all zero.")
        else:
            raise TypeError(
                f"class_weight must be None, 'balanced' or a mapping, got {type(class_weight)}."
            )
        return torch.as_tensor(weights, dtype=torch.float32)

    def _run_training(
        self,
        *,
        mode: str,
        freeze_layers: int | str,
        class_weight: str | Mapping[str, float] | None,
        max_epochs: int | None,
        batch_size: int,
        plan_kwargs: dict,
        datasplitter_kwargs: dict | None,
        batch_adversarial: float = 0.0,
        **kwargs,
    ):
        """Pretrain (``mode="pretrain"``) or fine-tune the classifier (``"finetune"``).

        Shared by every model class: checks the labels, builds or checks the head, holds the
        frozen parameters fixed, sets the class weights and the module's objective for the run
        (restoring them afterwards, also on error) and, for fine-tuning with
        ``early_stopping=True``, monitors the validation macro-F1 unless told otherwise. With
        ``batch_adversarial > 0`` the run also removes batch information from the cell
        embedding with an adversarial batch discriminator of that weight
        (:class:`~cellformers.module.BatchAdversarialModule`; needs ``batch_key``).
        """
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}.")
        finetune = mode == "finetune"
        weights = None
        if finetune:
            if not self._has_labels():
                raise ValueError(
                    "Fine-tuning needs labels: register them with "
                    f"`{type(self).__name__}.setup_anndata(adata, labels_key=...)` and build the "
                    "model again."
                )
            self._check_label_categories()
            with self._lora_set_aside():  # a rebuilt module gets the adapters back
                self._prepare_classifier(len(self._label_names()))
            weights = self._class_weight_tensor(class_weight)
            if kwargs.get("early_stopping"):
                kwargs.setdefault("early_stopping_monitor", "macro_f1_validation")
                kwargs.setdefault("early_stopping_mode", "max")
        elif class_weight is not None:
            raise ValueError("class_weight applies to fine-tuning (mode='finetune').")
        frozen = self._frozen_parameters(freeze_layers)
        frozen += self._lora_frozen_parameters(frozen, finetune=finetune)
        self._check_cells(self.adata, np.arange(self.adata.n_obs))
        previous = self.module.objective
        self.module.objective = "classification" if finetune else "mlm"
        self.module.class_weights = weights
        backbone = self.module
        if batch_adversarial:
            self.module = self._batch_adversary(float(batch_adversarial))
        for p in frozen:
            p.requires_grad_(False)
        try:
            result = self._train_on_tokens(
                self._training_tokenizer(),
                max_epochs=max_epochs,
                batch_size=batch_size,
                plan_kwargs=plan_kwargs,
                datasplitter_kwargs=datasplitter_kwargs,
                **kwargs,
            )
        finally:
            if self.module is not backbone:
                self._batch_discriminator = self.module.discriminator
                self.module = backbone
            for p in frozen:
                p.requires_grad_(True)
            self.module.objective = previous
            self.module.class_weights = None
        if finetune:
            self.finetuned_ = True
        return result

    def _cell_embedding_dim(self) -> int:  # pragma: no cover - abstract
        """Width of :meth:`_perturbation_embedding` (the default cell embedding)."""
        raise NotImplementedError

    def _batch_adversary(self, weight: float) -> BatchAdversarialModule:
        """Wrap the module for adversarial batch removal (the discriminator is kept across runs)."""
        if self._setup_arg(self.adata, "batch_key") is None:
            raise ValueError(
                "batch_adversarial needs batch labels: register them with "
                f"`{type(self).__name__}.setup_anndata(adata, batch_key=...)`."
            )
        n_batch = len(self.get_state_registry(REGISTRY_KEYS.BATCH_KEY).categorical_mapping)
        previous = getattr(self, "_batch_discriminator", None)
        wrapper = BatchAdversarialModule(
            self.module,
            self._perturbation_embedding,
            n_batch,
            self._cell_embedding_dim(),
            weight,
            discriminator=previous,
        )
        return wrapper.to(self.device)

    # ------------------------------------------------------------------ classification
    def predict_celltype(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | np.ndarray | None = None,
        batch_size: int | None = None,
        soft: bool = False,
        unknown_threshold: float | None = None,
    ) -> np.ndarray | pd.DataFrame:
        """Predict the registered labels with the fine-tuned classification head.

        Parameters
        ----------
        adata
            AnnData to classify (any gene set); defaults to the model's AnnData.
        indices
            Cells to classify (positions or boolean mask); all by default.
        batch_size
            Cells per forward pass (default 64); predictions do not depend on it.
        soft
            Return class probabilities (softmax of the logits) instead of labels.
        unknown_threshold
            Give a cell the label ``"unknown"`` (scBERT: ``"Unassigned"``) when its highest
            class probability is below this value; by default every cell gets its most likely
            label. Only for hard predictions.

        Returns
        -------
        An array of predicted labels, or with ``soft=True`` a DataFrame of probabilities with
        one column per label, indexed by cell name.

        """
        n_labels = getattr(self.module, "n_labels", 0)
        if n_labels == 0:
            raise ValueError(
                "This model has no classification head: register `labels_key` in setup_anndata "
                "and run `train(mode='finetune')` (or load a fine-tuned checkpoint)."
            )
        if unknown_threshold is not None:
            if soft:
                raise ValueError("unknown_threshold applies to hard predictions (soft=False).")
            if not 0.0 <= float(unknown_threshold) <= 1.0:
                raise ValueError(
                    f"unknown_threshold must be a probability in [0, 1], got {unknown_threshold}."
                )
        if not self.finetuned_:
            raise ValueError(
                "The classification head has not been fine-tuned, so its predictions would be "
                "random: run `train(mode='finetune')` first (or load a fine-tuned checkpoint)."
            )
        adata = self._validate_anndata(adata)
        indices = _resolve_indices(indices, adata.n_obs)
        self._check_cells(adata, indices)
        probs = self._map_cells(
            adata,
            indices,
            batch_size,
            lambda t: torch.softmax(self._class_logits(t).float(), -1),
        )
        labels = self._label_names() if self._has_labels() else np.arange(n_labels).astype(str)
        if soft:
            return pd.DataFrame(probs, index=adata.obs_names[indices], columns=labels)
        predicted = labels[probs.argmax(1)]
        if unknown_threshold is not None:
            predicted = predicted.astype(object)
            predicted[probs.max(1) < float(unknown_threshold)] = self._unknown_label
        return predicted

    # ------------------------------------------------------------------ perturbation
    def _perturbation_embedding(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """Cell embeddings compared by :meth:`perturb` (hook; the default embedding)."""
        raise NotImplementedError(f"{type(self).__name__} does not support perturb().")

    def _perturbation_expression(self, adata: AnnData):
        """``(fn, genes)`` predicting each cell's expression of ``genes``, or `None` (hook).

        Models with an expression decoder return a function of a token batch giving
        ``[batch, len(genes)]`` and the ``var_names`` of ``adata`` it predicts.
        """
        return None

    def _perturbation_columns(self, adata: AnnData, genes) -> tuple[list[str], list[np.ndarray]]:
        """Names and ``adata`` columns of the perturbations in ``genes`` (names or combinations)."""
        if isinstance(genes, str):
            genes = [genes]
        combos = [(g,) if isinstance(g, str) else tuple(map(str, g)) for g in genes]
        if not combos:
            raise ValueError(
                "Pass the perturbations as `genes=[...]`: gene names, or tuples of names for "
                "combinations (an empty tuple is the unperturbed cell)."
            )
        names = ["+".join(c) if c else "control" for c in combos]
        if len(set(names)) != len(names):
            raise ValueError("`genes` names a perturbation twice.")
        gene_names = np.asarray(self._gene_names(adata))
        known = np.asarray(self._tokenizer(adata).gene_ids) >= 0
        wanted = sorted({g for c in combos for g in c})
        missing = [g for g in wanted if g not in set(gene_names)]
        if missing:
            raise ValueError(
                f"{len(missing)} gene(s) to perturb are not in the data's genes "
                f"({'var[gene_key]' if self._setup_arg(adata, 'gene_key') else 'var_names'}): "
                f"{missing[:10]}."
            )
        unread = [g for g in wanted if not known[gene_names == g].any()]
        if unread:
            raise ValueError(
                f"{len(unread)} gene(s) to perturb are not read by the model (not in its "
                f"vocabulary or gene list): {unread[:10]}."
            )
        columns = [np.flatnonzero(np.isin(gene_names, c) & known) for c in combos]
        return names, columns

    def _setup_arg(self, adata: AnnData, name: str):
        """Return a setup argument of ``adata``'s registration."""
        manager = self.get_anndata_manager(adata, required=True)
        return manager.registry["setup_args"].get(name)

    def perturb(
        self,
        adata: AnnData | None = None,
        genes=(),
        mode: str = "delete",
        *,
        factor: float | None = None,
        indices: Sequence[int] | np.ndarray | None = None,
        batch_size: int | None = None,
    ) -> AnnData:
        """In-silico perturbation of genes, on each cell's expression before tokenization.

        Every cell is embedded as it is and with the genes perturbed
        (:func:`~cellformers.tokenize.perturb_counts`): ``"delete"`` sets their values to 0,
        ``"knockdown"`` multiplies them by ``factor`` (default 0.5), ``"overexpress"`` sets them
        to ``factor`` (default 2) times the cell's largest value. The perturbed cell goes
        through the model's own tokenizer, so the change means what the model's encoding makes
        of it (a removed token, a lower bin or rank, a top-ranked gene). The embedding shift
        is ``1 - cos(perturbed, original)``; a cell whose values do not change (e.g. deleting
        a gene it does not express) gets exactly 0. Models with an expression decoder also
        report the predicted expression change of every gene.

        Parameters
        ----------
        adata
            Cells to perturb (any gene set); defaults to the model's AnnData.
        genes
            Gene names (``var_names`` or ``var[gene_key]``), each perturbed on its own, and/or
            tuples of names perturbed together (a combination, named ``"A+B"``); the empty
            tuple is the unperturbed control (shift 0).
        mode
            ``"delete"``, ``"knockdown"`` or ``"overexpress"``.
        factor
            Knockdown fraction kept, or overexpression multiple of the cell's largest value.
        indices
            Cells to perturb (positions or boolean mask); all by default.
        batch_size
            Cells per forward pass; results do not depend on it.

        Returns
        -------
        AnnData of cells x perturbations: ``X`` the embedding shift, ``layers["changed"]``
        whether the perturbation changed the cell's values, ``var`` the mean shift over the
        changed cells and their number, and, for models with an expression decoder,
        ``varm["expression_change"]`` (a DataFrame of perturbations x genes: the mean over the
        cells of the predicted expression with the perturbation minus without, in the model's
        expression units, over the cells where the model predicts the gene; a deleted gene's
        own prediction is set to 0 in the changed cells, since it is not expressed by
        construction);
        ``uns["perturb"]`` holds the settings.

        """
        if mode not in COUNT_PERTURB_MODES:
            raise ValueError(f"mode must be one of {COUNT_PERTURB_MODES}, got {mode!r}.")
        perturb_counts(np.zeros((1, 1)), [], mode, factor)  # checks factor before any work
        adata = self._validate_anndata(adata)
        idx = _resolve_indices(indices, adata.n_obs)
        self._check_cells(adata, idx)
        names, columns = self._perturbation_columns(adata, genes)
        manager = self.get_anndata_manager(adata, required=True)
        X = to_csr(manager.get_from_registry(REGISTRY_KEYS.X_KEY)[np.sort(idx)])
        X = X[np.argsort(np.argsort(idx, kind="stable"), kind="stable")]  # back to idx order
        expression = self._perturbation_expression(adata)

        def run(X_cells):
            emb = self._map_cells(adata, idx, batch_size, self._perturbation_embedding, X=X_cells)
            if expression is None:
                return emb, None
            fn, _ = expression
            return emb, self._map_cells(adata, idx, batch_size, fn, X=X_cells)

        base_emb, base_expr = run(X)
        shift = np.zeros((len(idx), len(names)), dtype=np.float32)
        changed = np.zeros((len(idx), len(names)), dtype=bool)
        change = None if expression is None else np.zeros((len(names), base_expr.shape[1]))
        for j, cols in enumerate(columns):
            Xp, changed[:, j] = perturb_counts(X, cols, mode, factor)
            if not changed[:, j].any():
                continue
            emb, expr = run(Xp)
            cos = F.cosine_similarity(torch.as_tensor(emb), torch.as_tensor(base_emb), dim=-1)
            shift[:, j] = np.where(changed[:, j], 1.0 - cos.numpy(), 0.0)
            if expression is not None:
                expr = np.where(changed[:, j, None], expr, base_expr)
                if mode == "delete":  # a deleted gene is not expressed in the changed cells
                    own = np.isin(expression[1], np.asarray(adata.var_names)[cols])
                    expr[np.ix_(changed[:, j], own)] = 0.0
                diff = expr - base_expr  # NaN where a model predicts no value for a gene
                seen = np.isfinite(diff)
                change[j] = np.where(seen, diff, 0.0).sum(0) / np.maximum(seen.sum(0), 1)
        var = pd.DataFrame(
            {
                "n_cells_changed": changed.sum(0),
                "mean_shift": np.where(
                    changed.any(0), (shift * changed).sum(0) / np.maximum(changed.sum(0), 1), 0.0
                ),
            },
            index=pd.Index(names, name="perturbation"),
        )
        out = AnnData(
            X=shift,
            obs=pd.DataFrame(index=adata.obs_names[idx].copy()),
            var=var,
            layers={"changed": changed},
            uns={"perturb": {"mode": mode, "factor": factor, "model": type(self).__name__}},
        )
        if expression is not None:
            out.varm["expression_change"] = pd.DataFrame(
                change.astype(np.float32), index=out.var_names, columns=list(expression[1])
            )
        return out
