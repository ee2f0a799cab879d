"""Geneformer checkpoints: reading the official layouts, parity with transformers' BERT, writing."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from official_geneformer import (
    TINY,
    VARIANT_CONFIGS,
    VARIANT_PARAMS,
    hf_model,
    official_folder,
    random_batch,
    write_v1_folder,
)

from cellformers.module import GeneformerModule
from cellformers.pretrained import (
    GeneformerCheckpoint,
    geneformer_module_kwargs,
    geneformer_state_dict_to_hf,
    load_geneformer_state_dict,
    read_geneformer_checkpoint,
    save_geneformer_checkpoint,
)

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

LENGTHS = [23, 1, 9, 23, 16]  # full, single-token and padded cells
TOL = 1e-5


def _load_ours(folder):
    ckpt = read_geneformer_checkpoint(folder)
    module = GeneformerModule(**ckpt.module_kwargs())
    load_geneformer_state_dict(module, ckpt.state_dict)
    return module.eval(), ckpt


def _maxdiff(a, b, keep):
    return (a[keep] - b[keep]).abs().max().item()


@pytest.fixture(scope="module", params=["V1", "V2"])
def family(request):
    return request.param


@pytest.fixture(scope="module")
def mlm_folder(tmp_path_factory, family):
    return official_folder(tmp_path_factory.mktemp(f"mlm_{family}"), family)


# ------------------------------------------------------------------------------ variants
@pytest.mark.parametrize("name", list(VARIANT_CONFIGS))
def test_variant_configs_build_modules_of_published_size(name):
    kwargs = geneformer_module_kwargs(VARIANT_CONFIGS[name])
    assert kwargs["hidden_act"] == "relu" and kwargs["layer_norm_eps"] == 1e-12
    assert kwargs["mlm_head"] and kwargs["n_labels"] == 0
    with torch.device("meta"):  # 316M parameters: shapes only, nothing allocated
        module = GeneformerModule(**kwargs)
    assert sum(p.numel() for p in module.parameters()) == VARIANT_PARAMS[name]
    hf_keys = geneformer_state_dict_to_hf(module)
    # the V2 safetensors: params x 4 bytes, no tied decoder keys, no position_ids
    assert sum(v.numel() for v in hf_keys.values()) == VARIANT_PARAMS[name]
    assert not any("decoder" in k or "position_ids" in k for k in hf_keys)


def test_v1_10m_is_the_module_default():
    kwargs = geneformer_module_kwargs(VARIANT_CONFIGS["Geneformer-V1-10M"])
    kwargs["classifier_dropout_prob"] = kwargs.pop("classifier_dropout")
    with torch.device("meta"):
        default = GeneformerModule(kwargs.pop("vocab_size"))
    for key, value in kwargs.items():
        if key not in ("mlm_head", "n_labels"):
            assert getattr(default, key) == value, key
    assert default.mlm_head is not None and default.classifier is None


# ------------------------------------------------------------------------------ reading
def test_read_layouts(mlm_folder, family):
    folder, _ = mlm_folder
    ckpt = read_geneformer_checkpoint(folder)
    assert isinstance(ckpt, GeneformerCheckpoint)
    assert ckpt.architecture == "BertForMaskedLM" and ckpt.n_labels == 0
    assert ckpt.config["vocab_size"] == TINY[family]["vocab_size"]
    has_legacy = family == "V1"
    assert ("bert.embeddings.position_ids" in ckpt.state_dict) is has_legacy
    assert ("cls.predictions.decoder.weight" in ckpt.state_dict) is has_legacy
    kwargs = ckpt.module_kwargs()
    assert kwargs["hidden_dropout_prob"] == TINY[family]["hidden_dropout_prob"]
    assert kwargs["max_position_embeddings"] == TINY[family]["max_position_embeddings"]
    # a file inside the folder is accepted too
    weights = "pytorch_model.bin" if family == "V1" else "model.safetensors"
    assert read_geneformer_checkpoint(folder / weights).architecture == "BertForMaskedLM"


def test_hf_names_match_v2_files(tmp_path):
    folder, _ = official_folder(tmp_path / "v2", "V2")
    from safetensors.torch import load_file

    file_keys = list(load_file(folder / "model.safetensors"))
    module, _ = _load_ours(folder)
    assert sorted(geneformer_state_dict_to_hf(module)) == sorted(file_keys)


# ------------------------------------------------------------------------------ parity
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_hidden_states_and_mlm_logits_match_transformers(mlm_folder, family, attn):
    folder, model = mlm_folder
    model.set_attn_implementation(attn)
    ours, _ = _load_ours(folder)
    ids, lengths, attention_mask = random_batch(LENGTHS, TINY[family]["vocab_size"], seed=1)
    keep = attention_mask.bool()
    with torch.no_grad():
        expected = model(ids, attention_mask=attention_mask, output_hidden_states=True)
    assert len(expected.hidden_states) == ours.num_hidden_layers + 1
    with torch.inference_mode():
        for k, ref in enumerate(expected.hidden_states):
            got = ours.hidden_states(ids, lengths, n_layers=k)
            assert _maxdiff(got, ref, keep) <= TOL, k
            assert got[~keep].abs().max() == 0
        last = ours.hidden_states(ids, lengths)
        assert torch.equal(last, ours.hidden_states(ids, lengths, n_layers=-1))
        penultimate = ours.hidden_states(ids, lengths, n_layers=-2)  # official emb_layer=-1
        assert _maxdiff(penultimate, expected.hidden_states[-2], keep) <= TOL
        logits = ours.mlm_logits(last)
    assert _maxdiff(logits, expected.logits, keep) <= TOL
    assert expected.logits.abs().max() > 1.0  # not trivially small


def test_mlm_loss_matches_transformers(mlm_folder, family):
    folder, model = mlm_folder
    ours, _ = _load_ours(folder)
    ids, lengths, attention_mask = random_batch(LENGTHS, TINY[family]["vocab_size"], seed=2)
    torch.manual_seed(0)
    masked, mask = ours.random_mask(ids, lengths)
    assert mask.any()
    labels = ids.masked_fill(~mask, -100)
    with torch.no_grad():
        expected = model(masked, attention_mask=attention_mask, labels=labels).loss
        torch.manual_seed(0)
        tensors = {"input_ids": ids, "lengths": lengths}
        _, _, out = ours(tensors, compute_loss=True)
    assert abs(out.loss.item() - expected.item()) <= TOL


def test_batch_invariance(mlm_folder, family):
    folder, _ = mlm_folder
    ours, _ = _load_ours(folder)
    ids, lengths, _ = random_batch(LENGTHS, TINY[family]["vocab_size"], seed=3)
    with torch.inference_mode():
        batch = ours.hidden_states(ids, lengths, n_layers=2)
        for i, n in enumerate(lengths.tolist()):
            alone = ours.hidden_states(ids[i : i + 1, :n], lengths[i : i + 1], n_layers=2)
            assert (alone[0] - batch[i, :n]).abs().max() <= TOL
            # extra padding changes nothing either
            padded = torch.nn.functional.pad(ids[i : i + 1, :n], (0, 7))
            more = ours.hidden_states(padded, lengths[i : i + 1], n_layers=2)
            assert (more[0, :n] - alone[0]).abs().max() <= TOL


@pytest.mark.parametrize("family_cls", ["V1", "V2"])
def test_classifier_matches_transformers(tmp_path, family_cls):
    folder, model = official_folder(tmp_path / "cls", family_cls, num_labels=3, seed=4)
    ckpt = read_geneformer_checkpoint(folder)
    assert ckpt.architecture == "BertForSequenceClassification" and ckpt.n_labels == 3
    kwargs = ckpt.module_kwargs()
    assert kwargs["n_labels"] == 3 and kwargs["mlm_head"] is False
    ours = GeneformerModule(**kwargs).eval()
    load_geneformer_state_dict(ours, ckpt.state_dict)
    assert ours.objective == "classification"
    ids, lengths, attention_mask = random_batch(LENGTHS, TINY[family_cls]["vocab_size"], seed=5)
    with torch.no_grad():
        expected = model(ids, attention_mask=attention_mask, output_hidden_states=True)
    with torch.inference_mode():
        got = ours.classify(ids, lengths)
        last = ours.hidden_states(ids, lengths)
    assert got.shape == (len(LENGTHS), 3)
    assert (got - expected.logits).abs().max() <= TOL
    keep = attention_mask.bool()
    assert _maxdiff(last, expected.hidden_states[-1], keep) <= TOL


def test_pretrained_into_classifier_as_from_pretrained(mlm_folder, family, caplog):
    """An MLM checkpoint loads into a classifier with a fresh head, as HF's from_pretrained."""
    folder, _ = mlm_folder
    ckpt = read_geneformer_checkpoint(folder)
    kwargs = {**ckpt.module_kwargs(), "n_labels": 4, "mlm_head": False}
    ours = GeneformerModule(**kwargs).eval()
    with pytest.raises(RuntimeError, match="init_missing_head=True"):
        load_geneformer_state_dict(ours, ckpt.state_dict)
    with pytest.raises(RuntimeError, match="mlm_head=True"):
        # without a masked-LM head the checkpoint's head is unexpected
        load_geneformer_state_dict(ours, ckpt.state_dict, init_missing_head=True)
    sd = {k: v for k, v in ckpt.state_dict.items() if not k.startswith("cls.")}
    with caplog.at_level(logging.INFO, logger="cellformers.pretrained._geneformer"):
        load_geneformer_state_dict(ours, sd, init_missing_head=True)
    assert "pooler" in caplog.text and "classifier" in caplog.text

    ref = transformers.BertForSequenceClassification.from_pretrained(
        folder, num_labels=4, attn_implementation="eager"
    ).eval()
    with torch.no_grad():  # the fresh heads differ by chance only; copy HF's
        ref.bert.pooler.dense.weight.copy_(ours.pooler.weight)
        ref.bert.pooler.dense.bias.copy_(ours.pooler.bias)
        ref.classifier.weight.copy_(ours.classifier.weight)
        ref.classifier.bias.copy_(ours.classifier.bias)
    ids, lengths, attention_mask = random_batch(LENGTHS, TINY[family]["vocab_size"], seed=6)
    with torch.inference_mode():
        expected = ref(ids, attention_mask=attention_mask).logits
        got = ours.classify(ids, lengths)
    assert (got - expected).abs().max() <= TOL
    # HF's initialisation of a fresh head: normal(0, 0.02) weights, zero biases
    assert ours.classifier.bias.abs().max() == 0
    assert 0.01 < ours.classifier.weight.std().item() < 0.03


