"""Shared scvi-tools model base class for transformer foundation models."""

from __future__ import annotations

import functools
import inspect
import json
import logging
import math
import numbers
import os
import shutil
import textwrap
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal
from uuid import uuid4

import anndata
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from anndata import AnnData
from mudata import MuData
from scvi import REGISTRY_KEYS
from scvi.data import AnnDataManager
from scvi.data.fields import (
    CategoricalObsField,
    LayerField,
    MuDataCategoricalObsField,
    MuDataLayerField,
    MuDataObsmField,
    NumericalObsField,
    ObsmField,
)
from scvi.model.base import BaseModelClass, UnsupervisedTrainingMixin

from .._io import (
    atomic_write,
    check_format,
    check_weights,
    decode_json_value,
    encode_json_value,
    read_json,
    read_safetensors,
    recover_folder,
)
from ..data import (
    ResumableDataSplitter,
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
from ..train import LAST_CHECKPOINT, PretrainingPlan
from ._lora import LoRAMixin

logger = logging.getLogger(__name__)

_CHUNK_CELLS = 8192
MODES: tuple[str, ...] = ("pretrain", "finetune")
#: What inference does with cells that have no counts in the model's genes.
EMPTY_CELLS: tuple[str, ...] = ("raise", "nan")
_N_NAMED = 5  # cells named in messages
_SINGLE_CLASS_SHARE = 0.98  # predict_celltype warns when one class takes this share of cells
_SCVI_UUID_KEY = "_scvi_uuid"  # where scvi-tools keeps an AnnData's registration id (adata.uns)
# keyword arguments of setup_anndata passed on to scvi-tools' transfer of a registration
_TRANSFER_ARGS = frozenset({"source_registry", "extend_categories", "allow_missing_labels"})
SPATIAL_KEY = "spatial"  # registry key of the cells' spatial coordinates
#: setup_mudata arguments that may name a modality, and the RNA modality's default name.
_MODALITY_ARGS = (
    "rna_layer",
    "protein_layer",
    "atac_layer",
    "batch_key",
    "labels_key",
    "spatial_key",
)
_DEFAULT_RNA_MODALITY = "rna"


def _check_genes_and_expression(
    adata: AnnData, layer: str | None, gene_key: str | None, is_count_data: bool, *, name: str
) -> None:
    """Check the gene names and the expression matrix of ``adata`` (named ``name`` in errors)."""
    check_unique(adata.var_names, what=f"{name}.var_names")
    if gene_key is not None and adata.var[gene_key].isna().all():
        raise ValueError(f"{name}.var[{gene_key!r}] holds no gene names.")
    X = adata.X if layer is None else adata.layers[layer]
    if X is None:
        raise ValueError(f"{name}.X is empty; pass the layer that holds the counts.")
    where = f"{name}.X" if layer is None else f"{name}.layers[{layer!r}]"
    check_expression(X, name=where, require_integer=is_count_data)


def _check_spatial(adata: AnnData | MuData, key: str, *, name: str) -> None:
    """Check that ``adata.obsm[key]`` holds finite 2-D or 3-D coordinates, one row per cell."""
    if key not in adata.obsm:
        raise KeyError(
            f"spatial_key {key!r} not found in {name}.obsm (available: {list(adata.obsm)}). "
            "Store each cell's coordinates there, e.g. `adata.obsm['spatial'] = "
            "adata.obs[['x', 'y']].to_numpy()`."
        )
    coords = adata.obsm[key]
    coords = coords.to_numpy() if isinstance(coords, pd.DataFrame) else np.asarray(coords)
    if coords.ndim != 2 or coords.shape[0] != adata.n_obs or coords.shape[1] not in (2, 3):
        raise ValueError(
            f"{name}.obsm[{key!r}] must be an array of shape (n_cells, 2) or (n_cells, 3) "
            f"(n_cells = {adata.n_obs}), got shape {coords.shape}."
        )
    if not np.issubdtype(coords.dtype, np.number) or np.issubdtype(coords.dtype, np.bool_):
        raise ValueError(f"{name}.obsm[{key!r}] must hold numbers, got dtype {coords.dtype}.")
    bad = ~np.isfinite(coords).all(axis=1)
    if bad.any():
        raise ValueError(
            f"{name}.obsm[{key!r}] has NaN or infinite coordinates in {int(bad.sum())} cells "
            f"(e.g. {list(adata.obs_names[bad][:5])}); drop those cells or fill them in."
        )


def _modality(mdata: MuData, mod: str | None) -> tuple[AnnData | MuData, str]:
    """Return modality ``mod`` of ``mdata`` (``mdata`` itself for `None`) and its error name."""
    return (mdata, "mdata") if mod is None else (mdata.mod[mod], f"mdata.mod[{mod!r}]")


def _resolve_modalities(mdata: MuData, modalities: Mapping[str, str] | None) -> dict[str, str]:
    """Check ``setup_mudata``'s ``modalities`` against ``mdata``; return argument -> modality.

    Every named modality must exist and hold exactly ``mdata.obs_names``, in that order: the
    registered fields are read per modality and combined by row position.
    """
    mods = dict(modalities or {})
    unknown = sorted(set(mods) - set(_MODALITY_ARGS))
    if unknown:
        raise ValueError(
            f"modalities names unknown setup arguments {unknown}; use {list(_MODALITY_ARGS)}."
        )
    if mods.get("rna_layer") is None:
        mods["rna_layer"] = _DEFAULT_RNA_MODALITY
    for arg, mod in mods.items():
        if mod is None:
            continue
        if mod not in mdata.mod:
            raise KeyError(
                f"Modality {mod!r} (for {arg}) not found in the MuData; its modalities are "
                f"{list(mdata.mod)}. Pass `modalities={{{arg!r}: <modality name>}}`."
            )
        names = mdata.mod[mod].obs_names
        if not names.equals(mdata.obs_names):
            missing = mdata.obs_names.difference(names)
            detail = (
                f"{len(missing)} of the MuData's {mdata.n_obs} cells are missing from it "
                f"(e.g. {list(missing[:3])})"
                if len(missing) or len(names) != mdata.n_obs
                else "its cells are in another order"
            )
            raise ValueError(
                f"Cells of modality {mod!r} are not aligned with mdata.obs_names: {detail}. "
                "Keep the cells measured in every modality, in one order, e.g. with "
                "`muon.pp.intersect_obs(mdata)`, then `mdata.update()`."
            )
    return mods


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


def _warn_single_class(codes: np.ndarray, labels: np.ndarray, *, min_cells: int = 20) -> None:
    """Warn when a head with several classes predicts one class for (almost) all cells."""
    if len(labels) < 2 or codes.size < min_cells:
        return
    counts = np.bincount(codes, minlength=len(labels))
    top = int(counts.argmax())
    if counts[top] >= _SINGLE_CLASS_SHARE * codes.size:
        warnings.warn(
            f"The classification head predicts {labels[top]!r} for {counts[top]:,} of "
            f"{codes.size:,} cells; unless the cells really are all of one type, the head has "
            "collapsed to one class (too little fine-tuning, a too high or too low learning "
            "rate, or a collapsed cell embedding). Train longer or check the validation "
            "macro-F1 in `model.history`.",
            UserWarning,
            stacklevel=3,
        )


def _check_int(name: str, value, *, minimum: int = 1) -> int:
    """``value`` as an int, or a TypeError/ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {value!r}.")
    if value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}.")
    return int(value)


def _check_real(
    name: str, value, *, low: float, high: float = math.inf, open_low=False, open_high=True
) -> float:
    """``value`` as a float in the interval from ``low`` to ``high``, or an error naming it."""
    interval = f"{'(' if open_low else '['}{low:g}, {high:g}{')' if open_high else ']'}"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number in {interval}, got {value!r}.")
    value = float(value)
    above = value > low if open_low else value >= low
    below = value < high if open_high else value <= high
    if not (math.isfinite(value) and above and below):
        raise ValueError(f"{name} must be a finite number in {interval}, got {value!r}.")
    return value


def _check_mapping(name: str, value) -> dict:
    """``value`` (a mapping or `None`) as a new dict, or a TypeError naming ``name``."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise TypeError(f"{name} must be a dict of keyword arguments, got {type(value).__name__}.")
    return dict(value)


_TRAIN_DOC = """{summary}

{notes}

Training runs through Lightning (scvi-tools' ``TrainRunner``), so ``accelerator``,
``devices``, ``strategy`` (e.g. ``"ddp"``), ``precision`` and the other Lightning
``Trainer`` options work as in any scvi-tools model. Every argument is checked before any
work starts.

The run is reproducible: under the same ``scvi.settings.seed`` it gives the same weights,
whatever ``checkpoint_dir`` and the number of data-loader workers. With ``checkpoint_dir`` it also writes ``last.ckpt`` in that
folder every ``checkpoint_every_n_steps`` optimiser steps (weights, optimiser and
learning-rate schedule, loop position, training order and seeds). After a crash or a kill,
build the model as before (same data, same ``scvi.settings.seed``) and call ``train`` again
with the same arguments and ``ckpt_path="last"``: training continues from that checkpoint
and ends with the same weights as a run that never stopped. The checkpoint loads with
``torch.load(..., weights_only=True)`` (it holds no pickled code). The training history of
a resumed run starts at the checkpoint.

Parameters
----------
max_epochs
    Passes through the training cells; scvi-tools' heuristic when `None`.
mode
    {modes}.
accelerator
    Lightning accelerator (``"cpu"``, ``"gpu"``, ``"auto"`` …).
devices
    Lightning devices (a number, a list of device indices or ``"auto"``).
train_size
    Fraction of the cells used for training, in (0, 1]; 0.9 when `None`.
validation_size
    Fraction of the cells used for validation, in [0, 1); ``1 - train_size`` when `None`.
    With ``train_size`` it must sum to at most 1; the rest is a test set.
shuffle_set_split
    Split the cells at random (under ``scvi.settings.seed``) rather than in order.
batch_size
    Cells per minibatch; the class's default below when `None`.
early_stopping
    Stop when the monitored validation metric stops improving (fine-tuning monitors the
    validation macro-F1, ``macro_f1_validation``; other options such as
    ``early_stopping_patience`` go to ``trainer_kwargs``).
lr
    Peak learning rate of AdamW; the class's default below when `None`.
weight_decay
    AdamW weight decay; the class's default below when `None`.
warmup_ratio
    Fraction of the optimiser steps used for linear warm-up, in [0, 1); the class's default
    below when `None`.
freeze_layers
    Keep the first ``freeze_layers`` encoder layers fixed (the embeddings still train);
    ``"all"`` trains only the classification head{official}.
class_weight
    Fine-tuning only: ``"balanced"`` weights each class's cross-entropy by
    ``n_cells / (n_classes * n_cells_in_class)``, or a mapping label -> weight (unlisted
    labels weigh 1).
batch_adversarial
    With a weight ``w > 0``, also train an adversarial batch discriminator on the cell
    embedding with weight ``w`` (batch removal for integration; needs ``batch_key``).
checkpoint_dir
    Folder for the resumable checkpoint ``last.ckpt``; `None` writes none.
checkpoint_every_n_steps
    Optimiser steps between two checkpoints (a kill loses at most about that many).
ckpt_path
    ``"last"`` resumes from ``checkpoint_dir/last.ckpt`` (and starts afresh when there is
    none yet), a path resumes from that checkpoint file; `None` starts afresh.
datasplitter_kwargs
    Passed to scvi-tools' :class:`~scvi.dataloaders.DataSplitter` (e.g. ``num_workers``).
plan_kwargs
    Other :class:`~cellformers.train.PretrainingPlan` arguments (e.g.
    ``lr_schedule="step"``, ``min_lr_ratio``); they take precedence over ``lr``,
    ``weight_decay`` and ``warmup_ratio``.
trainer_kwargs
    Passed to :class:`scvi.train.Trainer` and Lightning's ``Trainer`` (e.g.
    ``max_time``, ``gradient_clip_val``, ``precision``, ``strategy``).
datamodule
    A Lightning data module in place of the registered AnnData. Not supported yet: the
    minibatches must go through the model's tokenizer.
**kwargs
    Merged into ``trainer_kwargs``{extra}.

Returns
-------
`None`; the trained weights stay in the model, and ``history`` holds the logged metrics.
"""


class FoundationModelBase(LoRAMixin, UnsupervisedTrainingMixin, BaseModelClass):
    """Behaviour shared by every cellformers model class.

    Subclasses provide the tokenizer (``_tokenizer``) and pass the per-batch forward pass to
    ``_map_cells``; this class holds AnnData registration with input
    validation, the handling of query data whose genes differ from the registered ones, and the
    length-bucketed, batch-size-invariant inference loop.
    """

    _training_plan_cls = PretrainingPlan
    _data_splitter_cls = ResumableDataSplitter
    _modes: ClassVar[tuple[str, ...]] = MODES  # values of train(mode=...)
    # class defaults of train(): a value, or a dict mode -> value
    _train_defaults: ClassVar[dict[str, Any]] = {
        "batch_size": 32,
        "lr": 1e-4,
        "weight_decay": 0.01,
        "warmup_ratio": 0.1,
    }
    # class-specific parts of the train() docstring (see __init_subclass__)
    _train_summary: ClassVar[str] = "Pretrain the network or fine-tune its classification head."
    _train_notes: ClassVar[str] = ""
    _train_official_freeze: ClassVar[str] = ""
    _train_extra_kwargs: ClassVar[str] = ""
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
        spatial_key: str | None = None,
        extra_fields: Sequence = (),
        **kwargs,
    ) -> None:
        """Validate ``adata`` and register the fields every model reads (plus ``extra_fields``)."""
        if not isinstance(adata, AnnData):
            hint = ""
            if isinstance(adata, MuData):
                hint = f" Set a MuData up with `{cls.__name__}.setup_mudata`."
            raise TypeError(f"Expected an AnnData object, got {type(adata).__name__}.{hint}")
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
        _check_genes_and_expression(adata, layer, gene_key, is_count_data, name="adata")
        fields = [
            LayerField(REGISTRY_KEYS.X_KEY, layer, is_count_data=is_count_data),
            CategoricalObsField(REGISTRY_KEYS.BATCH_KEY, batch_key),
            CategoricalObsField(REGISTRY_KEYS.LABELS_KEY, labels_key),
            *extra_fields,
        ]
        if spatial_key is not None:
            _check_spatial(adata, spatial_key, name="adata")
            fields.append(ObsmField(SPATIAL_KEY, spatial_key))
        cls._register_fields(adata, fields, setup_method_args, **kwargs)

    @classmethod
    def _register_fields(
        cls, adata: AnnData | MuData, fields: list, setup_method_args: dict, **kwargs
    ) -> None:
        """Register ``fields`` of ``adata`` (an AnnData or a MuData) with this model class."""
        uuid = adata.uns.get(_SCVI_UUID_KEY)
        registered = cls._setup_adata_manager_store.get(uuid) if uuid is not None else None
        if registered is not None and registered.adata is not adata:
            # a copy of a registered AnnData: give it its own id so the original stays set up
            adata.uns[_SCVI_UUID_KEY] = str(uuid4())
        manager = AnnDataManager(fields=fields, setup_method_args=setup_method_args)
        manager.register_fields(adata, **kwargs)
        cls.register_manager(manager)

    @classmethod
    def setup_mudata(
        cls,
        mdata: MuData,
        *,
        rna_layer: str | None = None,
        protein_layer: str | None = None,
        atac_layer: str | None = None,
        batch_key: str | None = None,
        labels_key: str | None = None,
        gene_key: str | None = None,
        spatial_key: str | None = None,
        modalities: dict[str, str] | None = None,
        **kwargs,
    ) -> None:
        """Set up a MuData (multi-omics) object for this model class.

        The model reads the RNA modality: its ``var`` holds the genes matched to the model's
        vocabulary and its counts (``X`` or ``layers[rna_layer]``) are tokenized, exactly as
        :meth:`setup_anndata` on that modality alone would. Protein (ADT) and chromatin (ATAC)
        counts are validated and registered when their modality is named in ``modalities``,
        for models that read them. Batch, label and spatial keys are read from the global
        ``mdata.obs`` / ``mdata.obsm`` unless ``modalities`` names a modality for them. Every
        registered modality must hold the same cells in the same order as ``mdata.obs_names``.

        Model-specific options of :meth:`setup_anndata` (e.g. scFoundation's
        ``pre_normalized`` or ``perturbation_key``, Geneformer's ``n_counts_key``) keep their
        defaults here; set ``mdata["rna"]`` up with :meth:`setup_anndata` to change them.

        Parameters
        ----------
        mdata
            MuData with an RNA modality of raw counts.
        rna_layer
            Layer of the RNA modality with the counts; ``None`` uses its ``X``.
        protein_layer
            Layer of the protein modality with the ADT counts; ``None`` uses its ``X``.
        atac_layer
            Layer of the ATAC modality with the fragment or peak counts; ``None`` uses its
            ``X``.
        batch_key
            Column of ``obs`` with each cell's batch.
        labels_key
            Column of ``obs`` with each cell's label (for fine-tuning).
        gene_key
            Column of the RNA modality's ``var`` with the gene names to match (symbols or
            Ensembl IDs); ``None`` uses its ``var_names``.
        spatial_key
            Key of ``obsm`` with each cell's 2-D or 3-D coordinates (squidpy and spatialdata
            tables use ``"spatial"``).
        modalities
            Which modality each argument refers to, e.g. ``{"rna_layer": "rna",
            "protein_layer": "prot", "batch_key": "rna"}``. The RNA modality defaults to
            ``"rna"``; proteins and ATAC are registered only when named here; other keys
            default to the global ``mdata`` attributes.
        **kwargs
            Passed to :meth:`scvi.data.AnnDataManager.register_fields`.

        Examples
        --------
        >>> import mudata as md
        >>> mdata = md.read_h5mu("pbmc_citeseq.h5mu")
        >>> cf.model.SCGPT.setup_mudata(
        ...     mdata, batch_key="batch", modalities={"rna_layer": "rna", "protein_layer": "prot"}
        ... )
        >>> model = cf.model.SCGPT(mdata, d_model=64, nhead=4, d_hid=64, nlayers=2)
        >>> cf.tl.embed(mdata, model)  # mdata.obsm["X_scgpt"]

        """
        setup_method_args = cls._get_setup_method_args(**locals())
        if not isinstance(mdata, MuData):
            hint = ""
            if isinstance(mdata, AnnData):
                hint = f" Set an AnnData up with `{cls.__name__}.setup_anndata`."
            raise TypeError(f"Expected a MuData object, got {type(mdata).__name__}.{hint}")
        mods = _resolve_modalities(mdata, modalities)
        rna = mdata.mod[mods["rna_layer"]]
        where = f"mdata.mod[{mods['rna_layer']!r}]"
        if rna_layer is not None and rna_layer not in rna.layers:
            raise KeyError(
                f"Layer {rna_layer!r} not found in {where}.layers (available: "
                f"{list(rna.layers)}). Pass `rna_layer=None` to use {where}.X."
            )
        if gene_key is not None and gene_key not in rna.var:
            raise KeyError(
                f"Column {gene_key!r} not found in {where}.var (available: {list(rna.var)})."
            )
        _check_genes_and_expression(rna, rna_layer, gene_key, True, name=where)
        fields = [
            MuDataLayerField(
                REGISTRY_KEYS.X_KEY,
                rna_layer,
                mod_key=mods["rna_layer"],
                is_count_data=True,
                mod_required=True,
            )
        ]
        for registry_key, arg, layer in (
            (REGISTRY_KEYS.PROTEIN_EXP_KEY, "protein_layer", protein_layer),
            (REGISTRY_KEYS.ATAC_X_KEY, "atac_layer", atac_layer),
        ):
            if mods.get(arg) is None:
                if layer is not None:
                    raise ValueError(
                        f"{arg}={layer!r} needs its modality: pass "
                        f"`modalities={{..., {arg!r}: <modality name>}}`."
                    )
                continue
            bdata, where = mdata.mod[mods[arg]], f"mdata.mod[{mods[arg]!r}]"
            if layer is not None and layer not in bdata.layers:
                raise KeyError(
                    f"Layer {layer!r} not found in {where}.layers (available: "
                    f"{list(bdata.layers)})."
                )
            X = bdata.X if layer is None else bdata.layers[layer]
            where = where if layer is None else f"{where}.layers[{layer!r}]"
            check_expression(X, name=where, require_integer=True)
            fields.append(
                MuDataLayerField(
                    registry_key, layer, mod_key=mods[arg], is_count_data=True, mod_required=True
                )
            )
        for registry_key, arg, key in (
            (REGISTRY_KEYS.BATCH_KEY, "batch_key", batch_key),
            (REGISTRY_KEYS.LABELS_KEY, "labels_key", labels_key),
        ):
            obs, where = _modality(mdata, mods.get(arg))
            if key is not None and key not in obs.obs:
                raise KeyError(
                    f"Column {key!r} not found in {where}.obs (available: {list(obs.obs)}); name "
                    f"the modality that holds it with `modalities={{{arg!r}: ...}}`."
                )
            fields.append(MuDataCategoricalObsField(registry_key, key, mod_key=mods.get(arg)))
        if spatial_key is not None:
            owner, where = _modality(mdata, mods.get("spatial_key"))
            _check_spatial(owner, spatial_key, name=where)
            fields.append(
                MuDataObsmField(SPATIAL_KEY, spatial_key, mod_key=mods.get("spatial_key"))
            )
        cls._register_fields(mdata, fields, setup_method_args, **kwargs)

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

    # ------------------------------------------------------------------ genes
    def _rna(self, adata: AnnData | MuData) -> AnnData:
        """Return the AnnData whose columns the model reads (a MuData's RNA modality)."""
        if not isinstance(adata, MuData):
            return adata
        uuid = adata.uns.get(_SCVI_UUID_KEY)
        for store in (
            type(self)._per_instance_manager_store.get(self.id, {}),
            self._setup_adata_manager_store,
        ):
            manager = store.get(uuid)
            if manager is not None and manager.adata is adata:
                return adata.mod[manager.data_registry[REGISTRY_KEYS.X_KEY].mod_key]
        # not set up yet: the model's own RNA modality
        registry = self.registry_["field_registries"][REGISTRY_KEYS.X_KEY]["data_registry"]
        mod = registry.get("mod_key")
        if mod is None or mod not in adata.mod:
            raise KeyError(
                f"The model reads the RNA modality {mod!r}, which the MuData lacks (modalities: "
                f"{list(adata.mod)}); set it up with `{type(self).__name__}.setup_mudata(mdata, "
                "modalities={'rna_layer': ...})`."
            )
        return adata.mod[mod]

    def _gene_names(self, adata: AnnData | MuData) -> pd.Index:
        """Gene names of ``adata`` as registered (``var[gene_key]`` or ``var_names``)."""
        manager = self.get_anndata_manager(adata, required=True)
        gene_key = manager.registry["setup_args"].get("gene_key")
        rna = self._rna(adata)
        if gene_key is None:
            return pd.Index(rna.var_names.astype(str))
        return pd.Index(rna.var[gene_key].astype(str))

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
        if not isinstance(adata, AnnData | MuData):
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
        method = self.registry_["setup_method_name"]
        if own is None and isinstance(adata, MuData) != (method == "setup_mudata"):
            kind, other = ("AnnData", "setup_anndata")
            if isinstance(adata, MuData):
                kind, other = ("MuData", "setup_mudata")
            raise TypeError(
                f"The model was set up with `{method}`; set this {kind} up first with "
                f"`{type(self).__name__}.{other}(...)`."
            )
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
            logger.info("Setting up query data with the model's setup arguments.")
            getattr(type(self), method)(adata, **setup_args)
            manager = self._get_most_recent_anndata_manager(adata, required=True)
        self._register_manager_for_instance(manager)
        if own is not None:  # set up by the user, possibly before the data changed
            self._check_query_expression(adata)
        return adata

    def _check_query_expression(self, adata: AnnData) -> None:
        """Check the registered expression of a query as :meth:`setup_anndata` does."""
        if isinstance(adata, MuData):  # setup_mudata checks each modality
            return
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
            mods = args.get("modalities") or {}
            for key in ("labels_key", "batch_key"):
                if args.get(key) is None:
                    continue
                obs = adata.obs
                if isinstance(adata, MuData) and mods.get(key) in adata.mod:
                    obs = adata.mod[mods[key]].obs
                if key == "labels_key" or not self._reads_batches() or args[key] not in obs:
                    args[key] = None
        return args

    def _has_registered_genes(self, adata: AnnData) -> bool:
        """Whether ``adata`` has exactly the genes (and order) the model was registered with."""
        registered = self.get_state_registry(REGISTRY_KEYS.X_KEY).column_names
        var_names = self._rna(adata).var_names
        return len(var_names) == len(registered) and np.array_equal(
            np.asarray(var_names), np.asarray(registered)
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
        checkpoint_dir: str | os.PathLike | None = None,
        checkpoint_every_n_steps: int = 50,
        ckpt_path: str | os.PathLike | None = None,
        **kwargs,
    ):
        """Train through scvi-tools with minibatches tokenized on the fly by ``tokenize``.

        The run's seed (drawn from torch's random state, or restored from ``ckpt_path``) fixes
        the training order and every step's random draws (see
        :class:`~cellformers.train.PretrainingPlan`), so resuming from a checkpoint repeats
        the run that wrote it.
        """
        # scvi-tools leaves the module in eval mode after training; Lightning keeps that mode,
        # which would switch dropout off in a second training run
        self.module.train()
        seed = int(torch.randint(2**31 - 1, ()).item())
        datasplitter_kwargs = {
            "collate_fn": TokenizingCollator(tokenize),
            **(datasplitter_kwargs or {}),
            "seed": seed,
        }
        plan_kwargs = {
            **plan_kwargs,
            "seed": seed,
            "checkpoint_dir": checkpoint_dir,
            "checkpoint_every_n_steps": checkpoint_every_n_steps,
        }
        with warnings.catch_warnings():
            # the plan restores the position in the epoch itself (Lightning cannot tell)
            warnings.filterwarnings("ignore", message=".*your dataloader is not resumable")
            return UnsupervisedTrainingMixin.train(
                self,
                max_epochs=max_epochs,
                batch_size=batch_size,
                load_sparse_tensor=True,
                plan_kwargs=plan_kwargs,
                datasplitter_kwargs=datasplitter_kwargs,
                ckpt_path=ckpt_path,
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
        empty_cells: str = "raise",
    ) -> np.ndarray:
        """Run ``fn`` on token batches of the requested cells and gather rows in input order.

        With ``reduce=True`` the rows are summed over all cells instead (in float64), for
        per-cell outputs too large to keep (e.g. one vector per gene and cell). ``X`` replaces
        the expression of the selected cells (see :meth:`_iter_token_batches`). Cells without
        counts in the model's genes are handled as ``empty_cells`` says (see
        :meth:`_check_empty_cells`): ``"nan"`` gives them NaN rows (left out of a sum).
        """
        self._check_if_trained(warn=False)
        adata = self._validate_anndata(adata)
        batch_size = 64 if batch_size is None else int(batch_size)
        indices = _resolve_indices(indices, adata.n_obs)
        read = self._check_empty_cells(adata, indices, empty_cells, X=X)
        if not read.all():
            if not read.any():
                raise ValueError(
                    "None of the selected cells has counts in the model's genes; there is "
                    "nothing to compute."
                )
            rows = np.flatnonzero(read)
            part = self._map_cells(
                adata,
                indices[rows],
                batch_size,
                fn,
                reduce=reduce,
                X=None if X is None else X[rows],
            )
            if reduce:
                return part
            out = np.full((len(indices), *part.shape[1:]), np.nan, dtype=part.dtype)
            out[rows] = part
            return out
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

    def _empty_cell_mask(self, adata: AnnData, indices: np.ndarray, X=None) -> np.ndarray:
        """Whether each cell at ``indices`` has no count > 0 in a gene the model reads.

        ``X`` replaces the registered expression of the selected cells (one row per entry of
        ``indices``), as in :meth:`_iter_token_batches`.
        """
        read = np.flatnonzero(np.asarray(self._tokenizer(adata).gene_ids) >= 0)
        if X is None:
            X = self.get_anndata_manager(adata, required=True).get_from_registry(
                REGISTRY_KEYS.X_KEY
            )
            order = np.argsort(indices, kind="stable")  # backed files need increasing indices
        else:
            order = None
        empty = np.empty(len(indices), dtype=bool)
        for start in range(0, len(indices), _CHUNK_CELLS):
            if order is None:
                rows = np.arange(start, min(start + _CHUNK_CELLS, len(indices)))
                block = to_csr(X[start : start + len(rows)])
            else:
                rows = order[start : start + _CHUNK_CELLS]
                block = to_csr(X[indices[rows]])
            empty[rows] = (block[:, read] > 0).getnnz(axis=1) == 0
        return empty

    def _check_empty_cells(
        self,
        adata: AnnData,
        indices: np.ndarray,
        empty_cells: str = "raise",
        *,
        X=None,
        training: bool = False,
    ) -> np.ndarray:
        """Mask of the cells at ``indices`` that have counts in the model's genes.

        A cell without any count in the genes the model reads has no tokens (or only special
        ones), so it has no meaningful embedding, prediction or perturbation. With
        ``empty_cells="raise"`` such cells are an error naming them by ``obs_names``; with
        ``"nan"`` a warning names them and the caller leaves them out.
        """
        if empty_cells not in EMPTY_CELLS:
            raise ValueError(f"empty_cells must be one of {EMPTY_CELLS}, got {empty_cells!r}.")
        empty = self._empty_cell_mask(adata, indices, X)
        if not empty.any():
            return ~empty
        names = list(map(str, adata.obs_names[indices[empty][:_N_NAMED]]))
        more = ", ..." if empty.sum() > _N_NAMED else ""
        what = (
            f"{int(empty.sum()):,} cell(s) have no counts in the genes {type(self).__name__} "
            f"reads ({', '.join(names)}{more})"
        )
        if training:
            raise ValueError(
                f"{what}; the model cannot train on cells without tokens. Remove them from the "
                "AnnData (keep cells with a count in the genes matched to the model), set it up "
                "again and build the model on it."
            )
        if empty_cells == "raise":
            raise ValueError(
                f"{what}; they have no tokens to compute a result from. Pass "
                "`empty_cells='nan'` to give them NaN results, or remove them first (keep "
                "cells with a count in the genes matched to the model)."
            )
        warnings.warn(f"{what}; their results are NaN.", UserWarning, stacklevel=3)
        return ~empty

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

    # ------------------------------------------------------------------ training
    def train(
        self,
        max_epochs: int | None = None,
        *,
        mode: str = "pretrain",
        accelerator: str = "auto",
        devices: int | list[int] | str = "auto",
        train_size: float | None = None,
        validation_size: float | None = None,
        shuffle_set_split: bool = True,
        batch_size: int | None = None,
        early_stopping: bool = False,
        lr: float | None = None,
        weight_decay: float | None = None,
        warmup_ratio: float | None = None,
        freeze_layers: int | str = 0,
        class_weight: str | Mapping[str, float] | None = None,
        batch_adversarial: float = 0.0,
        checkpoint_dir: str | os.PathLike | None = None,
        checkpoint_every_n_steps: int = 50,
        ckpt_path: str | os.PathLike | None = None,
        datasplitter_kwargs: Mapping[str, Any] | None = None,
        plan_kwargs: Mapping[str, Any] | None = None,
        trainer_kwargs: Mapping[str, Any] | None = None,
        datamodule=None,
        **kwargs,
    ):
        if mode not in self._modes:
            raise ValueError(f"mode must be one of {self._modes}, got {mode!r}.")
        if datamodule is not None:
            raise NotImplementedError(
                f"{type(self).__name__}.train does not take a `datamodule` yet: its minibatches "
                "must go through the model's tokenizer. Train on the registered AnnData instead."
            )
        if max_epochs is not None:
            max_epochs = _check_int("max_epochs", max_epochs)
        batch_size = _check_int("batch_size", self._train_default("batch_size", batch_size, mode))
        if train_size is not None:
            train_size = _check_real(
                "train_size", train_size, low=0, high=1, open_low=True, open_high=False
            )
        if validation_size is not None:
            validation_size = _check_real("validation_size", validation_size, low=0, high=1)
            if (train_size or 0.9) + validation_size > 1 + 1e-9:
                given = f"{train_size}" if train_size else "0.9 by default"
                raise ValueError(
                    f"train_size ({given}) + validation_size ({validation_size}) must be at most 1."
                )
        flags = {"early_stopping": early_stopping, "shuffle_set_split": shuffle_set_split}
        for name, value in flags.items():
            if not isinstance(value, bool):
                raise TypeError(f"{name} must be True or False, got {value!r}.")
        batch_adversarial = _check_real("batch_adversarial", batch_adversarial, low=0)
        checkpoint_every_n_steps = _check_int("checkpoint_every_n_steps", checkpoint_every_n_steps)
        ckpt_path = self._resolve_ckpt_path(ckpt_path, checkpoint_dir)
        datasplitter_kwargs = _check_mapping("datasplitter_kwargs", datasplitter_kwargs)
        plan_kwargs = {
            "lr": self._train_default("lr", lr, mode),
            "weight_decay": self._train_default("weight_decay", weight_decay, mode),
            "warmup_ratio": self._train_default("warmup_ratio", warmup_ratio, mode),
            **_check_mapping("plan_kwargs", plan_kwargs),
        }
        plan_kwargs["lr"] = _check_real("lr", plan_kwargs["lr"], low=0, open_low=True)
        plan_kwargs["weight_decay"] = _check_real(
            "weight_decay", plan_kwargs["weight_decay"], low=0
        )
        plan_kwargs["warmup_ratio"] = _check_real(
            "warmup_ratio", plan_kwargs["warmup_ratio"], low=0, high=1
        )
        trainer_kwargs = _check_mapping("trainer_kwargs", trainer_kwargs)
        both = sorted(set(trainer_kwargs) & set(kwargs))
        if both:
            raise ValueError(f"{both} given both in trainer_kwargs and as keyword arguments.")
        own = sorted(
            set(trainer_kwargs)
            & {*inspect.signature(FoundationModelBase.train).parameters, "load_sparse_tensor"}
        )
        if own:
            raise ValueError(f"{own} are not Trainer arguments: pass them to train() itself.")
        return self._train(
            mode=mode,
            freeze_layers=freeze_layers,
            class_weight=class_weight,
            batch_adversarial=batch_adversarial,
            max_epochs=max_epochs,
            batch_size=batch_size,
            plan_kwargs=plan_kwargs,
            datasplitter_kwargs=datasplitter_kwargs,
            accelerator=accelerator,
            devices=devices,
            train_size=train_size,
            validation_size=validation_size,
            shuffle_set_split=shuffle_set_split,
            early_stopping=early_stopping,
            checkpoint_dir=checkpoint_dir,
            checkpoint_every_n_steps=checkpoint_every_n_steps,
            ckpt_path=ckpt_path,
            **trainer_kwargs,
            **kwargs,
        )

    def __init_subclass__(cls, **kwargs) -> None:
        """Give each model class a :meth:`train` whose docstring tells its own recipe."""
        super().__init_subclass__(**kwargs)
        if "train" in cls.__dict__:
            return

        @functools.wraps(FoundationModelBase.train)
        def train(self, *args, **kw):
            return FoundationModelBase.train(self, *args, **kw)

        train.__doc__ = cls._train_docstring()
        train.__qualname__ = f"{cls.__qualname__}.train"
        cls.train = train

    @classmethod
    def _train_docstring(cls) -> str:
        """Fill the shared :meth:`train` docstring in with the class's recipe and defaults."""

        def show(value) -> str:
            if isinstance(value, Mapping):
                return ", ".join(f"``{v!r}`` ({m})" for m, v in value.items())
            return f"``{value!r}``"

        defaults = "; ".join(f"``{k}``: {show(v)}" for k, v in cls._train_defaults.items())
        notes = textwrap.dedent(cls._train_notes).strip()
        notes = f"{notes}\n\nDefaults of this class: {defaults}.".strip()
        return _TRAIN_DOC.format(
            summary=cls._train_summary,
            notes=notes,
            modes=", ".join(f"``{m!r}``" for m in cls._modes),
            official=cls._train_official_freeze,
            extra=cls._train_extra_kwargs,
        )

    def _train_default(self, name: str, value, mode: str):
        """``value``, or the class's default of ``train(name=...)`` for ``mode``."""
        if value is not None:
            return value
        default = self._train_defaults[name]
        return default[mode] if isinstance(default, Mapping) else default

    @staticmethod
    def _resolve_ckpt_path(
        ckpt_path: str | os.PathLike | None, checkpoint_dir: str | os.PathLike | None
    ) -> str | None:
        """Return the checkpoint file to resume from, or `None` to start afresh."""
        if checkpoint_dir is not None:
            if not isinstance(checkpoint_dir, str | os.PathLike):
                raise TypeError(f"checkpoint_dir must be a folder path, got {checkpoint_dir!r}.")
            if Path(checkpoint_dir).exists() and not Path(checkpoint_dir).is_dir():
                raise ValueError(f"checkpoint_dir {str(checkpoint_dir)!r} is not a folder.")
        if ckpt_path is None:
            return None
        if ckpt_path == "last":
            if checkpoint_dir is None:
                raise ValueError(
                    'ckpt_path="last" resumes from the checkpoints of `checkpoint_dir`: pass the '
                    "folder given to the run that wrote them."
                )
            ckpt_path = Path(checkpoint_dir) / LAST_CHECKPOINT
            if not ckpt_path.is_file():
                logger.info("No checkpoint in %s yet; training starts afresh.", checkpoint_dir)
                return None
        elif not isinstance(ckpt_path, str | os.PathLike):
            raise TypeError(f'ckpt_path must be None, "last" or a file path, got {ckpt_path!r}.')
        if not Path(ckpt_path).is_file():
            raise FileNotFoundError(f"ckpt_path {str(ckpt_path)!r} is not a checkpoint file.")
        try:  # memory-mapped: reads little; nothing in the file may run code
            torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as error:
            raise ValueError(
                f"{str(ckpt_path)!r} is not a checkpoint that loads safely with "
                f"torch.load(weights_only=True): {error}"
            ) from error
        return str(ckpt_path)

    def _train(self, *, mode: str, **kwargs):
        """Run :meth:`train` with checked arguments (hook for class-specific checks)."""
        return self._run_training(mode=mode, **kwargs)

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
        self._check_empty_cells(self.adata, np.arange(self.adata.n_obs), training=True)
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
            self._warn_chance_f1()
        return result

    def _warn_chance_f1(self) -> None:
        """Warn when fine-tuning ended with a macro-F1 at chance (1 / classes).

        Reads the last validation macro-F1, or the training one when no validation ran.
        """
        history = getattr(self, "history_", None) or {}
        split = next((s for s in ("validation", "train") if f"macro_f1_{s}" in history), None)
        if split is None:
            return
        scores = np.asarray(history[f"macro_f1_{split}"], dtype=float).reshape(-1)
        n_classes = len(self._label_names())
        if scores.size and n_classes > 1 and scores[-1] <= 1.0 / n_classes:
            warnings.warn(
                f"Fine-tuning ended with a {split} macro-F1 of {scores[-1]:.3f}, no better than "
                f"chance for {n_classes} classes (1/{n_classes}): the head has not learned the "
                "labels yet. Train for more epochs or change the learning rate.",
                UserWarning,
                stacklevel=4,
            )

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
        *,
        empty_cells: Literal["raise", "nan"] = "raise",
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
        empty_cells
            What to do with cells that have no counts in the model's genes (they have no
            tokens): ``"raise"`` (default) an error naming them; ``"nan"`` a warning naming
            them, and NaN probabilities and labels for them.

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
            empty_cells=empty_cells,
        )
        labels = self._label_names() if self._has_labels() else np.arange(n_labels).astype(str)
        read = ~np.isnan(probs).any(1)
        _warn_single_class(probs[read].argmax(1), labels)
        if soft:
            return pd.DataFrame(probs, index=adata.obs_names[indices], columns=labels)
        predicted = labels[probs.argmax(1)]
        if unknown_threshold is not None or not read.all():
            predicted = predicted.astype(object)
        if unknown_threshold is not None:
            predicted[probs.max(1) < float(unknown_threshold)] = self._unknown_label
        predicted[~read] = np.nan
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
        empty_cells: Literal["raise", "nan"] = "raise",
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
        empty_cells
            What to do with cells that have no counts in the model's genes: ``"raise"``
            (default) an error naming them; ``"nan"`` a warning naming them, and NaN shifts
            (never "changed") for them. A cell that a perturbation leaves without counts in the
            model's genes (e.g. deleting all it expresses) gets a NaN shift for it, left out of
            the means.

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
        cells = _resolve_indices(indices, adata.n_obs)
        self._check_cells(adata, cells)
        read = self._check_empty_cells(adata, cells, empty_cells)
        idx = cells[read]
        names, columns = self._perturbation_columns(adata, genes)
        manager = self.get_anndata_manager(adata, required=True)
        X = to_csr(manager.get_from_registry(REGISTRY_KEYS.X_KEY)[np.sort(idx)])
        X = X[np.argsort(np.argsort(idx, kind="stable"), kind="stable")]  # back to idx order
        expression = self._perturbation_expression(adata)

        def run(X_cells, empty="raise"):
            with warnings.catch_warnings():  # cells emptied by a perturbation get NaN rows
                warnings.simplefilter("ignore", UserWarning)
                emb = self._map_cells(
                    adata,
                    idx,
                    batch_size,
                    self._perturbation_embedding,
                    X=X_cells,
                    empty_cells=empty,
                )
                if expression is None:
                    return emb, None
                fn, _ = expression
                return emb, self._map_cells(
                    adata, idx, batch_size, fn, X=X_cells, empty_cells=empty
                )

        base_emb, base_expr = run(X)
        shift = np.zeros((len(idx), len(names)), dtype=np.float32)
        changed = np.zeros((len(idx), len(names)), dtype=bool)
        change = None if expression is None else np.zeros((len(names), base_expr.shape[1]))
        for j, cols in enumerate(columns):
            Xp, changed[:, j] = perturb_counts(X, cols, mode, factor)
            if not changed[:, j].any():
                continue
            emb, expr = run(Xp, "nan")
            cos = F.cosine_similarity(torch.as_tensor(emb), torch.as_tensor(base_emb), dim=-1)
            shift[:, j] = np.where(changed[:, j], 1.0 - cos.numpy(), 0.0)
            if expression is not None:
                expr = np.where(changed[:, j, None], expr, base_expr)
                if mode == "delete":  # a deleted gene is not expressed in the changed cells
                    own = np.isin(expression[1], np.asarray(self._rna(adata).var_names)[cols])
                    expr[np.ix_(changed[:, j], own)] = 0.0
                diff = expr - base_expr  # NaN where a model predicts no value for a gene
                seen = np.isfinite(diff)
                change[j] = np.where(seen, diff, 0.0).sum(0) / np.maximum(seen.sum(0), 1)
        scored = changed & np.isfinite(shift)
        var = pd.DataFrame(
            {
                "n_cells_changed": changed.sum(0),
                "mean_shift": np.where(
                    scored.any(0),
                    np.where(scored, shift, 0.0).sum(0) / np.maximum(scored.sum(0), 1),
                    0.0,
                ),
            },
            index=pd.Index(names, name="perturbation"),
        )
        if not read.all():  # cells without counts: NaN shifts, never changed
            shift_all = np.full((len(cells), len(names)), np.nan, dtype=np.float32)
            changed_all = np.zeros((len(cells), len(names)), dtype=bool)
            shift_all[read], changed_all[read] = shift, changed
            shift, changed = shift_all, changed_all
        out = AnnData(
            X=shift,
            obs=pd.DataFrame(index=adata.obs_names[cells].copy()),
            var=var,
            layers={"changed": changed},
            uns={"perturb": {"mode": mode, "factor": factor, "model": type(self).__name__}},
        )
        if expression is not None:
            out.varm["expression_change"] = pd.DataFrame(
                change.astype(np.float32), index=out.var_names, columns=list(expression[1])
            )
        return out

    # ------------------------------------------------------------------ saving and loading
    def save(
        self,
        dir_path: str | os.PathLike,
        prefix: str | None = None,
        overwrite: bool = False,
        save_anndata: bool = False,
        **anndata_write_kwargs,
    ) -> None:
        """Save the model into a folder, without pickle and all at once.

        Writes ``model.safetensors`` (the network's weights) and ``model.json`` (the gene names,
        the constructor arguments, the AnnData registry, the LoRA configuration and the other
        saved attributes, as JSON), plus ``adata.h5ad`` with ``save_anndata``. The files are
        written into a temporary folder next to ``dir_path`` that then replaces it, so a save
        that is interrupted leaves the previous save (or none) intact; a second process saving
        to the same folder at the same time gets an error. :meth:`load` reads the folder back
        without running any code stored in it.

        Parameters
        ----------
        dir_path
            Folder to write.
        prefix
            Prefix of the file names.
        overwrite
            Replace an existing folder (as a whole: files of other names in it are removed);
            otherwise an existing ``dir_path`` is an error.
        save_anndata
            Also save the AnnData the model was set up with.
        anndata_write_kwargs
            Passed to :meth:`anndata.AnnData.write_h5ad` (or MuData's ``write``).

        """
        state = self.module.state_dict()
        attrs = {name: value for name, value in self._get_user_attributes() if name[-1] == "_"}
        names = _saved_file_names(prefix)
        with atomic_write(dir_path, overwrite=overwrite) as tmp:
            if save_anndata:
                name = names["adata"] if isinstance(self.adata, AnnData) else names["mdata"]
                if isinstance(self.adata, AnnData):  # else anndata categorises strings in place
                    anndata_write_kwargs.setdefault("convert_strings_to_categoricals", False)
                self.adata.write(tmp / name, **anndata_write_kwargs)
            _write_saved_model(tmp, names, type(self), state, self.get_var_names(), attrs)

    @classmethod
    def load(
        cls,
        dir_path: str | os.PathLike,
        adata: AnnData | None = None,
        accelerator: str = "auto",
        device: int | str = "auto",
        prefix: str | None = None,
        backup_url: str | None = None,
    ):
        """Load a model saved with :meth:`save`.

        Only data is read (JSON and safetensors), so a folder cannot make this run code. Every
        file and field is checked; a damaged or foreign folder is an error that names the file.
        Folders written by older versions with scvi-tools' pickled ``model.pt`` are refused;
        :meth:`convert_legacy_save` converts a trusted one once.

        Parameters
        ----------
        dir_path
            Folder written by :meth:`save`.
        adata
            AnnData set up like the training data (its setup is redone from the saved
            registry). `None` loads the AnnData saved with the model, if any.
        accelerator
            Lightning accelerator (``"auto"``, ``"cpu"``, ``"gpu"``, ...).
        device
            Device index or ``"auto"``.
        prefix
            Prefix of the file names.
        backup_url
            Not supported (the saved model is more than one file); pass `None`.

        Returns
        -------
        The model, in evaluation mode.

        """
        from scvi.data._constants import _MODEL_NAME_KEY, _SETUP_ARGS_KEY, _SETUP_METHOD_NAME
        from scvi.model._utils import parse_device_args
        from scvi.model.base._save_load import _initialize_model, _validate_var_names

        _, _, device = parse_device_args(
            accelerator=accelerator, devices=device, return_device="torch",
            validate_single_device=True,
        )  # fmt: skip
        if backup_url is not None:
            raise ValueError("backup_url is not supported; download the saved folder first.")
        folder = Path(dir_path)
        names = _saved_file_names(prefix)
        var_names, attr_dict = cls._read_saved_meta(folder, names)
        meta_file, weights_file = folder / names["meta"], folder / names["weights"]
        model_name = attr_dict["registry_"].get(_MODEL_NAME_KEY, cls.__name__)
        if model_name != cls.__name__:
            raise ValueError(f"{meta_file} holds a {model_name} model, not a {cls.__name__}.")
        registry = attr_dict.pop("registry_")
        state = read_safetensors(weights_file)
        if adata is None:
            adata = _read_saved_adata(folder, names, registry)
        if adata:
            if _SETUP_ARGS_KEY not in registry:
                raise ValueError(f"{meta_file}: the registry lacks the setup arguments.")
            _validate_var_names(adata, var_names)
            method_name = registry.get(_SETUP_METHOD_NAME, "setup_anndata")
            getattr(cls, method_name)(adata, source_registry=registry, **registry[_SETUP_ARGS_KEY])
        model = _initialize_model(cls, adata, registry, attr_dict, None)
        model.module.on_load(model, pyro_param_store=None)
        check_weights(state, model.module.state_dict(), source=weights_file)
        try:
            model.module.load_state_dict(state)
        except RuntimeError as e:
            raise ValueError(
                f"The weights in {weights_file} do not fit the network described in {meta_file} "
                f"(the two files come from different saves): {e}"
            ) from e
        model.to_device(device)
        model.module.eval()
        if adata:
            model._validate_anndata(adata)
        return model

    @classmethod
    def _read_saved_meta(cls, folder: Path, names: dict[str, str]) -> tuple:
        """Gene names and attributes saved in ``model.json`` (refusing pickled saves)."""
        recover_folder(folder)
        meta_file = folder / names["meta"]
        if not meta_file.is_file() and (folder / names["legacy"]).is_file():
            raise ValueError(
                f"{folder / names['legacy']} is a model saved in the pickle format of older "
                "versions; loading it could run code stored in the file, so it is refused. If you "
                f"trust where it comes from, convert it once with {cls.__name__}."
                "convert_legacy_save(dir_path, output_dir_path, trust_pickle=True) and load the "
                "new folder."
            )
        meta = _check_saved_meta(read_json(meta_file, what="saved model file"), meta_file, cls)
        var_names = decode_json_value(meta["var_names"], where=f"{meta_file}: var_names")
        attr_dict = decode_json_value(meta["attr_dict"], where=f"{meta_file}: attr_dict")
        return var_names, attr_dict

    @classmethod
    def load_registry(cls, dir_path: str | os.PathLike, prefix: str | None = None) -> dict:
        """Return the AnnData registry saved with a model (read safely, as :meth:`load` does).

        Parameters
        ----------
        dir_path
            Folder written by :meth:`save`.
        prefix
            Prefix of the file names.

        Returns
        -------
        The registry.

        """
        return cls._read_saved_meta(Path(dir_path), _saved_file_names(prefix))[1]["registry_"]

    @classmethod
    def view_setup_args(cls, dir_path: str | os.PathLike, prefix: str | None = None) -> None:
        """Print the arguments a saved model's AnnData was set up with.

        Parameters
        ----------
        dir_path
            Folder written by :meth:`save`.
        prefix
            Prefix of the file names.

        """
        AnnDataManager.view_setup_method_args(cls.load_registry(dir_path, prefix))

    @classmethod
    def convert_legacy_save(
        cls,
        dir_path: str | os.PathLike,
        output_dir_path: str | os.PathLike,
        overwrite: bool = False,
        prefix: str | None = None,
        *,
        trust_pickle: bool = False,
    ) -> None:
        """Convert a model saved by an older version (pickled ``model.pt``) to the safe format.

        Reading the old file unpickles it, which runs whatever code it holds: scvi-tools saves
        containers (``defaultdict``) that ``torch.load(weights_only=True)`` cannot read, so there
        is no safe way to read these files. Convert only saves you made yourself or otherwise
        trust, once, by passing ``trust_pickle=True``; :meth:`load` then reads the new folder
        safely. A saved AnnData is copied.

        Parameters
        ----------
        dir_path
            Folder with the old ``model.pt``.
        output_dir_path
            Folder to write in the format of :meth:`save`.
        overwrite
            Replace an existing ``output_dir_path``.
        prefix
            Prefix of the file names (read and written).
        trust_pickle
            Confirm that ``dir_path`` comes from a trusted source (required).

        """
        from scvi.model.base._constants import SAVE_KEYS

        names = _saved_file_names(prefix)
        old = Path(dir_path) / names["legacy"]
        if not old.is_file():
            raise FileNotFoundError(f"{old} does not exist; pass the folder of an old save.")
        if not trust_pickle:
            raise ValueError(
                f"Reading {old} runs the code pickled into it. Pass trust_pickle=True only if "
                "you made this file yourself or trust its source."
            )
        saved = torch.load(old, map_location="cpu", weights_only=False)
        keys = (SAVE_KEYS.MODEL_STATE_DICT_KEY, SAVE_KEYS.VAR_NAMES_KEY, SAVE_KEYS.ATTR_DICT_KEY)
        if not isinstance(saved, dict) or any(k not in saved for k in keys):
            raise ValueError(f"{old} is not a saved scvi-tools model (it lacks {list(keys)}).")
        state = dict(saved[keys[0]])
        state.pop("pyro_param_store", None)
        with atomic_write(output_dir_path, overwrite=overwrite) as tmp:
            for name in (names["adata"], names["mdata"]):
                if (Path(dir_path) / name).is_file():
                    shutil.copyfile(Path(dir_path) / name, tmp / name)
            _write_saved_model(tmp, names, cls, state, saved[keys[1]], saved[keys[2]])


