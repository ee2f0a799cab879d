"""Reader and writer for official scFoundation checkpoints (``models.ckpt``).

``models.ckpt`` is a ``torch.save`` dict with three independent checkpoints of the xTrimoGene
``mae_autobin`` network: ``"cell"`` (cell embeddings), ``"rde"`` (read-depth enhancement) and
``"gene"`` (gene embeddings and decoder outputs). Each is ``{"config": {...}, "state_dict":
OrderedDict}``; the state-dict keys carry the training wrapper's ``model.`` prefix, and the
config nests the network settings in ``config["model_config"]["mae_autobin"]`` and the data
settings in ``config["dataset_config"]["rnaseq"]``. Files are read with
``torch.load(weights_only=True)``, so no pickled code runs.
"""

from __future__ import annotations

import logging
import os
import re
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._io import atomic_write, check_config_fields, check_weights, read_torch_file
from ..nn._performer import default_nb_features
from ._utils import compare_keys, raise_key_mismatch

logger = logging.getLogger(__name__)

#: Sub-checkpoints of ``models.ckpt``.
VERSIONS: tuple[str, ...] = ("cell", "rde", "gene")
#: ``get_embedding.py``'s ``--version`` names.
_VERSION_ALIASES: dict[str, str] = {"ce": "cell"}
_MODEL = "mae_autobin"
_PREFIX = "model."
_OFFICIAL_LAYER = re.compile(r"^encoder\.transformer_encoder\.(\d+)\.")
_OUR_LAYER = re.compile(r"^encoder\.layers\.(\d+)\.")
_DECODER_LAYER = re.compile(r"^decoder\.performer\.net\.layers\.(\d+)\.")
_PROJ = "decoder.performer.net.layers.0.0.fn.fast_attention.projection_matrix"
_TO_Q = "decoder.performer.net.layers.0.0.fn.to_q"
#: Flat config keys written to ``dataset_config["rnaseq"]`` (the rest go to ``model_config``).
_DATASET_KEYS: frozenset[str] = frozenset(
    {
        "seq_len",
        "gene_num",
        "rawcount",
        "bin_type",
        "value_mask_prob",
        "zero_mask_prob",
        "replace_prob",
        "random_token_prob",
        "mask_prob",
        "mask_ignore_token_ids",
        "mae_encoder_max_seq_len",
        "downsample_prob",
        "min_depth_fraction",
        "target_sum",
    }
)


@dataclass
class ScFoundationCheckpoint:
    """One network of an scFoundation checkpoint file.

    Attributes
    ----------
    config
        The flat config, as the official ``convertconfig`` builds it: the network settings
        merged with the data settings, ``encoder`` and ``decoder`` kept as sub-dicts.
    state_dict
        The weights under the official key names, without the ``model.`` prefix
        (``encoder.transformer_encoder.{i}.*`` for the encoder layers).
    version
        ``"cell"``, ``"rde"`` or ``"gene"`` (the sub-checkpoint read), or the requested
        version for a file holding a single network.

    """

    config: dict[str, Any]
    state_dict: dict[str, torch.Tensor]
    version: str

    def module_kwargs(self, **overrides: Any) -> dict[str, Any]:
        """Keyword arguments that build a matching :class:`~cellformers.module.SCFoundationModule`.

        Settings the official config does not hold (the number of random features of the
        decoder, its query/key/value biases) are read from the weights.

        Parameters
        ----------
        **overrides
            Replace or add keywords (e.g. ``stabilizer="batch"``, ``expression_head=False``).

        Returns
        -------
        :func:`scfoundation_module_kwargs` of :attr:`config`.

        """
        inferred = _shape_kwargs(self.state_dict)
        decoder = self.config.get("decoder") or {}
        fill = {}
        if "nb_features" not in decoder and "decoder_nb_features" in inferred:
            fill["decoder_nb_features"] = inferred["decoder_nb_features"]
        if "qkv_bias" not in decoder and "decoder_qkv_bias" in inferred:
            fill["decoder_qkv_bias"] = inferred["decoder_qkv_bias"]
        if "to_final.weight" not in self.state_dict:
            fill["expression_head"] = False
        return scfoundation_module_kwargs(self.config, **{**fill, **overrides})