# ------------------------------------------------------------------------------ strict loading
def test_missing_unexpected_and_mismatched_keys_explained(mlm_folder, family):
    folder, _ = mlm_folder
    ckpt = read_geneformer_checkpoint(folder)
    kwargs = ckpt.module_kwargs()
    module = GeneformerModule(**kwargs)

    sd = dict(ckpt.state_dict)
    sd.pop("bert.encoder.layer.1.intermediate.dense.weight")
    sd["classifier.weight"] = torch.zeros(3, kwargs["hidden_size"])
    with pytest.raises(RuntimeError) as err:
        load_geneformer_state_dict(module, sd)
    msg = str(err.value)
    assert "missing keys (1): bert.encoder.layer.1.intermediate.dense.weight" in msg
    assert "unexpected keys (1): classifier.weight" in msg
    assert "BertForSequenceClassification" in msg and "n_labels" in msg

    fewer = GeneformerModule(**{**kwargs, "num_hidden_layers": 2})
    with pytest.raises(RuntimeError, match=r"encoder layers \[2\] are unexpected"):
        load_geneformer_state_dict(fewer, ckpt.state_dict)

    wider = GeneformerModule(**{**kwargs, "intermediate_size": 2 * kwargs["intermediate_size"]})
    with pytest.raises(RuntimeError, match=r"(?s)shape mismatches \(9\).*intermediate_size"):
        load_geneformer_state_dict(wider, ckpt.state_dict)

    other_vocab = GeneformerModule(**{**kwargs, "vocab_size": kwargs["vocab_size"] + 1})
    with pytest.raises(RuntimeError, match="vocab_size"):
        load_geneformer_state_dict(other_vocab, ckpt.state_dict)

    no_mlm = GeneformerModule(**{**kwargs, "mlm_head": False})
    with pytest.raises(RuntimeError, match="mlm_head=True"):
        load_geneformer_state_dict(no_mlm, ckpt.state_dict)


