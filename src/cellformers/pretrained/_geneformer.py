"""Reader and writer for official Geneformer checkpoints (Hugging Face BERT folders).

A Geneformer checkpoint is a Hugging Face ``BertForMaskedLM`` (pretrained models) or
``BertForSequenceClassification`` (fine-tuned cell classifiers) folder: ``config.json`` plus
``model.safetensors`` (V2, and V1 re-uploads) or ``pytorch_model.bin`` (V1, written by
transformers 4.6). The weights are read without executing pickled code and converted between
Hugging Face's parameter names and :class:`~cellformers.module.GeneformerModule`'s.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .._io import (
    atomic_write,
    check_config_fields,
    check_weights,
    file_inside,
    read_json,
    read_safetensors,
    read_torch_file,
)
from ._utils import compare_keys, raise_key_mismatch

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "model.safetensors"
PYTORCH_FILE = "pytorch_model.bin"

#: Architectures whose weights map onto :class:`~cellformers.module.GeneformerModule`.
SUPPORTED_ARCHITECTURES: tuple[str, ...] = (
    "BertForMaskedLM",
    "BertForSequenceClassification",
    "BertModel",
)

#: Keys Hugging Face accepts and ignores (buffers and the tied decoder bias).
_IGNORED_KEYS: frozenset[str] = frozenset(
    {
        "bert.embeddings.position_ids",
        "bert.embeddings.token_type_ids",
        "cls.predictions.decoder.bias",
    }
)
_DECODER_WEIGHT = "cls.predictions.decoder.weight"
_WORD_EMBEDDINGS = "bert.embeddings.word_embeddings.weight"

#: BertConfig defaults (used when config.json omits a value, as Hugging Face does).
_BERT_DEFAULTS: dict[str, Any] = {
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1,
    "attention_probs_dropout_prob": 0.1,
    "max_position_embeddings": 512,
    "type_vocab_size": 2,
    "initializer_range": 0.02,
    "layer_norm_eps": 1e-12,
    "pad_token_id": 0,
    "position_embedding_type": "absolute",
    "classifier_dropout": None,
}

#: BertConfig key -> GeneformerModule keyword (same name unless listed).
_CONFIG_TO_MODULE: tuple[str, ...] = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "max_position_embeddings",
    "hidden_dropout_prob",
    "attention_probs_dropout_prob",
    "layer_norm_eps",
    "type_vocab_size",
    "hidden_act",
    "pad_token_id",
    "classifier_dropout",
    "initializer_range",
)

#: Head groups: (Hugging Face key prefix, module key prefix, what it is).
_HEADS: tuple[tuple[str, str, str], ...] = (
    ("cls.predictions.", "mlm_head.", "masked-LM head"),
    ("bert.pooler.", "pooler.", "pooler"),
    ("classifier.", "classifier.", "classifier"),
)

#: Hugging Face names -> module names, outside the encoder layers.
_TOP_LEVEL: tuple[tuple[str, str], ...] = (
    ("bert.embeddings.word_embeddings.weight", "embeddings.word_embeddings.weight"),
    ("bert.embeddings.position_embeddings.weight", "embeddings.position_embeddings.weight"),
    ("bert.embeddings.token_type_embeddings.weight", "embeddings.token_type_embeddings.weight"),
    ("bert.embeddings.LayerNorm.weight", "embeddings.norm.weight"),
    ("bert.embeddings.LayerNorm.bias", "embeddings.norm.bias"),
)
_LAYER: tuple[tuple[str, str, int | None], ...] = (
    # (Hugging Face suffix, module suffix, q/k/v block of the packed projection)
    ("attention.self.query.weight", "self_attn.in_proj_weight", 0),
    ("attention.self.query.bias", "self_attn.in_proj_bias", 0),
    ("attention.self.key.weight", "self_attn.in_proj_weight", 1),
    ("attention.self.key.bias", "self_attn.in_proj_bias", 1),
    ("attention.self.value.weight", "self_attn.in_proj_weight", 2),
    ("attention.self.value.bias", "self_attn.in_proj_bias", 2),
    ("attention.output.dense.weight", "self_attn.out_proj.weight", None),
    ("attention.output.dense.bias", "self_attn.out_proj.bias", None),
    ("attention.output.LayerNorm.weight", "norm1.weight", None),
    ("attention.output.LayerNorm.bias", "norm1.bias", None),
    ("intermediate.dense.weight", "linear1.weight", None),
    ("intermediate.dense.bias", "linear1.bias", None),
    ("output.dense.weight", "linear2.weight", None),
    ("output.dense.bias", "linear2.bias", None),
    ("output.LayerNorm.weight", "norm2.weight", None),
    ("output.LayerNorm.bias", "norm2.bias", None),
)
_MLM_HEAD: tuple[tuple[str, str], ...] = (
    ("cls.predictions.bias", "mlm_head.bias"),
    ("cls.predictions.transform.dense.weight", "mlm_head.dense.weight"),
    ("cls.predictions.transform.dense.bias", "mlm_head.dense.bias"),
    ("cls.predictions.transform.LayerNorm.weight", "mlm_head.norm.weight"),
    ("cls.predictions.transform.LayerNorm.bias", "mlm_head.norm.bias"),
)
_CLASSIFIER: tuple[tuple[str, str], ...] = (
    ("bert.pooler.dense.weight", "pooler.weight"),
    ("bert.pooler.dense.bias", "pooler.bias"),
    ("classifier.weight", "classifier.weight"),
    ("classifier.bias", "classifier.bias"),
)


@dataclass
class GeneformerCheckpoint:
    """Content of a Hugging Face Geneformer checkpoint folder.

    Attributes
    ----------
    config
        The ``config.json`` content (a ``BertConfig`` dict).
    state_dict
        The weights under Hugging Face names (``bert.*``, ``cls.*``, ``classifier.*``).
    architecture
        ``"BertForMaskedLM"``, ``"BertForSequenceClassification"`` or ``"BertModel"``.
    n_labels
        Number of classes of a classification checkpoint, else 0.

    """

    config: dict[str, Any]
    state_dict: dict[str, torch.Tensor]
    architecture: str
    n_labels: int

    def module_kwargs(self) -> dict[str, Any]:
        """Keyword arguments that build a matching :class:`~cellformers.module.GeneformerModule`.

        Returns
        -------
        :func:`geneformer_module_kwargs` of :attr:`config`.

        """
        return geneformer_module_kwargs(self.config)


# ---------------------------------------------------------------------------------- reading
def read_geneformer_checkpoint(path: str | os.PathLike) -> GeneformerCheckpoint:
    """Read a Hugging Face Geneformer checkpoint folder.

    The folder holds ``config.json`` and the weights, ``model.safetensors`` (preferred when
    both exist) or ``pytorch_model.bin``, or sharded versions with their ``*.index.json``.
    ``.bin`` files are read with ``torch.load(weights_only=True)``, so no pickled code runs.

    Parameters
    ----------
    path
        The checkpoint folder (e.g. ``Geneformer-V2-104M``).

    Returns
    -------
    The checkpoint; build the network with ``GeneformerModule(**ckpt.module_kwargs())`` and load
    it with :func:`load_geneformer_state_dict`.

    """
    folder = Path(path)
    if folder.is_file() and folder.name in (CONFIG_FILE, SAFETENSORS_FILE, PYTORCH_FILE):
        folder = folder.parent
    if not folder.is_dir():
        raise FileNotFoundError(
            f"Geneformer checkpoint folder {folder} does not exist. It must hold {CONFIG_FILE} "
            f"and {SAFETENSORS_FILE} or {PYTORCH_FILE}."
        )
    present = sorted(p.name for p in folder.iterdir())
    if not (folder / CONFIG_FILE).is_file():
        raise FileNotFoundError(
            f"Geneformer checkpoint folder {folder} lacks {CONFIG_FILE} (it holds: "
            f"{', '.join(present) or 'nothing'}). Download the whole model folder."
        )
    config = read_json(folder / CONFIG_FILE, what="Geneformer configuration")
    if not isinstance(config, dict):
        raise ValueError(f"{folder / CONFIG_FILE} must hold a JSON object (a BertConfig).")
    geneformer_module_kwargs(config)  # validate before reading the weights

    state_dict = _normalize_keys(_read_weights(folder, present))
    architecture = _architecture(config, state_dict)
    n_labels = 0
    if "classifier.weight" in state_dict:
        n_labels = int(state_dict["classifier.weight"].shape[0])
        expected = _config_n_labels(config)
        if expected is not None and expected != n_labels:
            raise ValueError(
                f"{folder / CONFIG_FILE} declares {expected} labels but classifier.weight has "
                f"{n_labels} rows; the config does not belong to these weights."
            )
    return GeneformerCheckpoint(
        config=config, state_dict=state_dict, architecture=architecture, n_labels=n_labels
    )


def _read_weights(folder: Path, present: list[str]) -> dict[str, torch.Tensor]:
    if SAFETENSORS_FILE in present:
        return read_safetensors(folder / SAFETENSORS_FILE)
    if PYTORCH_FILE in present:
        return _load_bin(folder / PYTORCH_FILE)
    for index_name, loader in (
        (SAFETENSORS_FILE + ".index.json", read_safetensors),
        (PYTORCH_FILE + ".index.json", _load_bin),
    ):
        if index_name in present:
            index_file = folder / index_name
            index = read_json(index_file, what="weight index")
            weight_map = index.get("weight_map") if isinstance(index, dict) else None
            if not isinstance(weight_map, dict) or not weight_map:
                raise ValueError(f"{index_file}: field 'weight_map' is missing or empty.")
            shards = sorted(
                {file_inside(folder, s, source=index_file) for s in weight_map.values()}
            )
            absent = [s.name for s in shards if not s.is_file()]
            if absent:
                raise FileNotFoundError(
                    f"{index_file} lists weight shards that are not in the folder: "
                    f"{', '.join(absent)}."
                )
            out: dict[str, torch.Tensor] = {}
            for shard in shards:
                out.update(loader(shard))
            return out
    raise FileNotFoundError(
        f"Geneformer checkpoint folder {folder} holds no weights: expected {SAFETENSORS_FILE} or "
        f"{PYTORCH_FILE} (it holds: {', '.join(present)}). Git LFS files must be fetched, not "
        "only their pointers."
    )


def _load_bin(file: Path) -> dict[str, torch.Tensor]:
    raw = read_torch_file(file)
    if not isinstance(raw, Mapping) or not all(isinstance(v, torch.Tensor) for v in raw.values()):
        raise ValueError(f"{file} does not hold a plain state dict of tensors.")
    return dict(raw)


def _normalize_keys(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Add the ``bert.`` prefix of a bare ``BertModel`` save; nothing else is renamed."""
    if any(k.startswith("bert.") for k in state_dict) or not any(
        k.startswith("embeddings.") for k in state_dict
    ):
        return dict(state_dict)
    return {
        (f"bert.{k}" if k.startswith(("embeddings.", "encoder.", "pooler.")) else k): v
        for k, v in state_dict.items()
    }


