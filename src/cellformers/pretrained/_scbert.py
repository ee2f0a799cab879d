"""Reader for official scBERT checkpoints (``panglao_pretrain.pth`` and fine-tuned ``*_best.pth``).

The files are ``torch.save`` dicts ``{"epoch", "model_state_dict", "optimizer_state_dict",
"scheduler_state_dict", "losses"}`` whose ``model_state_dict`` uses the key names of the
official ``PerformerLM``, which :class:`~cellformers.module.SCBERTModule` shares. They are read
with ``torch.load(weights_only=True)``, so no pickled code runs; the network sizes are inferred
from the tensor shapes.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .._io import check_weights, read_torch_file
from ._utils import compare_keys, raise_key_mismatch

logger = logging.getLogger(__name__)

_STATE_KEY = "model_state_dict"
_LAYER_RE = re.compile(r"^performer\.net\.layers\.(\d+)\.")
_PROJ = "performer.net.layers.0.0.fn.fast_attention.projection_matrix"


@dataclass
class ScBERTCheckpoint:
    """Content of an scBERT checkpoint.

    Attributes
    ----------
    state_dict
        The network weights under the official key names (no ``module.`` prefix).
    config
        Sizes inferred from the shapes (:func:`scbert_config_from_state_dict`).
    epoch
        The ``epoch`` entry of the file, if any.

    """

    state_dict: dict[str, torch.Tensor]
    config: dict[str, Any]
    epoch: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def module_kwargs(self, **overrides: Any) -> dict[str, Any]:
        """Keyword arguments that build a matching :class:`~cellformers.module.SCBERTModule`.

        Parameters
        ----------
        **overrides
            Replace or add keywords (e.g. ``stabilizer="batch"``, ``n_labels=...``).

        Returns
        -------
        :func:`scbert_module_kwargs` of :attr:`config`.

        """
        return scbert_module_kwargs(self.config, **overrides)


def _strip_module_prefix(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    keys = list(state_dict)
    if keys and all(k.startswith("module.") for k in keys):
        return {k[len("module.") :]: v for k, v in state_dict.items()}
    return dict(state_dict)


def read_scbert_checkpoint(path: str | os.PathLike) -> ScBERTCheckpoint:
    """Read an official scBERT checkpoint file.

    Accepts the training wrapper ``{"model_state_dict": ..., ...}`` (as ``pretrain.py`` and
    ``finetune.py`` save it) or a bare state dict, with or without the ``module.`` prefix of a
    DDP-wrapped save.

    Parameters
    ----------
    path
        The ``.pth`` file (e.g. ``panglao_pretrain.pth``).

    Returns
    -------
    The checkpoint; build the network with ``SCBERTModule(**ckpt.module_kwargs())`` and load it
    with :func:`load_scbert_state_dict`.

    """
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(
            f"scBERT checkpoint {file} does not exist (expected a .pth file such as "
            "panglao_pretrain.pth)."
        )
    raw = read_torch_file(file)
    if not isinstance(raw, Mapping):
        raise ValueError(f"{file} holds a {type(raw).__name__}, not a checkpoint dict.")
    epoch = None
    extra: dict[str, Any] = {}
    if _STATE_KEY in raw:
        state_dict = raw[_STATE_KEY]
        epoch = raw.get("epoch")
        extra = {k: raw[k] for k in ("losses",) if k in raw}
    elif all(isinstance(v, torch.Tensor) for v in raw.values()):
        state_dict = raw
    else:
        raise ValueError(
            f"{file} has no {_STATE_KEY!r} entry (it holds: {', '.join(map(str, raw))}) and is "
            "not a plain state dict; is it an scBERT checkpoint?"
        )
    if not isinstance(state_dict, Mapping) or not all(
        isinstance(v, torch.Tensor) for v in state_dict.values()
    ):
        raise ValueError(f"{file}: {_STATE_KEY!r} is not a state dict of tensors.")
    state_dict = _strip_module_prefix(state_dict)
    config = scbert_config_from_state_dict(state_dict)
    return ScBERTCheckpoint(
        state_dict=state_dict,
        config=config,
        epoch=None if epoch is None else int(epoch),
        extra=extra,
    )


def scbert_config_from_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """Infer the network sizes from the tensor shapes of an official state dict.

    Parameters
    ----------
    state_dict
        Weights under the official key names.

    Returns
    -------
    ``{"n_genes", "num_tokens", "dim", "depth", "heads", "dim_head", "nb_features", "ff_mult",
    "position_embedding", "n_labels", "classifier_hidden"}``; ``n_genes`` is `None` when neither
    the position table nor a fine-tuning head fixes it.

    Raises
    ------
    KeyError
        When keys every scBERT network has are absent.
    ValueError
        For shapes that do not fit together or settings the module does not implement.

    """
    state_dict = _strip_module_prefix(state_dict)
    required = ("token_emb.weight", _PROJ, "performer.net.layers.0.0.fn.to_q.weight")
    absent = [k for k in required if k not in state_dict]
    if absent:
        raise KeyError(
            f"Not an scBERT (PerformerLM) state dict: missing {', '.join(absent)} (it has "
            f"{len(state_dict)} keys, e.g. {', '.join(list(state_dict)[:5])})."
        )
    num_tokens, dim = state_dict["token_emb.weight"].shape
    nb_features, dim_head = state_dict[_PROJ].shape
    inner = state_dict["performer.net.layers.0.0.fn.to_q.weight"].shape[0]
    if inner % dim_head:
        raise ValueError(
            f"to_q has {inner} output rows, not a multiple of dim_head {dim_head} (from the "
            "projection matrix)."
        )
    layers = {int(m.group(1)) for k in state_dict if (m := _LAYER_RE.match(k))}
    depth = max(layers) + 1
    if layers != set(range(depth)):
        raise ValueError(f"Performer layers {sorted(layers)} are not numbered 0..{depth - 1}.")
    if "performer.net.layers.0.0.fn.to_q.bias" in state_dict:
        raise ValueError(
            "The checkpoint has query/key/value biases (to_q.bias); scBERT's PerformerLM has "
            "none (qkv_bias=False). Is it another Performer model?"
        )
    w1 = state_dict.get("performer.net.layers.0.1.fn.fn.w1.weight")
    ff_mult = 4 if w1 is None else int(w1.shape[0]) // int(dim)
    position_embedding = "pos_emb.emb.weight" in state_dict
    n_genes = None
    if position_embedding:
        n_genes = int(state_dict["pos_emb.emb.weight"].shape[0]) - 1
    n_labels = 0
    classifier_hidden = (512, 128)
    if "to_out.fc3.weight" in state_dict:
        n_labels = int(state_dict["to_out.fc3.weight"].shape[0])
        fc1 = state_dict["to_out.fc1.weight"]
        classifier_hidden = (int(fc1.shape[0]), int(state_dict["to_out.fc2.weight"].shape[0]))
        head_genes = int(fc1.shape[1]) - 1
        if n_genes is not None and head_genes != n_genes:
            raise ValueError(
                f"The position table has {n_genes + 1} rows but the fine-tuning head's fc1 "
                f"takes {head_genes + 1} positions; the two do not belong together."
            )
        n_genes = head_genes
    return {
        "n_genes": n_genes,
        "num_tokens": int(num_tokens),
        "dim": int(dim),
        "depth": depth,
        "heads": int(inner) // int(dim_head),
        "dim_head": int(dim_head),
        "nb_features": int(nb_features),
        "ff_mult": ff_mult,
        "position_embedding": position_embedding,
        "n_labels": n_labels,
        "classifier_hidden": classifier_hidden,
    }


def scbert_module_kwargs(config: Mapping[str, Any], **overrides: Any) -> dict[str, Any]:
    """Keyword arguments of :class:`~cellformers.module.SCBERTModule` from an inferred config.

    Parameters
    ----------
    config
        :attr:`ScBERTCheckpoint.config` (or :func:`scbert_config_from_state_dict`'s output).
    **overrides
        Replace or add keywords, e.g. ``n_genes`` for a checkpoint without a position table,
        ``n_labels`` to fine-tune a pretrained checkpoint, ``stabilizer="batch"``.

    Returns
    -------
    Keyword arguments; the position table itself comes with the weights (load them with
    :func:`load_scbert_state_dict`).

    """
    kwargs = {
        k: config[k]
        for k in (
            "n_genes",
            "num_tokens",
            "dim",
            "depth",
            "heads",
            "dim_head",
            "nb_features",
            "ff_mult",
            "position_embedding",
            "n_labels",
            "classifier_hidden",
        )
        if k in config
    }
    kwargs.update(overrides)
    if kwargs.get("n_genes") is None:
        raise ValueError(
            "The checkpoint has no gene2vec position table (pos_emb.emb.weight) nor a "
            "fine-tuning head, so the gene-panel size is unknown; pass n_genes=..."
        )
    kwargs["classifier_hidden"] = tuple(kwargs.get("classifier_hidden", (512, 128)))
    return kwargs


def _explain(
    module: torch.nn.Module, missing: list[str], unexpected: list[str], mismatched: list[str]
) -> list[str]:
    hints: list[str] = []

    def add(h: str) -> None:
        if h not in hints:
            hints.append(h)

    def has(keys: list[str], prefix: str) -> bool:
        return any(k.startswith(prefix) for k in keys)

    if has(unexpected, "to_out.conv1.") or has(unexpected, "to_out.fc"):
        add(
            "to_out.conv1/fc*: the checkpoint is fine-tuned (it has the classification head); "
            "build the module with n_labels = rows of to_out.fc3.weight "
            "(scbert_module_kwargs does)"
        )
    if "to_out.weight" in unexpected:
        add(
            "to_out.weight/bias: the checkpoint is pretrained (masked-LM head); to fine-tune, "
            "pass init_missing_head=True to keep the module's fresh classification head, as "
            "finetune.py does"
        )
    if "pos_emb.emb.weight" in missing:
        add(
            "pos_emb.emb.weight: the checkpoint has no gene2vec table (g2v_position_emb=False); "
            "build the module with position_embedding=False"
        )
    if "pos_emb.emb.weight" in unexpected:
        add("pos_emb.emb.weight: the checkpoint has a gene2vec table; use position_embedding=True")
    for side, keys in (("missing", missing), ("unexpected", unexpected)):
        layers = sorted({int(m.group(1)) for k in keys if (m := _LAYER_RE.match(k))})
        if layers:
            add(
                f"Performer layers {layers} are {side}: depth differs from the checkpoint "
                f"(module has {module.depth})"
            )
        if any(k.startswith("module.") for k in keys):
            add("module.*: a DDP-wrapped save; strip the 'module.' prefix")
    for item in mismatched:
        key = item.split(":")[0]
        if key == "pos_emb.emb.weight" or key == "to_out.fc1.weight":
            add(
                f"{key}: the gene-panel size differs: the module has n_genes={module.n_genes} "
                "(n_genes + 1 positions); build it with the checkpoint's panel "
                "(16,906 genes for panglao_pretrain.pth)"
            )
        elif key == "token_emb.weight" or key == "to_out.weight" or key == "to_out.bias":
            add(f"{key}: num_tokens (bin_num + 2) or dim differs from the checkpoint")
        elif key.endswith("projection_matrix"):
            add(f"{key}: dim_head or nb_features differs from the checkpoint")
        elif key.endswith(("to_q.weight", "to_k.weight", "to_v.weight", "to_out.weight")):
            add(
                f"{key}: heads x dim_head differs from the checkpoint (module: "
                f"{module.heads} heads x {module.dim_head})"
            )
        elif ".fn.fn.w" in key:
            add(f"{key}: ff_mult or dim differs from the checkpoint")
        elif key.startswith("to_out.fc3"):
            add(f"{key}: n_labels differs from the checkpoint (module: {module.n_labels})")
        elif key.startswith("to_out."):
            add(f"{key}: classifier_hidden differs from the checkpoint")
    if mismatched and not hints:
        add("shape mismatches: dim differs from the checkpoint")
    return hints


def load_scbert_state_dict(
    module: torch.nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    *,
    init_missing_head: bool = False,
) -> torch.nn.Module:
    """Load official scBERT weights into an :class:`~cellformers.module.SCBERTModule`, strictly.

    Every key must match in name and shape, including the Performer's random features
    (``projection_matrix``), which are loaded, never redrawn, and the float64 gene2vec table.
    A ``module.`` prefix (DDP save) is stripped.

    Parameters
    ----------
    module
        The network, e.g. built with ``SCBERTModule(**ckpt.module_kwargs())``.
    state_dict
        Weights under the official key names (:attr:`ScBERTCheckpoint.state_dict`).
    init_missing_head
        When the checkpoint's head (``to_out.*``) is not the module's (a pretrained masked-LM
        head for a module with a classification head, as ``finetune.py`` replaces it, or the
        other way round), drop the checkpoint's head and keep the module's fresh one instead
        of failing.

    Returns
    -------
    The module, with weights loaded.

    Raises
    ------
    RuntimeError
        Listing missing keys, unexpected keys and shape mismatches with their likely meaning
        (gene-panel size, depth, heads, head type).

    """
    if not isinstance(state_dict, Mapping):
        raise TypeError(
            f"Expected a state dict (mapping of key to tensor), got {type(state_dict)!r}."
        )
    given = _strip_module_prefix(state_dict)
    ours = module.state_dict()
    kept_head = False
    if init_missing_head:
        ours_head = [k for k in ours if k.startswith("to_out.")]
        given_head = [k for k in given if k.startswith("to_out.")]
        if ours_head and not any(k in given for k in ours_head):
            given = {k: v for k, v in given.items() if k not in given_head}
            given.update({k: ours[k] for k in ours_head})
            kept_head = True
    missing, unexpected, mismatched = compare_keys({k: v.shape for k, v in ours.items()}, given)
    if missing or unexpected or mismatched:
        hints = _explain(module, missing, unexpected, mismatched)
        raise_key_mismatch("scBERT", module, missing, unexpected, mismatched, hints)
    check_weights(given, module.state_dict(), source="The scBERT weights")
    module.load_state_dict(given, strict=True)
    if kept_head:
        logger.info(
            "The checkpoint's head (to_out) does not fit this module; the module keeps its fresh "
            "head, which must be trained."
        )
    return module