_SAVE_FORMAT = "cellformers-model"
_SAVE_FORMAT_VERSION = 1


def _write_saved_model(
    folder: Path, names: dict[str, str], cls: type, state: dict, var_names, attrs: dict
) -> None:
    """Write the weights (safetensors) and everything else (JSON) of a saved model."""
    from safetensors.torch import save_file

    not_tensors = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise TypeError(f"The network's state holds non-tensor entries {not_tensors[:3]}.")
    meta = {
        "format": _SAVE_FORMAT,
        "format_version": _SAVE_FORMAT_VERSION,
        "model_class": cls.__name__,
        "var_names": encode_json_value(var_names, where="var_names"),
        "attr_dict": encode_json_value(attrs, where="model attribute"),
    }
    # clone: safetensors refuses tensors that share memory (tied weights)
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}
    save_file(tensors, folder / names["weights"], metadata={"format": "pt"})
    (folder / names["meta"]).write_text(json.dumps(meta), encoding="utf-8")


def _saved_file_names(prefix: str | None) -> dict[str, str]:
    """File names of a saved model (with ``prefix``)."""
    from scvi.model.base._constants import SAVE_KEYS

    prefix = prefix or ""
    if os.sep in prefix or "/" in prefix:
        raise ValueError(f"prefix {prefix!r} must not contain a path separator.")
    return {
        "meta": f"{prefix}model.json",
        "weights": f"{prefix}model.safetensors",
        "legacy": f"{prefix}{SAVE_KEYS.MODEL_FNAME}",
        "adata": f"{prefix}{SAVE_KEYS.ADATA_FNAME}",
        "mdata": f"{prefix}{SAVE_KEYS.MDATA_FNAME}",
    }


