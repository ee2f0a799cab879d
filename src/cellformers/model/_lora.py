"""Parameter-efficient fine-tuning with low-rank adapters (LoRA), shared by every model class."""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from importlib.metadata import version
from pathlib import Path

import torch

from .._io import (
    atomic_write,
    check_config_fields,
    check_format,
    check_weights,
    read_json,
    read_safetensors,
    recover_folder,
)
from ..nn import (
    LORA_TARGETS,
    add_lora,
    find_lora_targets,
    lora_adapters,
    lora_state_dict,
    merge_lora,
    remove_lora,
)

logger = logging.getLogger(__name__)

_FORMAT = "cellformers-lora"
_FORMAT_VERSION = 1
_CONFIG_FILE = "lora_config.json"
_WEIGHTS_FILE = "lora_weights.safetensors"


def _numel(params) -> int:
    return sum(p.numel() for p in params)


class LoRAMixin:
    """Low-rank adapters (LoRA) on the attention projections of a model's network.

    :meth:`add_lora` attaches to every attention layer (softmax attention in scGPT, Geneformer
    and scFoundation's encoder; Performer attention in scBERT and scFoundation's decoder) a
    trainable update ``(alpha / rank) * B @ A`` of the query/key/value and/or output projection
    weights. While adapters are on, ``train(mode="finetune")`` updates only the adapters and
    the classification head, and ``train(mode="pretrain")`` only the adapters; every other
    weight stays bit-identical. The adapters (with the head) are small enough to keep one set
    per task next to one copy of the pretrained weights (:meth:`save_lora` /
    :meth:`load_lora`), or can be folded into the weights (:meth:`merge_lora`), which gives
    back the official state-dict layout.

    :meth:`save` / :meth:`load` keep adapters: the configuration is stored in ``lora_`` and the
    adapter weights in the module's state dict.
    """

    # ------------------------------------------------------------------ state
    @property
    def lora_(self) -> dict | None:
        """LoRA configuration of the attached adapters, or `None` when there are none.

        A dict with ``rank``, ``alpha``, ``dropout`` and ``targets``. Setting it (as
        :meth:`load` does) replaces the adapters with fresh ones of that configuration.
        """
        module = getattr(self, "module", None)
        adapters = list(lora_adapters(module).values()) if module is not None else []
        if not adapters:
            return None
        first = adapters[0]
        present = {a.target for a in adapters}
        return {
            "rank": first.rank,
            "alpha": first.alpha,
            "dropout": first.dropout,
            "targets": tuple(t for t in LORA_TARGETS if t in present),
        }

    @lora_.setter
    def lora_(self, config: dict | None) -> None:
        if config == self.lora_:
            return
        remove_lora(self.module)
        if config is not None:
            add_lora(self.module, **config)

    def _lora_parameter_counts(self) -> tuple[int, int, int]:
        """Parameters of the adapters, of the classification head and of the rest."""
        adapters = {id(p): p for a in lora_adapters(self.module).values() for p in a.parameters()}
        head = {}
        if getattr(self.module, "n_labels", 0):
            head = {id(p): p for m in self._head_modules() for p in m.parameters()}
        rest = [p for p in self.module.parameters() if id(p) not in adapters and id(p) not in head]
        return _numel(adapters.values()), _numel(head.values()), _numel(rest)

    # ------------------------------------------------------------------ adding and removing
    def add_lora(
        self,
        rank: int = 8,
        *,
        alpha: float = 16.0,
        dropout: float = 0.0,
        targets: str | Sequence[str] = LORA_TARGETS,
    ) -> None:
        """Attach low-rank adapters to the attention projections (parameter-efficient training).

        Every selected projection weight ``W`` becomes ``W + (alpha / rank) * B @ A`` with a
        new ``A`` ``[rank, in]`` and ``B`` ``[out, rank]``; ``B`` starts at zero, so the
        weights the model computes with do not change until :meth:`train` runs. From then on
        training (both modes) updates only the adapters and, in fine-tuning, the classification
        head (also one that :meth:`train` still has to build); all other weights keep their
        values. The number of trainable parameters is logged.

        Parameters
        ----------
        rank
            Rank of the updates (LoRA's ``r``).
        alpha
            The updates are scaled by ``alpha / rank`` (LoRA's ``lora_alpha``).
        dropout
            Dropout on the adapters' input features in training. The update is applied to
            the weight, so one dropout mask is drawn per forward pass and shared by all tokens.
        targets
            ``"qkv"`` (query, key and value projections; the packed ``in_proj_weight`` of
            softmax attention, ``to_q``/``to_k``/``to_v`` of Performer attention), ``"out"``
            (attention output projections), or both.

        """
        if self.lora_ is not None:
            raise ValueError(
                f"The model already has LoRA adapters ({self.lora_}); call merge_lora() to fold "
                "them into the weights or remove_lora() to drop them first."
            )
        names = add_lora(self.module, rank=rank, alpha=alpha, dropout=dropout, targets=targets)
        n_adapters, n_head, n_rest = self._lora_parameter_counts()
        total = n_adapters + n_head + n_rest
        trainable = n_adapters + n_head
        logger.info(
            "Added LoRA adapters (rank %d, alpha %g) to %d attention weights: %s adapter "
            "parameters%s; training updates %s of %s parameters (%.2f %%).",
            rank,
            alpha,
            len(names),
            f"{n_adapters:,}",
            f" + {n_head:,} in the classification head" if n_head else "",
            f"{trainable:,}",
            f"{total:,}",
            100.0 * trainable / total,
        )

    def remove_lora(self) -> None:
        """Drop the adapters; the base weights are as before :meth:`add_lora`."""
        if not remove_lora(self.module):
            raise ValueError("The model has no LoRA adapters to remove.")

    def merge_lora(self) -> None:
        """Fold the adapters into the attention weights and remove them.

        Each adapted weight becomes ``W + (alpha / rank) * B @ A``, the weight the forward pass
        used, so outputs stay the same, and the module's state dict has the official key
        layout again (e.g. to export the weights or to fine-tune all of them).
        """
        merged = merge_lora(self.module)
        if not merged:
            raise ValueError("The model has no LoRA adapters to merge.")
        logger.info("Merged LoRA adapters into %d attention weights.", len(merged))

    # ------------------------------------------------------------------ training hooks
    @contextmanager
    def _lora_set_aside(self) -> Iterator[None]:
        """Take the adapters off ``self.module`` for the block and put them back afterwards.

        For code that rebuilds the module from its state dict (e.g. to add a classification
        head): the official-layout loaders do not know the adapter keys. The adapters return,
        with their weights, onto whatever ``self.module`` is at the end of the block.
        """
        config = self.lora_
        if config is None:
            yield
            return
        state = lora_state_dict(self.module)
        remove_lora(self.module)
        try:
            yield
        finally:
            add_lora(self.module, **config)
            self._load_lora_tensors(state)

    def _lora_frozen_parameters(
        self, frozen: Sequence[torch.nn.Parameter], *, finetune: bool
    ) -> list[torch.nn.Parameter]:
        """Parameters to hold fixed, besides ``frozen``, for a training run with adapters.

        Everything that still requires gradients except the adapters and (when ``finetune``)
        the classification head; nothing without adapters.
        """
        adapters = lora_adapters(self.module)
        if not adapters:
            return []
        keep = {id(p) for a in adapters.values() for p in a.parameters()}
        if finetune:
            keep |= {id(p) for m in self._head_modules() for p in m.parameters()}
        keep |= {id(p) for p in frozen}
        extra = [p for p in self.module.parameters() if p.requires_grad and id(p) not in keep]
        held = {id(p) for p in frozen} | {id(p) for p in extra}
        n_train = sum(p.numel() for p in self.module.parameters() if id(p) not in held)
        n_total = sum(p.numel() for p in self.module.parameters())
        logger.info(
            "LoRA: training %s of %s parameters (adapters%s).",
            f"{n_train:,}",
            f"{n_total:,}",
            " and classification head" if finetune else "",
        )
        return extra

    # ------------------------------------------------------------------ files
    def _lora_head_state(self) -> dict[str, torch.Tensor]:
        """State-dict entries of the classification head (empty without one)."""
        if not getattr(self.module, "n_labels", 0):
            return {}
        names = {id(m): n for n, m in self.module.named_modules()}
        prefixes = tuple(f"{names[id(m)]}." for m in self._head_modules())
        return {k: v for k, v in self.module.state_dict().items() if k.startswith(prefixes)}

    def _lora_fingerprint(self, weights: Sequence[str]) -> str:
        """sha256 of the base weights that carry adapters (to recognise the same base model)."""
        params = dict(self.module.named_parameters())
        digest = hashlib.sha256()
        for name in weights:
            tensor = params[name].detach().to("cpu", torch.float32).contiguous()
            digest.update(name.encode())
            digest.update(tensor.numpy().tobytes())
        return digest.hexdigest()

    def save_lora(self, dir_path: str | os.PathLike, *, overwrite: bool = False) -> None:
        """Save only the adapters (and the classification head, if there is one).

        Writes ``lora_weights.safetensors`` (the adapter matrices and the head's state) and
        ``lora_config.json`` (the LoRA configuration, the model class, the adapted weights with
        their shapes, a fingerprint of the base weights and the head's labels) into
        ``dir_path``: a few hundred kilobytes to a few megabytes, against hundreds for the
        whole model. :meth:`load_lora` puts them onto a model with the same base weights. The
        folder is written next to ``dir_path`` and then takes its place as a whole, so an
        interrupted save leaves the previous one intact.

        Parameters
        ----------
        dir_path
            Folder to write (created if needed).
        overwrite
            Replace an existing folder (as a whole); otherwise it is an error.

        """
        from safetensors.torch import save_file

        config = self.lora_
        if config is None:
            raise ValueError("The model has no LoRA adapters to save; call add_lora() first.")
        weights = {k: list(v) for k, v in find_lora_targets(self.module, config["targets"]).items()}
        head = self._lora_head_state()
        tensors = {**lora_state_dict(self.module), **head}
        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        head_info = None
        if head:
            labels = self._label_names().tolist() if self._has_labels() else None
            head_info = {
                "n_labels": int(self.module.n_labels),
                "labels": None if labels is None else [str(x) for x in labels],
                "keys": sorted(head),
                "finetuned": bool(self.finetuned_),
            }
        meta = {
            "format": _FORMAT,
            "format_version": _FORMAT_VERSION,
            "model_class": type(self).__name__,
            "cellformers_version": version("cellformers"),
            **{k: (list(v) if k == "targets" else v) for k, v in config.items()},
            "adapted_weights": weights,
            "base_weights_sha256": self._lora_fingerprint(list(weights)),
            "head": head_info,
        }
        with atomic_write(dir_path, overwrite=overwrite) as tmp:
            save_file(tensors, tmp / _WEIGHTS_FILE)
            (tmp / _CONFIG_FILE).write_text(json.dumps(meta, indent=1), encoding="utf-8")

    def load_lora(self, dir_path: str | os.PathLike) -> None:
        """Load adapters (and a classification head) written by :meth:`save_lora`.

        The model must have the architecture the adapters were trained on (same class, same
        attention layers and shapes), which is checked first; it should also have the same base
        weights (a warning says when the adapted weights differ). Adapters already on the model
        are replaced. A saved head is loaded too; a model without a head gets one first, for
        the registered labels, which must be the saved ones in the same order. Both files are
        read and checked before the model changes; a load that fails leaves it as it was.

        Parameters
        ----------
        dir_path
            Folder written by :meth:`save_lora`.

        """
        path = Path(dir_path)
        recover_folder(path)
        files = [path / _CONFIG_FILE, path / _WEIGHTS_FILE]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(
                f"{path} lacks {', '.join(missing)}; pass a folder written by save_lora()."
            )
        meta = _check_lora_meta(read_json(files[0], what="LoRA configuration"), files[0])
        if meta["model_class"] != type(self).__name__:
            raise ValueError(
                f"The adapters were saved from a {meta['model_class']} model and cannot be loaded "
                f"into {type(self).__name__}."
            )
        config = {
            "rank": meta["rank"],
            "alpha": meta["alpha"],
            "dropout": meta["dropout"],
            "targets": tuple(meta["targets"]),
        }
        self._check_lora_architecture(meta["adapted_weights"], config["targets"])
        tensors = read_safetensors(files[1])
        head = meta["head"]
        if head is not None:
            self._check_lora_head(head)
        if self._lora_fingerprint(list(meta["adapted_weights"])) != meta["base_weights_sha256"]:
            warnings.warn(
                "The attention weights of this model differ from those the adapters were trained "
                "on; the adapters are meant for the same base model (e.g. the same checkpoint).",
                UserWarning,
                stacklevel=2,
            )
        with self._restored_on_error():
            if self.lora_ is not None:
                remove_lora(self.module)
            if head is not None and getattr(self.module, "n_labels", 0) == 0:
                self._prepare_classifier(int(head["n_labels"]))
            add_lora(self.module, **config)
            self._load_lora_tensors(tensors, source=files[1])
            if head is not None:
                self.finetuned_ = bool(head["finetuned"])
        logger.info(
            "Loaded LoRA adapters for %d attention weights%s from %s.",
            len(meta["adapted_weights"]),
            " and the classification head" if head else "",
            path,
        )

    @contextmanager
    def _restored_on_error(self) -> Iterator[None]:
        """Put the network, its adapters and constructor arguments back if the block fails."""
        module, init_params = self.module, copy.deepcopy(self.init_params_)
        finetuned, config = self.finetuned_, self.lora_
        state = {k: v.detach().clone() for k, v in lora_state_dict(module).items()}
        try:
            yield
        except BaseException:
            self.module, self.init_params_, self.finetuned_ = module, init_params, finetuned
            remove_lora(module)
            if config is not None:
                add_lora(module, **config)
                self._load_lora_tensors(state)
            raise

    def _check_lora_architecture(self, saved: dict[str, list[int]], targets) -> None:
        here = {k: list(v) for k, v in find_lora_targets(self.module, targets).items()}
        absent = [k for k in saved if k not in here]
        extra = [k for k in here if k not in saved]
        shapes = [
            f"{k}: saved {saved[k]} vs {here[k]}"
            for k in saved
            if k in here and saved[k] != here[k]
        ]
        if absent or extra or shapes:
            lines = ["The adapters were trained on another architecture than this model's:"]
            if absent:
                lines.append(f"  {len(absent)} adapted weights missing here, e.g. {absent[:3]}")
            if extra:
                lines.append(
                    f"  {len(extra)} attention weights here without a saved adapter, e.g. "
                    f"{extra[:3]}"
                )
            if shapes:
                lines.append(f"  {len(shapes)} shape mismatches, e.g. {'; '.join(shapes[:3])}")
            lines.append(
                "Build the model with the configuration (or checkpoint) the adapters were "
                "trained on."
            )
            raise ValueError("\n".join(lines))

    def _check_lora_head(self, head: dict) -> None:
        n_labels = int(head["n_labels"])
        current = int(getattr(self.module, "n_labels", 0))
        if current not in (0, n_labels):
            raise ValueError(
                f"The saved classification head has {n_labels} classes but the model's head has "
                f"{current}."
            )
        if self._has_labels():
            names = [str(x) for x in self._label_names()]
            if head.get("labels") is not None and names != head["labels"]:
                raise ValueError(
                    f"The saved classification head predicts {head['labels']} but the registered "
                    f"labels are {names}; register the same labels_key categories (same order)."
                )
        elif current == 0:
            raise ValueError(
                "The adapters come with a classification head but the model has none and no "
                "labels registered; set up the AnnData with the labels_key used in training."
            )

    def _load_lora_tensors(
        self, tensors: dict[str, torch.Tensor], *, source: str | os.PathLike = "LoRA weights"
    ) -> None:
        """Copy adapter (and head) tensors into the module, checking every key and shape."""
        expected = self.module.state_dict()
        check_weights(tensors, expected, source=source)
        unknown = [k for k in tensors if k not in expected]
        shapes = [
            f"{k}: {tuple(v.shape)} vs {tuple(expected[k].shape)}"
            for k, v in tensors.items()
            if k in expected and tuple(v.shape) != tuple(expected[k].shape)
        ]
        absent = [k for k in lora_state_dict(self.module) if k not in tensors]
        if unknown or shapes or absent:
            raise ValueError(
                f"{source}: the saved LoRA weights do not fit this model: "
                + "; ".join(
                    part
                    for part in (
                        f"unknown keys {unknown[:3]}" if unknown else "",
                        f"shape mismatches {shapes[:3]}" if shapes else "",
                        f"adapter keys not saved {absent[:3]}" if absent else "",
                    )
                    if part
                )
                + "."
            )
        with torch.no_grad():
            for key, value in tensors.items():
                expected[key].copy_(value)