# ---------------------------------------------------------------------------------- reading
def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and all(isinstance(v, torch.Tensor) for v in obj.values())


def _strip_prefix(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    keys = list(state_dict)
    if keys and all(k.startswith(_PREFIX) for k in keys):
        return {k[len(_PREFIX) :]: v for k, v in state_dict.items()}
    return dict(state_dict)


def flatten_scfoundation_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """Flatten an official nested config as ``convertconfig`` does.

    Parameters
    ----------
    config
        ``{"model": "mae_autobin", "model_config": {"mae_autobin": {...}}, "dataset_config":
        {"rnaseq": {...}}, ...}``; a config that is already flat is returned as a copy.

    Returns
    -------
    The network settings merged with the data settings (data settings win on a clash, as in
    ``convertconfig``), plus ``model`` and ``model_type``.

    """
    if not isinstance(config, Mapping):
        raise ValueError(f"The checkpoint config must be a dict, got {type(config).__name__}.")
    if "model_config" not in config:
        return dict(config)
    model = config.get("model", _MODEL)
    model_config = config["model_config"]
    if not isinstance(model_config, Mapping) or model not in model_config:
        raise ValueError(
            f"The config's model_config has no {model!r} entry (it holds: "
            f"{', '.join(map(str, model_config)) if isinstance(model_config, Mapping) else model_config})."
        )
    flat = dict(model_config[model])
    dataset = config.get("dataset_config") or {}
    flat.update(dataset.get("rnaseq") or {})
    flat.setdefault("model", model)
    flat["model_type"] = model
    return flat


def read_scfoundation_checkpoint(
    path: str | os.PathLike, version: str = "cell"
) -> ScFoundationCheckpoint:
    """Read one network of an scFoundation checkpoint file.

    Accepts the published ``models.ckpt`` (a dict of the sub-checkpoints ``"cell"``, ``"rde"``
    and ``"gene"``), a file holding one sub-checkpoint (``{"config", "state_dict"}``) and a
    bare state dict (its config is then inferred from the tensor shapes, except the encoder's
    number of heads). The ``model.`` prefix of the keys is stripped.

    Parameters
    ----------
    path
        The checkpoint file.
    version
        Sub-checkpoint to read: ``"cell"`` (cell embeddings; ``"ce"`` is accepted as in
        ``get_embedding.py``), ``"rde"`` (read-depth enhancement) or ``"gene"`` (gene
        embeddings and expression). Ignored for single-network files.

    Returns
    -------
    The checkpoint; build the network with ``SCFoundationModule(**ckpt.module_kwargs())`` and
    load it with :func:`load_scfoundation_state_dict`.

    """
    version = _VERSION_ALIASES.get(version, version)
    if version not in VERSIONS:
        raise ValueError(f"version must be one of {VERSIONS}, got {version!r}.")
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(
            f"scFoundation checkpoint {file} does not exist (expected a file such as models.ckpt)."
        )
    raw = read_torch_file(file)
    if not isinstance(raw, Mapping):
        raise ValueError(f"{file} holds a {type(raw).__name__}, not a checkpoint dict.")
    if any(v in raw for v in VERSIONS) and not _is_state_dict(raw):
        if version not in raw:
            raise KeyError(
                f"{file} has no {version!r} checkpoint; it holds "
                f"{', '.join(repr(k) for k in raw if k in VERSIONS)}."
            )
        entry = raw[version]
    elif "state_dict" in raw:
        entry = raw
    elif _is_state_dict(raw):
        entry = {"state_dict": raw}
    else:
        raise ValueError(
            f"{file} is not an scFoundation checkpoint: it has none of the keys "
            f"{', '.join(VERSIONS)} or 'state_dict' (it holds: {', '.join(map(str, raw))})."
        )
    if not isinstance(entry, Mapping) or "state_dict" not in entry:
        raise ValueError(f"{file}: the {version!r} entry has no 'state_dict'.")
    if not _is_state_dict(entry["state_dict"]):
        raise ValueError(f"{file}: the {version!r} entry's 'state_dict' is not a dict of tensors.")
    state_dict = _strip_prefix(entry["state_dict"])
    config = entry.get("config")
    if config is None:
        config = _config_from_state_dict(state_dict)
    else:
        config = flatten_scfoundation_config(config)
    return ScFoundationCheckpoint(config=config, state_dict=state_dict, version=version)


def _layer_count(state_dict: Mapping[str, Any], *patterns: re.Pattern) -> int:
    layers = {int(m.group(1)) for k in state_dict for p in patterns if (m := p.match(k))}
    return max(layers) + 1 if layers else 0


def _shape_kwargs(state_dict: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """Return the module keywords that the tensor shapes determine (only those found)."""
    out: dict[str, Any] = {}
    if _PROJ in state_dict:
        out["decoder_nb_features"] = int(state_dict[_PROJ].shape[0])
    if _TO_Q + ".weight" in state_dict:
        out["decoder_qkv_bias"] = _TO_Q + ".bias" in state_dict
    return out


def _config_from_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """Infer an official-style flat config from the shapes of a bare state dict."""
    required = ("pos_emb.weight", "token_emb.emb.weight", "decoder_embed.weight", _PROJ)
    absent = [k for k in required if k not in state_dict]
    if absent:
        raise KeyError(
            f"Not an scFoundation (mae_autobin) state dict: missing {', '.join(absent)} (it has "
            f"{len(state_dict)} keys, e.g. {', '.join(list(state_dict)[:5])})."
        )
    rows, enc_dim = state_dict["pos_emb.weight"].shape
    seq_len = int(rows) - 1
    linear1 = next(
        (
            v
            for k, v in state_dict.items()
            if k.startswith("encoder.") and k.endswith("linear1.weight")
        ),
        None,
    )
    nb_features, dim_head = state_dict[_PROJ].shape
    dec_dim = int(state_dict["decoder_embed.weight"].shape[0])
    inner = int(state_dict[_TO_Q + ".weight"].shape[0]) if _TO_Q + ".weight" in state_dict else 0
    w1 = state_dict.get("decoder.performer.net.layers.0.1.fn.fn.w1.weight")
    return {
        "model": _MODEL,
        "model_type": _MODEL,
        "seq_len": seq_len,
        "gene_num": seq_len,
        "bin_num": int(state_dict["token_emb.emb.weight"].shape[0]),
        "encoder": {
            "hidden_dim": int(enc_dim),
            "depth": _layer_count(state_dict, _OFFICIAL_LAYER, _OUR_LAYER),
            "heads": None,
            "seq_len": seq_len,
            "module_type": "transformer",
            "norm_first": False,
            **({} if linear1 is None else {"dim_feedforward": int(linear1.shape[0])}),
        },
        "decoder": {
            "hidden_dim": dec_dim,
            "depth": _layer_count(state_dict, _DECODER_LAYER),
            "heads": inner // int(dim_head),
            "dim_head": int(dim_head),
            "seq_len": seq_len,
            "module_type": "performer",
            "norm_first": False,
            "nb_features": int(nb_features),
            "ff_mult": 4 if w1 is None else int(w1.shape[0]) // dec_dim,
        },
    }


_PART_FIELDS = {
    **dict.fromkeys(
        ("hidden_dim", "depth", "heads", "dim_feedforward", "ff_mult", "dim_head", "nb_features"),
        "positive int",
    ),
    **dict.fromkeys(("dropout", "ff_dropout", "attn_dropout"), "probability"),
    "layer_norm_eps": "positive number",
}


def scfoundation_module_kwargs(config: Mapping[str, Any], **overrides: Any) -> dict[str, Any]:
    """Keyword arguments of :class:`~cellformers.module.SCFoundationModule` from a checkpoint config.

    Parameters
    ----------
    config
        The flat config (:attr:`ScFoundationCheckpoint.config`) or the official nested one.
    **overrides
        Replace or add keywords (e.g. ``stabilizer="batch"``, ``encoder_heads`` for a bare
        state dict, ``expression_head=False``).

    Returns
    -------
    Keyword arguments: ``n_genes = seq_len - 2``, the encoder and decoder sizes, the value
    embedding's ``bin_num`` / ``bin_alpha`` and the pretraining settings the config holds
    (``value_mask_prob``, ``zero_mask_prob``, ``mae_encoder_max_seq_len``).

    """
    flat = flatten_scfoundation_config(config)
    model = flat.get("model", flat.get("model_type", _MODEL))
    if model != _MODEL:
        raise ValueError(
            f"The checkpoint is a {model!r} model; only {_MODEL!r} (scFoundation) is supported."
        )
    for key in ("encoder", "decoder"):
        if not isinstance(flat.get(key), Mapping):
            raise KeyError(
                f"The scFoundation config has no {key!r} settings (it holds: "
                f"{', '.join(map(str, flat))})."
            )
    enc, dec = flat["encoder"], flat["decoder"]
    if enc.get("module_type", "transformer") != "transformer":
        raise ValueError(
            f"The encoder is a {enc['module_type']!r} module; only 'transformer' is supported."
        )
    if dec.get("module_type", "performer") != "performer":
        raise ValueError(
            f"The decoder is a {dec['module_type']!r} module; only 'performer' is supported."
        )
    seq_len = flat.get("seq_len", flat.get("gene_num"))
    if seq_len is None:
        raise KeyError("The scFoundation config has no 'seq_len' (n_genes + 2).")
    source = "The scFoundation config"
    check_config_fields(
        {"seq_len": seq_len, **{k: flat.get(k) for k in ("bin_num", "bin_alpha")}},
        {"seq_len": "positive int", "bin_num": "positive int", "bin_alpha": "number"},
        source=source,
    )
    for part, fields, needed in (
        ("encoder", enc, ("hidden_dim", "depth")),
        ("decoder", dec, ("hidden_dim", "depth", "heads")),
    ):
        absent = [k for k in needed if fields.get(k) is None]
        if absent:
            raise KeyError(f"{source} lacks {part} settings {absent}.")
        check_config_fields(fields, _PART_FIELDS, source=f"{source} ({part} settings)")
    if enc.get("heads") is not None and enc["hidden_dim"] % enc["heads"]:
        raise ValueError(
            f"{source}: encoder hidden_dim {enc['hidden_dim']} is not divisible by heads "
            f"{enc['heads']}."
        )
    enc_dim = int(enc["hidden_dim"])
    kwargs: dict[str, Any] = {
        "n_genes": int(seq_len) - 2,
        "bin_num": int(flat.get("bin_num", 100)),
        "bin_alpha": float(flat.get("bin_alpha", 1.0)),
        "encoder_dim": enc_dim,
        "encoder_depth": int(enc["depth"]),
        "encoder_heads": enc.get("heads"),
        "encoder_d_hid": int(enc.get("dim_feedforward", enc_dim * int(enc.get("ff_mult", 4)))),
        "encoder_dropout": float(enc.get("dropout", 0.1)),
        "encoder_activation": enc.get("activation", "relu"),
        "encoder_norm_first": bool(enc.get("norm_first", False)),
        "layer_norm_eps": float(enc.get("layer_norm_eps", 1e-5)),
        "decoder_dim": int(dec["hidden_dim"]),
        "decoder_depth": int(dec["depth"]),
        "decoder_heads": int(dec["heads"]),
        "decoder_dim_head": int(dec.get("dim_head", 64)),
        "decoder_ff_mult": int(dec.get("ff_mult", 4)),
        "decoder_nb_features": dec.get("nb_features"),
        "decoder_qkv_bias": bool(dec.get("qkv_bias", True)),
        "decoder_ff_dropout": float(dec.get("ff_dropout", 0.0)),
        "decoder_attn_dropout": float(dec.get("attn_dropout", 0.0)),
    }
    for ours, theirs in (
        ("value_mask_prob", "value_mask_prob"),
        ("zero_mask_prob", "zero_mask_prob"),
        ("max_encoder_len", "mae_encoder_max_seq_len"),
        ("downsample_prob", "downsample_prob"),
        ("min_depth_fraction", "min_depth_fraction"),
        ("target_sum", "target_sum"),
    ):
        if flat.get(theirs) is not None:
            kwargs[ours] = flat[theirs]
    kwargs.update(overrides)
    if kwargs.get("encoder_heads") is None:
        raise ValueError(
            "The number of encoder heads is unknown (a bare state dict does not fix it); pass "
            "encoder_heads=... (12 for the published model)."
        )
    kwargs["encoder_heads"] = int(kwargs["encoder_heads"])
    return kwargs


# ---------------------------------------------------------------------------------- loading
def _to_module_keys(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {
        _OFFICIAL_LAYER.sub(r"encoder.layers.\1.", k): v
        for k, v in _strip_prefix(state_dict).items()
    }


def _to_official_key(key: str) -> str:
    return _OUR_LAYER.sub(r"encoder.transformer_encoder.\1.", key)


def _explain(
    module: nn.Module, missing: list[str], unexpected: list[str], mismatched: list[str]
) -> list[str]:
    hints: list[str] = []

    def add(h: str) -> None:
        if h not in hints:
            hints.append(h)

    if any(k.startswith("to_final.") for k in missing):
        add(
            "to_final.*: the checkpoint has no expression head; build the module with "
            "expression_head=False"
        )
    if any(k.startswith("to_final.") for k in unexpected):
        add(
            "to_final.*: the checkpoint has the expression head; build the module with "
            "expression_head=True (every published sub-checkpoint has it)"
        )
    if any(k.startswith(_PREFIX) for k in unexpected):
        add("model.*: only some keys carry the 'model.' prefix; the state dict is mixed up")

    def bias_only(keys: list[str]) -> bool:
        # a to_q bias without its weight on the same side: the layer exists on both sides
        return any(
            k.endswith("to_q.bias") and k[: -len("bias")] + "weight" not in keys for k in keys
        )

    if bias_only(missing):
        add("to_q/k/v.bias: the checkpoint has no query/key/value biases; decoder_qkv_bias=False")
    if bias_only(unexpected):
        add("to_q/k/v.bias: the checkpoint has query/key/value biases; decoder_qkv_bias=True")
    for side, keys in (("missing", missing), ("unexpected", unexpected)):
        enc = sorted({int(m.group(1)) for k in keys if (m := _OUR_LAYER.match(k))})
        if enc:
            add(
                f"encoder layers {enc} are {side}: encoder_depth differs from the checkpoint "
                f"(module: {module.encoder_depth})"
            )
        dec = sorted({int(m.group(1)) for k in keys if (m := _DECODER_LAYER.match(k))})
        if dec:
            add(
                f"decoder layers {dec} are {side}: decoder_depth differs from the checkpoint "
                f"(module: {module.decoder_depth})"
            )
    for item in mismatched:
        key = item.split(":")[0]
        if key == "pos_emb.weight":
            add(
                f"{key}: the gene list differs: the module has n_genes={module.n_genes} "
                "(n_genes + 3 position rows; 19,264 genes for the published model), or "
                "encoder_dim differs"
            )
        elif key.startswith("token_emb."):
            add("token_emb.*: bin_num or encoder_dim differs from the checkpoint")
        elif key.endswith("projection_matrix"):
            add(
                "decoder projection_matrix: decoder_dim_head or decoder_nb_features differs "
                "from the checkpoint"
            )
        elif re.search(r"\.to_(q|k|v|out)\.", key):
            add(
                "decoder attention (to_q/to_k/to_v/to_out): decoder_heads x decoder_dim_head "
                f"differs from the checkpoint (module: {module.decoder_heads} x "
                f"{module.decoder_dim_head})"
            )
        elif ".fn.fn.w" in key:
            add("decoder feed-forward (w1/w2): decoder_ff_mult or decoder_dim differs")
        elif "linear1" in key or "linear2" in key:
            add(
                "encoder feed-forward (linear1/linear2): encoder_d_hid differs from the "
                f"checkpoint (module: {module.encoder_d_hid})"
            )
        elif key.startswith("decoder_embed."):
            add("decoder_embed: encoder_dim or decoder_dim differs from the checkpoint")
    if mismatched and not hints:
        add("shape mismatches: encoder_dim or decoder_dim differs from the checkpoint")
    return hints


def load_scfoundation_state_dict(
    module: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    *,
    init_missing_head: bool = False,
) -> nn.Module:
    """Load official scFoundation weights into an :class:`~cellformers.module.SCFoundationModule`, strictly.

    The ``model.`` prefix is stripped and ``encoder.transformer_encoder.{i}.`` is renamed to
    ``encoder.layers.{i}.``; every other key must match in name and shape, including the
    decoder's random features (``projection_matrix``, loaded, never redrawn) and the
    ``calls_since_last_redraw`` counter.

    Parameters
    ----------
    module
        The network, e.g. built with ``SCFoundationModule(**ckpt.module_kwargs())``.
    state_dict
        Weights under the official key names (:attr:`ScFoundationCheckpoint.state_dict`), or
        the module's own names.
    init_missing_head
        Allow the cell classification head (``classifier.*``, not part of the published
        networks) to be absent from the weights; it keeps its fresh initialisation.

    Returns
    -------
    The module, with weights loaded.

    Raises
    ------
    RuntimeError
        Listing missing keys, unexpected keys and shape mismatches with their likely meaning
        (gene-list size, depths, heads, expression head).

    """
    if not isinstance(state_dict, Mapping):
        raise TypeError(
            f"Expected a state dict (mapping of key to tensor), got {type(state_dict)!r}."
        )
    given = _to_module_keys(state_dict)
    ours = module.state_dict()
    expected = {k: v.shape for k, v in ours.items()}
    missing, unexpected, mismatched = compare_keys(expected, given, name=_to_official_key)
    head_only = init_missing_head and not any(k.startswith("classifier.") for k in given)
    if head_only:
        missing = [k for k in missing if not k.startswith("classifier.")]
    if missing or unexpected or mismatched:
        hints = _explain(module, missing, unexpected, mismatched)
        raise_key_mismatch(
            "scFoundation",
            module,
            [_to_official_key(k) for k in missing],
            [_to_official_key(k) for k in unexpected],
            mismatched,
            hints,
        )
    check_weights(given, module.state_dict(), source="The scFoundation weights")
    module.load_state_dict(given, strict=not head_only)
    return module


# ---------------------------------------------------------------------------------- writing
def scfoundation_config(module: nn.Module) -> dict[str, Any]:
    """Describe a module by a flat official-style config (as ``convertconfig`` returns it).

    Parameters
    ----------
    module
        An :class:`~cellformers.module.SCFoundationModule`.

    Returns
    -------
    The published model's keys (``seq_len``, ``gene_num``, ``bin_num``, ``encoder``,
    ``decoder``, masking settings …); settings the official code does not read are added only
    where they differ from its defaults (``dim_feedforward``, ``nb_features`` …) or are
    cellformers' own pretraining settings (``downsample_prob``, ``min_depth_fraction``,
    ``target_sum``).

    """
    seq_len = module.n_genes + 2
    encoder: dict[str, Any] = {
        "hidden_dim": module.encoder_dim,
        "depth": module.encoder_depth,
        "heads": module.encoder_heads,
        "dim_head": module.encoder_dim // module.encoder_heads,
        "seq_len": seq_len,
        "module_type": "transformer",
        "norm_first": module.encoder_norm_first,
    }
    if module.encoder_d_hid != 4 * module.encoder_dim:
        encoder["dim_feedforward"] = module.encoder_d_hid
    for key, value, default in (
        ("dropout", module.encoder_dropout, 0.1),
        ("activation", module.encoder_activation, "relu"),
        ("layer_norm_eps", module.layer_norm_eps, 1e-5),
    ):
        if value != default:
            encoder[key] = value
    decoder: dict[str, Any] = {
        "hidden_dim": module.decoder_dim,
        "depth": module.decoder_depth,
        "heads": module.decoder_heads,
        "dim_head": module.decoder_dim_head,
        "seq_len": seq_len,
        "module_type": "performer",
        "norm_first": False,
    }
    if module.decoder_nb_features != default_nb_features(module.decoder_dim_head):
        decoder["nb_features"] = module.decoder_nb_features
    for key, value, default in (
        ("ff_mult", module.decoder_ff_mult, 4),
        ("qkv_bias", module.decoder_qkv_bias, True),
        ("ff_dropout", module.decoder_ff_dropout, 0.0),
        ("attn_dropout", module.decoder_attn_dropout, 0.0),
    ):
        if value != default:
            decoder[key] = value
    return {
        "model": _MODEL,
        "seq_len": seq_len,
        "gene_num": seq_len,
        "n_class": 104,
        "pad_token_id": 103,
        "mask_token_id": 102,
        "bin_num": module.bin_num,
        "bin_alpha": module.bin_alpha,
        "rawcount": True,
        "bin_type": "auto_bin",
        "mask_gene_name": False,
        "encoder": encoder,
        "decoder": decoder,
        "value_mask_prob": module.value_mask_prob,
        "zero_mask_prob": module.zero_mask_prob,
        "replace_prob": 0.8,
        "random_token_prob": 0.1,
        "mask_prob": module.value_mask_prob,
        "mask_ignore_token_ids": [0],
        "decoder_add_zero": True,
        "mae_encoder_max_seq_len": module.max_encoder_len,
        "downsample_prob": module.downsample_prob,
        "min_depth_fraction": module.min_depth_fraction,
        "target_sum": module.target_sum,
    }


def _nest(flat: Mapping[str, Any]) -> dict[str, Any]:
    model = flat.get("model", _MODEL)
    net = {
        k: v for k, v in flat.items() if k not in _DATASET_KEYS and k not in ("model", "model_type")
    }
    data = {k: v for k, v in flat.items() if k in _DATASET_KEYS}
    return {"model": model, "model_config": {model: net}, "dataset_config": {"rnaseq": data}}


def save_scfoundation_checkpoint(
    modules: nn.Module | Mapping[str, nn.Module],
    path: str | os.PathLike,
    *,
    config: Mapping[str, Any] | None = None,
) -> Path:
    """Write modules in the official ``models.ckpt`` layout.

    Each sub-checkpoint is ``{"config": {"model": "mae_autobin", "model_config":
    {"mae_autobin": {...}}, "dataset_config": {"rnaseq": {...}}}, "state_dict":
    OrderedDict}`` with the official key names and the ``model.`` prefix, so the official
    ``load_model_frommmf`` and :func:`read_scfoundation_checkpoint` read it. Which flat keys go
    to ``model_config`` and which to ``dataset_config`` follows the published settings'
    meaning; both readers merge them again.

    Parameters
    ----------
    modules
        One :class:`~cellformers.module.SCFoundationModule`, written under all three versions
        (``"cell"``, ``"rde"``, ``"gene"``; the tensors are shared, so the file holds them
        once), or a dict from version to module.
    path
        File to write.
    config
        Entries added to (or replacing) every sub-checkpoint's flat config
        (:func:`scfoundation_config`) before it is nested.

    Returns
    -------
    The file.

    """
    if isinstance(modules, nn.Module):
        modules = dict.fromkeys(VERSIONS, modules)
    if not isinstance(modules, Mapping) or not modules:
        raise ValueError("modules must be a module or a non-empty dict from version to module.")
    unknown = [v for v in modules if v not in VERSIONS]
    if unknown:
        raise ValueError(f"Unknown versions {unknown}; use {VERSIONS}.")
    cache: dict[int, OrderedDict] = {}
    out: dict[str, Any] = {}
    for version, module in modules.items():
        if id(module) not in cache:
            cache[id(module)] = OrderedDict(
                (_PREFIX + _to_official_key(k), v.detach().cpu())
                for k, v in module.state_dict().items()
            )
        flat = scfoundation_config(module)
        if config:
            flat.update(config)
        out[version] = {"config": _nest(flat), "state_dict": cache[id(module)]}
    with atomic_write(
        path, folder=False, overwrite=True
    ) as tmp:  # an interrupted write leaves the previous file
        torch.save(out, tmp)
    return Path(path)