def _check_saved_meta(meta, path: Path, cls: type) -> dict:
    """Check the fields of a saved ``model.json``."""
    check_format(meta, path, name=_SAVE_FORMAT, version=_SAVE_FORMAT_VERSION)
    if meta.get("model_class") != cls.__name__:
        raise ValueError(f"{path} holds a {meta.get('model_class')} model, not a {cls.__name__}.")
    attrs = meta.get("attr_dict")
    for field in ("registry_", "init_params_"):
        if not isinstance(attrs, dict) or not isinstance(attrs.get(field), dict):
            raise ValueError(f"{path}: field attr_dict.{field} is missing or not an object.")
    if "var_names" not in meta:
        raise ValueError(f"{path}: field var_names is missing.")
    # load() sets every saved attribute on the model: only public ``name_`` attributes
    odd = [k for k in attrs if not (k.endswith("_") and k[0].isalpha() and k.isidentifier())]
    if odd:
        raise ValueError(f"{path}: attr_dict holds fields that are not model attributes: {odd}.")
    for group in ("non_kwargs", "kwargs"):
        if not isinstance(attrs["init_params_"].get(group, {}), dict):
            raise ValueError(f"{path}: field attr_dict.init_params_.{group} is not an object.")
    return meta


def _read_saved_adata(folder: Path, names: dict[str, str], registry: dict):
    """Read the AnnData (or MuData) saved with a model; `False` when there is none."""
    from scvi.data._constants import _SETUP_METHOD_NAME

    is_mudata = registry.get(_SETUP_METHOD_NAME) == "setup_mudata"
    path = folder / names["mdata" if is_mudata else "adata"]
    if not path.is_file():
        warnings.warn(
            "Save path contains no saved anndata and no adata was passed. Model will be loaded "
            "without anndata.",
            UserWarning,
            stacklevel=3,
        )
        return False
    try:
        if is_mudata:
            import mudata

            return mudata.read_h5mu(path)
        return anndata.read_h5ad(path)
    except Exception as e:
        raise ValueError(f"Could not read the saved data {path}: {e}") from e


FoundationModelBase.train.__doc__ = FoundationModelBase._train_docstring()