_META_FIELDS = {
    "rank": "positive int",
    "alpha": "number",
    "dropout": "probability",
}


def _check_lora_meta(meta, path: Path) -> dict:
    """Check every field of a ``lora_config.json``, naming the file and the field."""
    check_format(meta, path, name=_FORMAT, version=_FORMAT_VERSION)
    required = ("model_class", *_META_FIELDS, "targets", "adapted_weights", "base_weights_sha256")
    absent = [k for k in required if k not in meta]
    if absent:
        raise ValueError(f"{path} lacks the field(s) {absent}.")
    check_config_fields(meta, _META_FIELDS, source=path)
    targets = meta["targets"]
    if not isinstance(targets, list) or not targets or any(t not in LORA_TARGETS for t in targets):
        raise ValueError(f"{path}: field 'targets' must list some of {list(LORA_TARGETS)}.")
    weights = meta["adapted_weights"]
    if not isinstance(weights, dict) or not all(
        isinstance(v, list) and all(isinstance(n, int) and n > 0 for n in v)
        for v in weights.values()
    ):
        raise ValueError(f"{path}: field 'adapted_weights' must map weight names to shapes.")
    if not isinstance(meta["model_class"], str) or not isinstance(meta["base_weights_sha256"], str):
        raise ValueError(f"{path}: fields 'model_class' and 'base_weights_sha256' must be text.")
    head = meta.get("head")
    if head is not None:
        check_config_fields(head, {"n_labels": "positive int"}, source=f"{path} (head)")
        labels = head.get("labels")
        if (
            "n_labels" not in head
            or not isinstance(head.get("finetuned", True), bool)
            or not (
                labels is None or (isinstance(labels, list) and len(labels) == head["n_labels"])
            )
        ):
            raise ValueError(
                f"{path}: field 'head' must hold n_labels, finetuned and n_labels label names."
            )
        head.setdefault("finetuned", True)
    meta["head"] = head
    return meta
