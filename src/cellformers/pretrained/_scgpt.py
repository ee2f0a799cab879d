"""Reader for official scGPT checkpoint folders (``args.json``, ``vocab.json``, ``best_model.pt``)."""

from __future__ import annotations

import logging
import os
import re
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .._io import check_config_fields, check_weights, read_json, read_torch_file
from ..genes import GeneVocab

logger = logging.getLogger(__name__)

SCGPT_FILES: tuple[str, ...] = ("args.json", "vocab.json", "best_model.pt")

#: Substring renames from the flash-attn layouts to the torch ``nn.MultiheadAttention`` layout.
_RENAMES: tuple[tuple[str, str], ...] = (
    ("self_attn._impl.Wqkv.", "self_attn.in_proj_"),
    ("self_attn.Wqkv.", "self_attn.in_proj_"),
    ("self_attn._impl.out_proj.", "self_attn.out_proj."),
)

#: Keys present in published checkpoints but unused by every scGPT inference/fine-tuning path.
#: ``flag_encoder`` is the generative-pretraining flag embedding of the dev-temp model.
_UNUSED_KEYS: frozenset[str] = frozenset({"flag_encoder.weight"})

#: args.json key -> SCGPTModule keyword.
_ARGS_FIELDS = {
    **dict.fromkeys(("embsize", "nheads", "d_hid", "nlayers", "n_bins"), "positive int"),
    "dropout": "probability",
    "pad_value": "number",
    "mask_value": "number",
}
_ARGS_TO_MODULE: tuple[tuple[str, str], ...] = (
    ("embsize", "d_model"),
    ("nheads", "nhead"),
    ("d_hid", "d_hid"),
    ("nlayers", "nlayers"),
    ("dropout", "dropout"),
    ("pad_value", "pad_value"),
    ("mask_value", "mask_value"),
)


@dataclass
class ScGPTCheckpoint:
    """Content of an official scGPT checkpoint folder.

    Attributes
    ----------
    config
        Architecture settings from ``args.json``, named as :class:`~cellformers.module.SCGPTModule`
        keywords (``d_model``, ``nhead``, ``d_hid``, ``nlayers``, ``dropout``, ``pad_value``,
        ``mask_value``, ``do_mvc``), the integration options read from the weights
        (``n_batch``, ``use_batch_labels``, ``domain_spec_batchnorm``, ``do_dab``,
        ``explicit_zero_prob``) and ``args.json`` (``ecs_threshold`` from ``ecs_thres``), plus
        the tokenisation settings ``n_bins`` and ``pad_token``.
    vocab
        The gene vocabulary (``vocab.json`` with missing ``<pad>``, ``<cls>``, ``<eoc>`` appended).
    state_dict
        Weights normalised by :func:`normalize_scgpt_state_dict`.
    args
        The raw ``args.json`` content.

    """

    config: dict[str, Any]
    vocab: GeneVocab
    state_dict: dict[str, torch.Tensor]
    args: dict[str, Any] = field(default_factory=dict)

    def module_kwargs(self) -> dict[str, Any]:
        """Keyword arguments that build a matching :class:`~cellformers.module.SCGPTModule`.

        Returns
        -------
        ``{"n_tokens": len(vocab), "pad_id": vocab.pad_id, **architecture}``; use as
        ``SCGPTModule(**ckpt.module_kwargs())``.

        """
        kwargs = {k: v for k, v in self.config.items() if k not in ("n_bins", "pad_token")}
        return {"n_tokens": len(self.vocab), "pad_id": self.vocab.pad_id, **kwargs}