def _architecture(config: Mapping[str, Any], state_dict: Mapping[str, torch.Tensor]) -> str:
    archs = config.get("architectures") or []
    if archs:
        return archs[0]
    if "classifier.weight" in state_dict:
        return "BertForSequenceClassification"
    if any(k.startswith("cls.predictions.") for k in state_dict):
        return "BertForMaskedLM"
    return "BertModel"


def _config_n_labels(config: Mapping[str, Any]) -> int | None:
    if isinstance(config.get("id2label"), Mapping):
        return len(config["id2label"])
    if "num_labels" in config:
        return int(config["num_labels"])
    return None


_CONFIG_FIELDS = {
    **dict.fromkeys(
        (
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "intermediate_size",
            "max_position_embeddings",
        ),
        "positive int",
    ),
    "type_vocab_size": "non-negative int",
    "pad_token_id": "non-negative int",
    "num_labels": "positive int",
    "initializer_range": "number",
    "classifier_dropout": "probability",
    "hidden_dropout_prob": "probability",
    "attention_probs_dropout_prob": "probability",
    "layer_norm_eps": "positive number",
}


def geneformer_module_kwargs(config: Mapping[str, Any]) -> dict[str, Any]:
    """Keyword arguments of :class:`~cellformers.module.GeneformerModule` from a ``BertConfig`` dict.

    Values missing from ``config`` take ``BertConfig``'s defaults, as in Hugging Face.
    ``BertForSequenceClassification`` configs give ``n_labels`` (from ``id2label``) and no
    masked-LM head; the others give the masked-LM head and no classifier.

    Parameters
    ----------
    config
        The ``config.json`` content.

    Returns
    -------
    ``{"vocab_size": ..., "hidden_size": ..., ..., "mlm_head": ..., "n_labels": ...}``.

    Raises
    ------
    ValueError
        For a model that is not a BERT encoder or uses a setting the module does not implement.

    """
    if not isinstance(config, Mapping):
        raise TypeError(f"config must be a mapping (config.json content), got {type(config)!r}.")
    model_type = config.get("model_type", "bert")
    if model_type != "bert":
        raise ValueError(
            f"config.json has model_type={model_type!r}; Geneformer checkpoints are BERT "
            "(model_type 'bert')."
        )
    archs = config.get("architectures") or ["BertForMaskedLM"]
    unsupported = [a for a in archs if a not in SUPPORTED_ARCHITECTURES]
    if unsupported:
        hint = (
            " (token classification, e.g. Geneformer's gene classifier, is not implemented)"
            if "BertForTokenClassification" in unsupported
            else ""
        )
        raise ValueError(
            f"config.json has architectures {unsupported}; supported are "
            f"{list(SUPPORTED_ARCHITECTURES)}{hint}."
        )
    if "vocab_size" not in config:
        raise KeyError("config.json lacks 'vocab_size'; is it a Geneformer (BERT) config?")
    settings = {**_BERT_DEFAULTS, **{k: v for k, v in config.items() if v is not None}}
    check_config_fields(settings, _CONFIG_FIELDS, source=CONFIG_FILE)
    if "classifier_dropout" in config:
        settings["classifier_dropout"] = config["classifier_dropout"]
    problems = []
    if settings["position_embedding_type"] != "absolute":
        problems.append(
            f"position_embedding_type={settings['position_embedding_type']!r} (only 'absolute')"
        )
    if settings["hidden_act"] not in ("relu", "gelu"):
        problems.append(f"hidden_act={settings['hidden_act']!r} (only 'relu' or 'gelu')")
    for flag in ("is_decoder", "add_cross_attention"):
        if settings.get(flag):
            problems.append(f"{flag}=true (only bidirectional encoders)")
    if settings["hidden_size"] % settings["num_attention_heads"]:
        problems.append(
            f"hidden_size {settings['hidden_size']} not divisible by num_attention_heads "
            f"{settings['num_attention_heads']}"
        )
    classification = archs[0] == "BertForSequenceClassification"
    problem_type = settings.get("problem_type")
    if classification and problem_type not in (None, "single_label_classification"):
        problems.append(f"problem_type={problem_type!r} (only single_label_classification)")
    if problems:
        raise ValueError("Unsupported BERT settings in config.json: " + "; ".join(problems) + ".")

    kwargs: dict[str, Any] = {"vocab_size": int(settings["vocab_size"])}
    for key in _CONFIG_TO_MODULE:
        kwargs[key] = settings[key]
    for key in (
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "intermediate_size",
        "max_position_embeddings",
        "type_vocab_size",
        "pad_token_id",
    ):
        kwargs[key] = int(kwargs[key])
    for key in (
        "hidden_dropout_prob",
        "attention_probs_dropout_prob",
        "layer_norm_eps",
        "initializer_range",
    ):
        kwargs[key] = float(kwargs[key])
    if classification:
        n_labels = _config_n_labels(config)
        kwargs["n_labels"] = 2 if n_labels is None else n_labels  # BertConfig's default
        kwargs["mlm_head"] = False
    else:
        kwargs["n_labels"] = 0
        kwargs["mlm_head"] = archs[0] == "BertForMaskedLM"
    return kwargs