def test_untied_decoder_rejected(tmp_path):
    model = hf_model("V1")
    folder = write_v1_folder(tmp_path / "v1", model)
    ckpt = read_geneformer_checkpoint(folder)
    sd = dict(ckpt.state_dict)
    sd["cls.predictions.decoder.weight"] = sd["cls.predictions.decoder.weight"] + 1.0
    with pytest.raises(RuntimeError, match="not tied"):
        load_geneformer_state_dict(GeneformerModule(**ckpt.module_kwargs()), sd)


def test_bare_bert_model_prefix_is_added(mlm_folder):
    folder, _ = mlm_folder
    ckpt = read_geneformer_checkpoint(folder)
    bare = {k.removeprefix("bert."): v for k, v in ckpt.state_dict.items()}
    module = GeneformerModule(**ckpt.module_kwargs())
    load_geneformer_state_dict(module, bare)
    assert torch.equal(
        module.embeddings.word_embeddings.weight,
        ckpt.state_dict["bert.embeddings.word_embeddings.weight"],
    )


# ------------------------------------------------------------------------------ bad folders
def test_missing_files_and_bad_config(tmp_path, mlm_folder):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_geneformer_checkpoint(tmp_path / "nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=r"lacks config\.json"):
        read_geneformer_checkpoint(empty)
    (empty / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_geneformer_checkpoint(empty)
    (empty / "config.json").write_text(json.dumps(TINY["V2"]))
    with pytest.raises(FileNotFoundError, match="holds no weights"):
        read_geneformer_checkpoint(empty)
    (empty / "model.safetensors").write_text(
        "version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 1\n"
    )
    with pytest.raises(ValueError, match="LFS pointer"):
        read_geneformer_checkpoint(empty)
    (empty / "config.json").write_text(json.dumps({**TINY["V2"], "model_type": "roberta"}))
    with pytest.raises(ValueError, match="model_type='roberta'"):
        read_geneformer_checkpoint(empty)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"position_embedding_type": "relative_key"}, "position_embedding_type"),
        ({"hidden_act": "gelu_new"}, "hidden_act"),
        ({"is_decoder": True}, "is_decoder"),
        ({"architectures": ["BertForTokenClassification"]}, "token classification"),
        ({"num_attention_heads": 5}, "not divisible"),
        (
            {"architectures": ["BertForSequenceClassification"], "problem_type": "regression"},
            "problem_type",
        ),
    ],
)
def test_unsupported_configs_rejected(change, match):
    with pytest.raises(ValueError, match=match):
        geneformer_module_kwargs({**TINY["V1"], **change})