def read_scgpt_checkpoint(folder: str | os.PathLike) -> ScGPTCheckpoint:
    """Read an official scGPT checkpoint folder.

    The folder holds ``args.json`` (the pretraining arguments), ``vocab.json`` (``{gene: id}``)
    and ``best_model.pt`` (a plain state dict). The weights are read with
    ``torch.load(weights_only=True)``, so no pickled code is executed.

    Parameters
    ----------
    folder
        Path to the checkpoint folder (e.g. the unpacked ``scGPT_human``).

    Returns
    -------
    The parsed checkpoint; build the network with ``SCGPTModule(**ckpt.module_kwargs())`` and
    load it with :func:`load_scgpt_state_dict`.

    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"scGPT checkpoint folder {folder} does not exist. It must hold {', '.join(SCGPT_FILES)}."
        )
    missing = [name for name in SCGPT_FILES if not (folder / name).is_file()]
    if missing:
        present = sorted(p.name for p in folder.iterdir())
        raise FileNotFoundError(
            f"scGPT checkpoint folder {folder} lacks {', '.join(missing)} "
            f"(it holds: {', '.join(present) or 'nothing'}). An official folder holds "
            f"{', '.join(SCGPT_FILES)}."
        )
    args = read_json(folder / "args.json", what="scGPT training arguments")
    check_config_fields(args, _ARGS_FIELDS, source=folder / "args.json")
    pad_token = args.get("pad_token", "<pad>")
    vocab = GeneVocab.from_file(folder / "vocab.json", pad_token=pad_token)

    raw = read_torch_file(folder / "best_model.pt")
    state_dict = normalize_scgpt_state_dict(raw, vocab=vocab)
    config = _config_from_args(args, state_dict)
    return ScGPTCheckpoint(config=config, vocab=vocab, state_dict=state_dict, args=args)


def _config_from_args(args: Mapping[str, Any], state_dict: Mapping[str, torch.Tensor]) -> dict:
    style = args.get("input_emb_style", "continuous")
    if style != "continuous":
        raise ValueError(
            f"args.json has input_emb_style={style!r}; only 'continuous' (all published scGPT "
            "checkpoints) is supported."
        )
    absent = [k for k, _ in _ARGS_TO_MODULE if k not in args and k != "mask_value"]
    if absent:
        raise KeyError(
            f"args.json lacks {', '.join(absent)}, needed to build the network. "
            "Is this an official scGPT checkpoint folder?"
        )
    config: dict[str, Any] = {}
    for src, dst in _ARGS_TO_MODULE:
        if src in args:
            config[dst] = args[src]
    for key in ("d_model", "nhead", "d_hid", "nlayers"):
        config[key] = int(config[key])
    if config["d_model"] % config["nhead"]:
        raise ValueError(
            f"args.json: embsize {config['d_model']} is not divisible by nheads {config['nhead']}."
        )
    emb = state_dict.get("encoder.embedding.weight")
    if emb is not None and emb.dim() == 2 and emb.shape[1] != config["d_model"]:
        raise ValueError(
            f"args.json: embsize {config['d_model']} disagrees with the weights "
            f"(encoder.embedding.weight is {tuple(emb.shape)}); the args.json does not belong "
            "to best_model.pt."
        )
    for key in ("dropout", "pad_value", "mask_value"):
        if key in config:
            config[key] = float(config[key])
    has_mvc = any(k.startswith("mvc_decoder.") for k in state_dict)
    do_mvc = bool(args.get("MVC", has_mvc))
    if do_mvc != has_mvc:
        logger.warning(
            "args.json says MVC=%s but the weights %s mvc_decoder.*; following the weights.",
            do_mvc,
            "hold" if has_mvc else "lack",
        )
        do_mvc = has_mvc
    config["do_mvc"] = do_mvc
    config.update(_batch_config(args, state_dict, d_model=config["d_model"]))
    config["n_bins"] = int(args.get("n_bins", 51))
    config["pad_token"] = args.get("pad_token", "<pad>")
    return config


def _batch_config(
    args: Mapping[str, Any], state_dict: Mapping[str, torch.Tensor], *, d_model: int
) -> dict[str, Any]:
    """Integration options of a checkpoint, read from its weights (and ECS from args.json).

    The number of batch labels is the row count of ``batch_encoder.embedding.weight``, the
    number of ``dsbn.bns.{k}`` domains and the output size of the discriminator, which must
    agree; the expression decoder's input size (``2 * d_model`` with batch labels) must match.
    """
    sizes: dict[str, int] = {}
    if "batch_encoder.embedding.weight" in state_dict:
        sizes["batch_encoder.embedding.weight rows"] = state_dict[
            "batch_encoder.embedding.weight"
        ].shape[0]
    domains = {int(m.group(1)) for k in state_dict if (m := _DSBN_RE.match(k))}
    if domains:
        sizes["dsbn domains"] = max(domains) + 1
    if "grad_reverse_discriminator.out_layer.weight" in state_dict:
        sizes["discriminator outputs"] = state_dict[
            "grad_reverse_discriminator.out_layer.weight"
        ].shape[0]
    if len(set(sizes.values())) > 1:
        raise ValueError(
            "The checkpoint's batch parts disagree on the number of batch labels: "
            + ", ".join(f"{k} {v}" for k, v in sizes.items())
            + "."
        )
    use_batch_labels = "batch_encoder.embedding.weight" in state_dict
    fc0 = state_dict.get("decoder.fc.0.weight")
    if fc0 is not None and fc0.dim() == 2:
        expected = 2 * d_model if use_batch_labels else d_model
        if fc0.shape[1] != expected:
            raise ValueError(
                f"decoder.fc.0.weight has input size {fc0.shape[1]}, but the checkpoint "
                f"{'has' if use_batch_labels else 'lacks'} batch_encoder.*, so scGPT's decoder "
                f"reads {expected} features (d_model {d_model})."
            )
    ecs = args.get("ecs_thres", args.get("ecs_threshold"))
    ecs = float(ecs) if ecs is not None and float(ecs) > 0 else None
    return {
        "n_batch": next(iter(sizes.values()), 0),
        "use_batch_labels": use_batch_labels,
        "domain_spec_batchnorm": bool(domains),
        "do_dab": "grad_reverse_discriminator.out_layer.weight" in state_dict,
        "explicit_zero_prob": "decoder.zero_logit.0.weight" in state_dict,
        "ecs_threshold": ecs,
    }


def normalize_scgpt_state_dict(
    state_dict: Mapping[str, torch.Tensor], *, vocab: GeneVocab | int | None = None
) -> dict[str, torch.Tensor]:
    """Bring a scGPT state dict into the torch (``in_proj_*``) layout used by our module.

    * strips a leading ``module.`` (DDP-wrapped saves);
    * renames the flash-attn layouts ``self_attn.Wqkv.*`` and ``self_attn._impl.Wqkv.*`` to
      ``self_attn.in_proj_*`` and ``self_attn._impl.out_proj.*`` to ``self_attn.out_proj.*``
      (the packed QKV memory layout is identical, so this is a pure rename);
    * drops keys known by name to be unused (``flag_encoder.weight``); nothing is dropped by shape.

    Parameters
    ----------
    state_dict
        Mapping from key to tensor, as saved by the official code.
    vocab
        The vocabulary (or its size); when given, ``encoder.embedding.weight`` must have one row
        per token.

    Returns
    -------
    A new dict with normalised keys (tensors are shared, not copied).

    """
    if not isinstance(state_dict, Mapping):
        raise TypeError(
            f"Expected a state dict (mapping of key to tensor), got {type(state_dict).__name__}."
        )
    not_tensors = [k for k, v in state_dict.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise ValueError(
            f"Expected a plain state dict of tensors; {len(not_tensors)} entries are not tensors "
            f"(e.g. {not_tensors[:5]}). If the file wraps the weights (e.g. under "
            "'model_state_dict'), pass that inner dict."
        )
    out: dict[str, torch.Tensor] = OrderedDict()
    for key, value in state_dict.items():
        new = key[len("module.") :] if key.startswith("module.") else key
        for old, repl in _RENAMES:
            new = new.replace(old, repl)
        if new in _UNUSED_KEYS:
            continue
        if new in out:
            raise ValueError(
                f"Keys collide after normalisation: {key!r} maps to {new!r}, which another key "
                "already produced (the state dict mixes attention layouts)."
            )
        out[new] = value
    if vocab is not None:
        n_tokens = vocab if isinstance(vocab, int) else len(vocab)
        emb = out.get("encoder.embedding.weight")
        if emb is None:
            raise KeyError("The state dict has no 'encoder.embedding.weight'; is it a scGPT model?")
        if emb.shape[0] != n_tokens:
            raise ValueError(
                f"encoder.embedding.weight has {emb.shape[0]} rows but the vocabulary has "
                f"{n_tokens} tokens (after appending missing <pad>, <cls>, <eoc>). The "
                "vocab.json does not belong to these weights."
            )
    return out


_LAYER_RE = re.compile(r"^transformer_encoder\.layers\.(\d+)\.")
_DSBN_RE = re.compile(r"^dsbn\.bns\.(\d+)\.")

#: Parts that a pretrained checkpoint lacks when integration fine-tuning starts from it.
_BATCH_PREFIXES: tuple[str, ...] = (
    "batch_encoder.",
    "dsbn.",
    "grad_reverse_discriminator.",
    "decoder.zero_logit.",
    "mvc_decoder.W_zero_logit.",
)
#: Decoder inputs that grow from d_model to 2 * d_model with batch labels.
_BATCH_INPUT_KEYS: tuple[str, ...] = ("decoder.fc.0.weight", "mvc_decoder.W.weight")

_HINTS: tuple[tuple[str, str, str], ...] = (
    # (side, key prefix, or "*substring", meaning)
    (
        "unexpected",
        "*Wqkv.",
        "flash-attn names: pass the weights through normalize_scgpt_state_dict",
    ),
    (
        "unexpected",
        "*._impl.",
        "flash-attn names: pass the weights through normalize_scgpt_state_dict",
    ),
    ("unexpected", "module.", "DDP prefix: pass the weights through normalize_scgpt_state_dict"),
    (
        "unexpected",
        "flag_encoder.",
        "generative-pretraining flag embedding: normalize_scgpt_state_dict drops it",
    ),
    (
        "unexpected",
        "cls_decoder.",
        "a fine-tuned classification head: build the module with n_labels = its classes",
    ),
    (
        "unexpected",
        "mvc_decoder.",
        "the checkpoint has an MVC decoder: build the module with do_mvc=True",
    ),
    (
        "missing",
        "mvc_decoder.",
        "the checkpoint has no MVC decoder: build the module with do_mvc=False",
    ),
    (
        "unexpected",
        "batch_encoder.",
        "a batch-label checkpoint: build the module with use_batch_labels=True and n_batch = "
        "its rows",
    ),
    (
        "missing",
        "batch_encoder.",
        "the checkpoint has no batch encoder: build the module with use_batch_labels=False, or "
        "pass init_batch_modules=True to start integration fine-tuning from it",
    ),
    (
        "unexpected",
        "dsbn.",
        "domain-specific batch norm: build the module with domain_spec_batchnorm=True and "
        "n_batch = its domains",
    ),
    (
        "missing",
        "dsbn.",
        "the checkpoint has no domain-specific batch norm: build the module with "
        "domain_spec_batchnorm=False, or pass init_batch_modules=True",
    ),
    (
        "unexpected",
        "bn.",
        "a BatchNorm after the embeddings (domain_spec_batchnorm='batchnorm'), not supported",
    ),
    (
        "unexpected",
        "grad_reverse_discriminator.",
        "an adversarial batch discriminator: build the module with do_dab=True",
    ),
    (
        "missing",
        "grad_reverse_discriminator.",
        "the checkpoint has no batch discriminator: build the module with do_dab=False, or "
        "pass init_batch_modules=True",
    ),
    (
        "unexpected",
        "*zero_logit",
        "explicit zero-probability heads: build the module with explicit_zero_prob=True",
    ),
    (
        "missing",
        "*zero_logit",
        "the checkpoint has no zero-probability heads: build the module with "
        "explicit_zero_prob=False",
    ),
    (
        "unexpected",
        "pert_encoder.",
        "a perturbation model (TransformerGenerator), not an SCGPTModule checkpoint",
    ),
    ("missing", "encoder.", "the weights are not a scGPT model, or were saved with another prefix"),
)


def _matches(key: str, pattern: str) -> bool:
    return pattern[1:] in key if pattern.startswith("*") else key.startswith(pattern)


def _explain(missing: list[str], unexpected: list[str], mismatched: list[str]) -> list[str]:
    hints: list[str] = []

    def add(h: str) -> None:
        if h not in hints:
            hints.append(h)

    for side, keys in (("missing", missing), ("unexpected", unexpected)):
        for pattern_side, pattern, meaning in _HINTS:
            if pattern_side != side:
                continue
            if any(_matches(k, pattern) for k in keys):
                add(f"{pattern.strip('*')}: {meaning}")
        layers = {int(m.group(1)) for k in keys if (m := _LAYER_RE.match(k))}
        if layers:
            add(
                f"transformer layers {sorted(layers)} are {side}: nlayers differs from the "
                "checkpoint (use args.json 'nlayers')"
            )
    for item in mismatched:
        if item.startswith("encoder.embedding.weight"):
            add("encoder.embedding.weight: vocabulary size or d_model differs from the checkpoint")
        elif item.startswith(("decoder.fc.0.", "mvc_decoder.W.")):
            add(f"{item.split(':')[0]}: a batch-label (use_batch_labels) head or another d_model")
        elif item.startswith(
            ("batch_encoder.embedding.", "dsbn.", "grad_reverse_discriminator.out_layer.")
        ):
            add(f"{item.split(':')[0]}: n_batch differs from the checkpoint's batch labels")
    if mismatched and not hints:
        add("shape mismatches: d_model / d_hid differ from the checkpoint (use args.json)")
    return hints


def load_scgpt_state_dict(
    module: torch.nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    *,
    init_missing_head: bool = False,
    init_batch_modules: bool = False,
):
    """Load a normalised scGPT state dict strictly.

    Parameters
    ----------
    module
        The network, e.g. :class:`~cellformers.module.SCGPTModule`.
    state_dict
        Weights from :func:`normalize_scgpt_state_dict` (or :func:`read_scgpt_checkpoint`).
    init_missing_head
        Allow the classification head (``cls_decoder.*``) to be absent from the weights (a
        pretrained checkpoint loaded for fine-tuning); it keeps its fresh initialisation.
        Every other key must still match.
    init_batch_modules
        Start integration fine-tuning from a checkpoint without batch parts, as scGPT's
        integration recipe does: ``batch_encoder.*``, ``dsbn.*``,
        ``grad_reverse_discriminator.*`` and the zero-probability heads may be absent, and
        ``decoder.fc.0.weight`` / ``mvc_decoder.W.weight`` may have ``d_model`` instead of
        ``2 * d_model`` input features; those keep their fresh initialisation (logged). Every
        other key must still match.

    Returns
    -------
    The module, with weights loaded.

    Raises
    ------
    RuntimeError
        Listing missing keys, unexpected keys and shape mismatches, with what they usually mean.

    """
    expected = module.state_dict()
    fresh: list[str] = []
    if init_batch_modules:
        d_model = getattr(module, "d_model", None)
        state_dict = dict(state_dict)
        for key in _BATCH_INPUT_KEYS:
            if key not in state_dict or key not in expected:
                continue
            ours, theirs = tuple(expected[key].shape), tuple(state_dict[key].shape)
            grown = (d_model, 2 * d_model) if key.startswith("decoder.") else (2 * d_model, d_model)
            shrunk = (d_model, d_model)
            if ours == grown and theirs == shrunk:
                del state_dict[key]
                fresh.append(key)
        fresh += [k for k in expected if k not in state_dict and k.startswith(_BATCH_PREFIXES)]
    missing = [k for k in expected if k not in state_dict and k not in fresh]
    head_only = init_missing_head and not any(k.startswith("cls_decoder.") for k in state_dict)
    if head_only:
        missing = [k for k in missing if not k.startswith("cls_decoder.")]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [
        f"{k}: checkpoint {tuple(v.shape)} vs module {tuple(expected[k].shape)}"
        for k, v in state_dict.items()
        if k in expected and tuple(v.shape) != tuple(expected[k].shape)
    ]
    if missing or unexpected or mismatched:
        lines = [f"The scGPT weights do not match {type(module).__name__}:"]
        if missing:
            lines.append(
                f"  missing keys ({len(missing)}): {', '.join(missing[:20])}"
                + (" ..." if len(missing) > 20 else "")
            )
        if unexpected:
            lines.append(
                f"  unexpected keys ({len(unexpected)}): {', '.join(unexpected[:20])}"
                + (" ..." if len(unexpected) > 20 else "")
            )
        if mismatched:
            lines.append(
                f"  shape mismatches ({len(mismatched)}): {'; '.join(mismatched[:20])}"
                + (" ..." if len(mismatched) > 20 else "")
            )
        hints = _explain(missing, unexpected, mismatched)
        if hints:
            lines.append("What this usually means:")
            lines.extend(f"  - {h}" for h in hints)
        raise RuntimeError("\n".join(lines))
    if fresh:
        logger.info(
            "Integration parts not in the checkpoint keep their fresh initialisation: %s",
            ", ".join(sorted({k.rsplit(".", 1)[0] for k in fresh})),
        )
    check_weights(state_dict, module.state_dict(), source="The scGPT weights")
    module.load_state_dict(state_dict, strict=not (head_only or fresh))
    return module
