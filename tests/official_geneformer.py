"""Random-weight Geneformer checkpoints in the published folder layouts, built with ``transformers``.

Geneformer is a stock Hugging Face BERT, so the reference implementation is ``transformers``'
``BertForMaskedLM`` / ``BertForSequenceClassification``. The configurations keep every official
setting of the two families except the sizes, which are scaled down for speed:

* V1 (2021-22 models, e.g. ``Geneformer-V1-10M``): relu, ``layer_norm_eps`` 1e-12, dropout
  0.02, 2048 positions, no special tokens besides ``<pad>``/``<mask>``; weights written by
  transformers 4.6 as ``pytorch_model.bin`` with the legacy ``bert.embeddings.position_ids``
  buffer and the tied ``cls.predictions.decoder.*`` keys.
* V2 (Dec 2024): relu, dropout 0.1, 4096 positions, ``classifier_dropout: null``; weights in
  ``model.safetensors`` without the tied decoder keys and without ``position_ids``.

``VARIANT_CONFIGS`` holds the real sizes of the published variants (spec table 1.1) with the
parameter counts computed from the published file sizes.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

_COMMON = {
    "model_type": "bert",
    "architectures": ["BertForMaskedLM"],
    "hidden_act": "relu",
    "layer_norm_eps": 1e-12,
    "initializer_range": 0.02,
    "position_embedding_type": "absolute",
    "type_vocab_size": 2,
    "pad_token_id": 0,
    "use_cache": True,
}
_V1 = {
    **_COMMON,
    "hidden_dropout_prob": 0.02,
    "attention_probs_dropout_prob": 0.02,
    "max_position_embeddings": 2048,
    "vocab_size": 25426,
    "gradient_checkpointing": False,
    "transformers_version": "4.6.0",
}
_V2 = {
    **_COMMON,
    "hidden_dropout_prob": 0.1,
    "attention_probs_dropout_prob": 0.1,
    "max_position_embeddings": 4096,
    "vocab_size": 20275,
    "classifier_dropout": None,
    "torch_dtype": "float32",
    "transformers_version": "4.44.2",
}


def _sizes(hidden, layers, heads, intermediate):
    return {
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "intermediate_size": intermediate,
    }


#: The published variants' config.json values (spec 1.1).
VARIANT_CONFIGS: dict[str, dict] = {
    "Geneformer-V1-10M": {**_V1, **_sizes(256, 6, 4, 512)},
    "gf-12L-30M-i2048": {**_V1, **_sizes(512, 12, 8, 1024)},
    "Geneformer-V2-104M": {**_V2, **_sizes(768, 12, 12, 3072)},
    "Geneformer-V2-316M": {**_V2, **_sizes(1152, 18, 18, 4608)},
}

#: Parameter counts of the variants (spec 1.1, consistent with the weight file sizes).
VARIANT_PARAMS: dict[str, int] = {
    "Geneformer-V1-10M": 10_288_722,
    "gf-12L-30M-i2048": 39_591_250,
    "Geneformer-V2-104M": 104_386_867,
    "Geneformer-V2-316M": 316_354_867,
}

#: Tiny members of the two families, every official setting kept except the sizes.
TINY = {
    "V1": {**_V1, **_sizes(32, 3, 4, 64), "vocab_size": 97},
    "V2": {**_V2, **_sizes(48, 3, 6, 96), "vocab_size": 101},
}
TINY["V1"].pop("transformers_version")
TINY["V2"].pop("transformers_version")


def bert_config(family: str, *, num_labels: int | None = None, attn: str = "eager", **overrides):
    """A ``transformers.BertConfig`` of the tiny ``family`` (``"V1"`` or ``"V2"``)."""
    from transformers import BertConfig

    values = {**TINY[family], **overrides}
    values.pop("model_type", None)
    if num_labels is not None:
        values["architectures"] = ["BertForSequenceClassification"]
        values["num_labels"] = num_labels
        values["problem_type"] = "single_label_classification"
    return BertConfig(**values, attn_implementation=attn)


def hf_model(family: str, *, num_labels: int | None = None, seed: int = 0, attn: str = "eager"):
    """A random ``BertForMaskedLM`` (or ``BertForSequenceClassification`` with ``num_labels``).

    Every parameter is perturbed away from the BERT initialisation (biases and layer-norm shifts
    non-zero, layer-norm scales not 1) so that a missed term shows; the tied decoder stays tied.
    """
    from transformers import BertForMaskedLM, BertForSequenceClassification

    torch.manual_seed(seed)
    config = bert_config(family, num_labels=num_labels, attn=attn)
    cls = BertForMaskedLM if num_labels is None else BertForSequenceClassification
    model = cls(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(torch.randn_like(p) * (0.2 if "LayerNorm" in name else 0.05))
    return model.eval()


def write_v1_folder(path, model) -> Path:
    """Write ``model`` as transformers 4.6 did: ``config.json`` + ``pytorch_model.bin``.

    The file holds every state-dict key including the tied ``cls.predictions.decoder.*`` and
    the (then persistent) ``bert.embeddings.position_ids`` buffer.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(path)
    config = json.loads((path / "config.json").read_text())
    config.update(gradient_checkpointing=False, transformers_version="4.6.0.dev0")
    (path / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    n_pos = model.config.max_position_embeddings
    state = {
        "bert.embeddings.position_ids": torch.arange(n_pos).expand((1, -1)).clone(),
        **state,
    }
    torch.save(state, path / "pytorch_model.bin")
    return path


def write_v2_folder(path, model) -> Path:
    """Write ``model`` as the V2 folders: ``save_pretrained`` (``model.safetensors``)."""
    path = Path(path)
    model.save_pretrained(path)
    (path / "generation_config.json").write_text(json.dumps({"pad_token_id": 0}) + "\n")
    return path


def official_folder(path, family: str, *, num_labels: int | None = None, seed: int = 0):
    """Build a random tiny model of ``family`` and write it in that family's layout.

    Returns ``(folder, model)``.
    """
    model = hf_model(family, num_labels=num_labels, seed=seed)
    write = write_v1_folder if family == "V1" else write_v2_folder
    return write(path, model), model


def random_batch(lengths, vocab_size: int, *, seed: int = 0, first_special: int = 2):
    """Right-padded ``input_ids`` (pad 0), ``lengths`` and the Hugging Face ``attention_mask``."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.as_tensor(lengths)
    L = int(lengths.max())
    ids = torch.randint(first_special, vocab_size, (len(lengths), L), generator=g)
    attention_mask = torch.arange(L)[None, :] < lengths[:, None]
    ids = ids.masked_fill(~attention_mask, 0)
    return ids, lengths, attention_mask.long()