def test_config_defaults_and_labels():
    kwargs = geneformer_module_kwargs({"vocab_size": 10})  # BertConfig defaults
    assert kwargs["hidden_size"] == 768 and kwargs["hidden_act"] == "gelu"
    assert kwargs["max_position_embeddings"] == 512 and kwargs["classifier_dropout"] is None
    cls = geneformer_module_kwargs(
        {
            **TINY["V1"],
            "architectures": ["BertForSequenceClassification"],
            "id2label": {"0": "a", "1": "b", "2": "c"},
        }
    )
    assert cls["n_labels"] == 3 and cls["mlm_head"] is False
    with pytest.raises(KeyError, match="vocab_size"):
        geneformer_module_kwargs({"model_type": "bert"})


# ------------------------------------------------------------------------------ writing
def test_save_round_trip_through_transformers(tmp_path, mlm_folder, family):
    folder, model = mlm_folder
    model.set_attn_implementation("eager")
    ours, _ = _load_ours(folder)
    out = save_geneformer_checkpoint(ours, tmp_path / "saved")
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["BertForMaskedLM"] and config["hidden_act"] == "relu"
    ref, info = transformers.BertForMaskedLM.from_pretrained(
        out, output_loading_info=True, attn_implementation="eager"
    )
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert not info["mismatched_keys"]
    ref.eval()
    ids, lengths, attention_mask = random_batch(LENGTHS, TINY[family]["vocab_size"], seed=7)
    keep = attention_mask.bool()
    with torch.inference_mode():
        expected = ref(ids, attention_mask=attention_mask, output_hidden_states=True)
        original = model(ids, attention_mask=attention_mask)
        got = ours.mlm_logits(ours.hidden_states(ids, lengths))
    assert _maxdiff(expected.logits, original.logits, keep) == 0
    assert _maxdiff(got, expected.logits, keep) <= TOL
    assert torch.equal(
        ref.cls.predictions.decoder.weight, ref.bert.embeddings.word_embeddings.weight
    )
    # and back into a fresh module
    again, ckpt = _load_ours(out)
    assert ckpt.config["vocab_size"] == TINY[family]["vocab_size"]
    for (k, a), (k2, b) in zip(ours.state_dict().items(), again.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(a, b), k


def test_save_classifier_round_trip(tmp_path):
    torch.manual_seed(0)
    ours = GeneformerModule(
        TINY["V2"]["vocab_size"],
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=48,
        max_position_embeddings=64,
        mlm_head=False,
        n_labels=3,
    ).eval()
    names = {"0": "cardiomyocyte", "1": "fibroblast", "2": "endothelial"}
    out = save_geneformer_checkpoint(
        ours,
        tmp_path / "cls",
        config_extra={"id2label": names, "label2id": {v: int(k) for k, v in names.items()}},
    )
    ref, info = transformers.BertForSequenceClassification.from_pretrained(
        out, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert ref.config.id2label[1] == "fibroblast"
    ids, lengths, attention_mask = random_batch([12, 5, 9], TINY["V2"]["vocab_size"], seed=8)
    with torch.inference_mode():
        expected = ref.eval()(ids, attention_mask=attention_mask).logits
        got = ours.classify(ids, lengths)
    assert (got - expected).abs().max() <= TOL
    assert read_geneformer_checkpoint(out).n_labels == 3