# ---------------------------------------------------------------------------------- key mapping
def _key_map(module: torch.nn.Module) -> Iterator[tuple[str, str, int | None]]:
    """``(Hugging Face key, module key, q/k/v block or None)`` in Hugging Face's order."""
    for hf, ours in _TOP_LEVEL:
        yield hf, ours, None
    for i in range(len(module.encoder.layers)):
        for hf, ours, block in _LAYER:
            yield f"bert.encoder.layer.{i}.{hf}", f"encoder.layers.{i}.{ours}", block
    if module.pooler is not None:
        for hf, ours in _CLASSIFIER[:2]:
            yield hf, ours, None
    if module.mlm_head is not None:
        for hf, ours in _MLM_HEAD:
            yield hf, ours, None
    if module.classifier is not None:
        for hf, ours in _CLASSIFIER[2:]:
            yield hf, ours, None


def geneformer_state_dict_to_hf(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Return the module's weights under Hugging Face BERT names.

    The layout of the V2 ``model.safetensors`` files: no tied ``cls.predictions.decoder.*``
    keys and no ``position_ids`` buffer. Tensors are detached copies.

    Parameters
    ----------
    module
        A :class:`~cellformers.module.GeneformerModule`.

    Returns
    -------
    ``{hf_key: tensor}``.

    """
    ours = module.state_dict()
    out: dict[str, torch.Tensor] = {}
    for hf, key, block in _key_map(module):
        value = ours[key]
        if block is not None:
            value = value.chunk(3, dim=0)[block]
        out[hf] = value.detach().clone()
    return out


_LAYER_RE = re.compile(r"^bert\.encoder\.layer\.(\d+)\.")


def _explain(
    module: torch.nn.Module, missing: list[str], unexpected: list[str], mismatched: list[str]
) -> list[str]:
    hints: list[str] = []

    def add(h: str) -> None:
        if h not in hints:
            hints.append(h)

    def any_prefix(keys: list[str], prefix: str) -> bool:
        return any(k.startswith(prefix) for k in keys)

    if any_prefix(unexpected, "classifier."):
        add(
            "classifier.*: the checkpoint is a fine-tuned BertForSequenceClassification; build "
            "the module with n_labels = rows of classifier.weight (geneformer_module_kwargs does)"
        )
    elif any_prefix(unexpected, "bert.pooler."):
        add("bert.pooler.*: the checkpoint has a pooler; build the module with n_labels > 0")
    if any_prefix(missing, "bert.pooler.") or any_prefix(missing, "classifier."):
        add(
            "bert.pooler.* / classifier.*: the checkpoint has no classification head (a "
            "pretrained BertForMaskedLM); pass init_missing_head=True to start it from a fresh "
            "initialisation, as BertForSequenceClassification.from_pretrained does"
        )
    if any_prefix(missing, "cls.predictions."):
        add(
            "cls.predictions.*: the checkpoint has no masked-LM head (e.g. a fine-tuned "
            "classifier); build the module with mlm_head=False, or pass init_missing_head=True"
        )
    if any_prefix(unexpected, "cls.predictions."):
        add("cls.predictions.*: the checkpoint has a masked-LM head; build with mlm_head=True")
    if any_prefix(unexpected, "cls.seq_relationship."):
        add("cls.seq_relationship.*: a next-sentence head (BertForPreTraining), not supported")
    if any(k.startswith("module.") for k in unexpected):
        add("module.*: a DDP-wrapped save; strip the 'module.' prefix")
    for side, keys in (("missing", missing), ("unexpected", unexpected)):
        layers = {int(m.group(1)) for k in keys if (m := _LAYER_RE.match(k))}
        if layers:
            add(
                f"encoder layers {sorted(layers)} are {side}: num_hidden_layers differs from the "
                "checkpoint (use its config.json)"
            )
    for item in mismatched:
        key = item.split(":")[0]
        if key == _WORD_EMBEDDINGS:
            add(f"{key}: vocab_size or hidden_size differs from the checkpoint")
        elif key == "bert.embeddings.position_embeddings.weight":
            add(f"{key}: max_position_embeddings differs from the checkpoint")
        elif key.startswith("classifier."):
            add("classifier.*: n_labels differs from the checkpoint")
        elif "intermediate.dense" in key or ".output.dense.weight" in key:
            add(
                "encoder feed-forward weights: intermediate_size (or hidden_size) differs from "
                "the checkpoint (use its config.json)"
            )
    if mismatched and not hints:
        add("shape mismatches: hidden_size differs from the checkpoint (use its config.json)")
    return hints


def load_geneformer_state_dict(
    module: torch.nn.Module,
    hf_state_dict: Mapping[str, torch.Tensor],
    *,
    init_missing_head: bool = False,
) -> torch.nn.Module:
    """Load Hugging Face BERT weights into a :class:`~cellformers.module.GeneformerModule`, strictly.

    Follows Hugging Face's rules: ``bert.embeddings.position_ids``,
    ``bert.embeddings.token_type_ids`` and ``cls.predictions.decoder.bias`` (tied to
    ``cls.predictions.bias``) are ignored; ``cls.predictions.decoder.weight`` is tied to the word
    embeddings, so when present it must equal them. Query, key and value are packed into
    ``self_attn.in_proj_weight``. Any other missing or unexpected key, or a shape mismatch, is an
    error that names the keys and what they usually mean.

    Parameters
    ----------
    module
        The network, e.g. built with ``GeneformerModule(**geneformer_module_kwargs(config))``.
    hf_state_dict
        Weights under Hugging Face names (:attr:`GeneformerCheckpoint.state_dict`).
    init_missing_head
        When a whole head of the module (``pooler``, ``classifier`` or ``mlm_head``) is absent
        from the checkpoint, keep its current (fresh) initialisation instead of failing, as
        ``BertForSequenceClassification.from_pretrained`` does on a pretrained checkpoint.

    Returns
    -------
    The module, with weights loaded.

    Raises
    ------
    RuntimeError
        Listing missing keys, unexpected keys and shape mismatches with their likely meaning.

    """
    if not isinstance(hf_state_dict, Mapping):
        raise TypeError(
            f"Expected a state dict (mapping of key to tensor), got {type(hf_state_dict)!r}."
        )
    hf_state_dict = _normalize_keys(hf_state_dict)
    mapping = list(_key_map(module))
    ours = module.state_dict()
    expected = {
        hf: tuple(ours[key].chunk(3)[0].shape if b is not None else ours[key].shape)
        for hf, key, b in mapping
    }

    given = {k: v for k, v in hf_state_dict.items() if k not in _IGNORED_KEYS}
    decoder = given.pop(_DECODER_WEIGHT, None)
    if decoder is not None and module.mlm_head is None:
        given[_DECODER_WEIGHT] = decoder  # reported as unexpected with the rest of the head
        decoder = None

    missing = [k for k in expected if k not in given]
    kept_heads = []
    if init_missing_head:
        for hf_prefix, _, what in _HEADS:
            head_keys = [k for k in expected if k.startswith(hf_prefix)]
            if head_keys and all(k in missing for k in head_keys):
                kept_heads.append(what)
                missing = [k for k in missing if not k.startswith(hf_prefix)]
    unexpected = [k for k in given if k not in expected]
    mismatched = compare_keys(expected, given)[2]
    if missing or unexpected or mismatched:
        hints = _explain(module, missing, unexpected, mismatched)
        raise_key_mismatch("Geneformer", module, missing, unexpected, mismatched, hints)
    if decoder is not None:
        words = given[_WORD_EMBEDDINGS]
        if decoder.shape != words.shape or not torch.equal(decoder, words):
            raise RuntimeError(
                f"{_DECODER_WEIGHT} differs from {_WORD_EMBEDDINGS}: the checkpoint's output "
                "matrix is not tied to the word embeddings, which BERT (and this module) "
                "requires."
            )

    new: dict[str, torch.Tensor] = {}
    blocks: dict[str, list[torch.Tensor | None]] = {}
    for hf, key, block in mapping:
        if hf not in given:  # a head kept at its initialisation
            new[key] = ours[key]
        elif block is None:
            new[key] = given[hf]
        else:
            blocks.setdefault(key, [None, None, None])[block] = given[hf]
    for key, parts in blocks.items():
        new[key] = torch.cat(parts, dim=0)
    check_weights(new, module.state_dict(), source="The Geneformer weights")
    module.load_state_dict(new, strict=True)
    for what in kept_heads:
        logger.info(
            "The checkpoint has no %s; it keeps its fresh initialisation and must be trained.",
            what,
        )
    return module


# ---------------------------------------------------------------------------------- writing
def geneformer_hf_config(module: torch.nn.Module) -> dict[str, Any]:
    """Build the Hugging Face ``config.json`` content describing a module.

    Parameters
    ----------
    module
        A :class:`~cellformers.module.GeneformerModule`.

    Returns
    -------
    A ``BertConfig`` dict: ``BertForSequenceClassification`` when the module has a classifier,
    ``BertForMaskedLM`` when it has only the masked-LM head, ``BertModel`` otherwise.

    """
    if module.classifier is not None:
        arch = "BertForSequenceClassification"
    elif module.mlm_head is not None:
        arch = "BertForMaskedLM"
    else:
        arch = "BertModel"
    config: dict[str, Any] = {
        "architectures": [arch],
        "attention_probs_dropout_prob": module.attention_probs_dropout_prob,
        "classifier_dropout": module.classifier_dropout_prob,
        "hidden_act": module.hidden_act,
        "hidden_dropout_prob": module.hidden_dropout_prob,
        "hidden_size": module.hidden_size,
        "initializer_range": module.initializer_range,
        "intermediate_size": module.intermediate_size,
        "layer_norm_eps": module.layer_norm_eps,
        "max_position_embeddings": module.max_position_embeddings,
        "model_type": "bert",
        "num_attention_heads": module.num_attention_heads,
        "num_hidden_layers": module.num_hidden_layers,
        "pad_token_id": module.pad_token_id,
        "position_embedding_type": "absolute",
        "torch_dtype": str(module.embeddings.word_embeddings.weight.dtype).removeprefix("torch."),
        "type_vocab_size": module.type_vocab_size,
        "use_cache": True,
        "vocab_size": module.vocab_size,
    }
    if module.classifier is not None:
        config["id2label"] = {str(i): f"LABEL_{i}" for i in range(module.n_labels)}
        config["label2id"] = {f"LABEL_{i}": i for i in range(module.n_labels)}
        config["problem_type"] = "single_label_classification"
    return config


def save_geneformer_checkpoint(
    module: torch.nn.Module,
    path: str | os.PathLike,
    config_extra: Mapping[str, Any] | None = None,
    *,
    json_files: Mapping[str, Any] | None = None,
) -> Path:
    """Write a module as a Hugging Face checkpoint folder (``config.json`` + ``model.safetensors``).

    The folder loads with ``transformers``' ``BertForMaskedLM.from_pretrained`` (or
    ``BertForSequenceClassification.from_pretrained`` for a module with a classifier) and with
    :func:`read_geneformer_checkpoint`. It is written next to ``path`` and then takes its
    place as a whole, so an interrupted write leaves the previous folder intact.

    Parameters
    ----------
    module
        A :class:`~cellformers.module.GeneformerModule`.
    path
        Folder to write (created if needed; an existing folder is replaced).
    config_extra
        Entries added to (or replacing) those of :func:`geneformer_hf_config`, e.g. label
        names in ``id2label``/``label2id``.
    json_files
        Further files to write into the folder: file name -> JSON content (e.g. the token
        dictionary).

    Returns
    -------
    The folder.

    """
    from safetensors.torch import save_file

    config = geneformer_hf_config(module)
    if config_extra:
        config.update(config_extra)
    tensors = {k: v.contiguous() for k, v in geneformer_state_dict_to_hf(module).items()}
    files = {CONFIG_FILE: config, **(json_files or {})}
    with atomic_write(path, overwrite=True) as tmp:
        save_file(tensors, tmp / SAFETENSORS_FILE, metadata={"format": "pt"})
        for name, content in files.items():
            style = {"indent": 2, "sort_keys": True} if name == CONFIG_FILE else {}
            file_inside(tmp, name, source="json_files").write_text(
                json.dumps(content, **style) + "\n", encoding="utf-8"
            )
    return Path(path)
