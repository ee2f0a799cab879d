"""Parity of SCGPTModule with the official scGPT TransformerModel through a checkpoint folder."""

from __future__ import annotations

import json
from contextlib import contextmanager

import pytest
import torch
from official_scgpt import checkpoint_layout, official_model, write_folder

from cellformers.genes import GeneVocab
from cellformers.module import SCGPTModule
from cellformers.pretrained import (
    ScGPTCheckpoint,
    load_scgpt_state_dict,
    normalize_scgpt_state_dict,
    read_scgpt_checkpoint,
)

pytestmark = pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")

N_GENES = 297  # + <pad>, <cls>, <eoc> -> 300 tokens
ARGS = {
    # a subset of the whole-human args.json, at tiny size
    "pad_token": "<pad>",
    "input_style": "binned",
    "input_emb_style": "continuous",
    "n_bins": 51,
    "max_seq_len": 1200,
    "mask_ratio": [0.25, 0.5, 0.75],
    "fast_transformer": True,
    "nlayers": 2,
    "nheads": 4,
    "embsize": 32,
    "d_hid": 48,
    "dropout": 0.2,
    "n_layers_cls": 3,
    "mask_value": -1,
    "pad_value": -2,
    "USE_CLS": False,
    "USE_CCE": False,
    "MVC": True,
}


@contextmanager
def no_mha_fastpath():
    prev = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(prev)


def _gene_vocab_json():
    # Genes only, like the published vocab.json, whose specials are appended on load.
    return {f"GENE{i}": i for i in range(N_GENES)}


def _official_model(official_scgpt, vocab: dict[str, int]):
    """Build the official model exactly as scgpt.tasks.embed_data does, every weight random."""
    return official_model(vocab, ARGS, randomize=True)


def _to_checkpoint_layout(sd, layout: str):
    return checkpoint_layout(sd, layout, flag_dim=ARGS["embsize"])


def _write_folder(path, sd, args=ARGS, vocab=None):
    return write_folder(path, sd, args, vocab if vocab is not None else _gene_vocab_json())


@pytest.fixture(scope="module")
def official(official_scgpt):
    vocab = GeneVocab.from_dict(_gene_vocab_json()).to_dict()
    return _official_model(official_scgpt, vocab), vocab


@pytest.fixture
def ckpt_folder(tmp_path, official):
    model, _ = official
    return _write_folder(
        tmp_path / "scGPT_tiny", _to_checkpoint_layout(model.state_dict(), "flash")
    )


def _batch(vocab, lengths, seed=0):
    """Tokens as embed_data builds them: <cls> first with value pad_value, binned values, padding."""
    g = torch.Generator().manual_seed(seed)
    L = max(lengths)
    genes = torch.full((len(lengths), L), vocab["<pad>"], dtype=torch.long)
    values = torch.full((len(lengths), L), float(ARGS["pad_value"]))
    for i, n in enumerate(lengths):
        genes[i, 0] = vocab["<cls>"]
        genes[i, 1:n] = torch.randperm(N_GENES, generator=g)[: n - 1]
        values[i, 1:n] = torch.randint(1, ARGS["n_bins"], (n - 1,), generator=g).float()
    return genes, values


def _load_ours(folder):
    ckpt = read_scgpt_checkpoint(folder)
    module = SCGPTModule(**ckpt.module_kwargs())
    load_scgpt_state_dict(module, ckpt.state_dict)
    return module.eval(), ckpt


def test_read_checkpoint(ckpt_folder):
    ckpt = read_scgpt_checkpoint(ckpt_folder)
    assert isinstance(ckpt, ScGPTCheckpoint)
    assert len(ckpt.vocab) == N_GENES + 3
    assert ckpt.vocab.pad_id == N_GENES and ckpt.vocab.cls_id == N_GENES + 1
    assert ckpt.config == {
        "d_model": 32,
        "nhead": 4,
        "d_hid": 48,
        "nlayers": 2,
        "dropout": 0.2,
        "pad_value": -2.0,
        "mask_value": -1.0,
        "do_mvc": True,
        "n_batch": 0,
        "use_batch_labels": False,
        "domain_spec_batchnorm": False,
        "do_dab": False,
        "explicit_zero_prob": False,
        "ecs_threshold": None,
        "n_bins": 51,
        "pad_token": "<pad>",
    }
    kwargs = ckpt.module_kwargs()
    assert kwargs["n_tokens"] == N_GENES + 3 and kwargs["pad_id"] == N_GENES
    assert "flag_encoder.weight" not in ckpt.state_dict
    assert not any("Wqkv" in k for k in ckpt.state_dict)


def test_state_dict_keys_equal(ckpt_folder):
    module, ckpt = _load_ours(ckpt_folder)
    assert list(module.state_dict()) == list(ckpt.state_dict)


@pytest.mark.parametrize("fastpath", [True, False])
def test_encode_parity_with_official(ckpt_folder, official, fastpath):
    model, vocab = official
    ours, _ = _load_ours(ckpt_folder)
    genes, values = _batch(vocab, [40, 17, 29, 3])
    pad = genes.eq(vocab["<pad>"])
    ctx = no_mha_fastpath() if not fastpath else torch.no_grad()
    with torch.no_grad(), ctx:
        expected = model._encode(genes, values, src_key_padding_mask=pad)
    with torch.inference_mode():
        got = ours.encode(genes, values)
        cls = ours.cell_embedding(genes, values)
    keep = ~pad
    # padded rows carry no meaning: zero in ours and in torch's fast path, values without it
    assert (got[keep] - expected[keep]).abs().max() <= 1e-5
    assert got[pad].abs().max() == 0
    assert (cls - expected[:, 0, :]).abs().max() <= 1e-5
    assert cls.abs().max() > 0.1  # not trivially zero


def test_decoder_and_mvc_parity_with_official(ckpt_folder, official):
    model, vocab = official
    ours, _ = _load_ours(ckpt_folder)
    genes, values = _batch(vocab, [25, 25, 12], seed=1)
    pad = genes.eq(vocab["<pad>"])
    with torch.no_grad(), no_mha_fastpath():
        expected = model(genes, values, src_key_padding_mask=pad, MVC=True)
        inf = ours.inference(genes, values, mask=False)
        gen = ours.generative(inf["hidden"], inf["cell_emb"], inf["gene_embs"])
    keep = ~pad
    assert (gen["mlm_pred"][keep] - expected["mlm_output"][keep]).abs().max() <= 1e-5
    assert (gen["mvc_pred"] - expected["mvc_output"]).abs().max() <= 1e-5
    assert (inf["cell_emb"] - expected["cell_emb"]).abs().max() <= 1e-5


@pytest.mark.parametrize("layout", ["torch", "flash", "flash2", "ddp"])
def test_layouts_load(tmp_path, official, layout):
    model, vocab = official
    folder = _write_folder(tmp_path / layout, _to_checkpoint_layout(model.state_dict(), layout))
    ours, _ = _load_ours(folder)
    genes, values = _batch(vocab, [10, 6], seed=2)
    with torch.no_grad(), no_mha_fastpath():
        expected = model._encode(genes, values, src_key_padding_mask=genes.eq(vocab["<pad>"]))
    keep = genes.ne(vocab["<pad>"])
    with torch.inference_mode():
        assert (ours.encode(genes, values)[keep] - expected[keep]).abs().max() <= 1e-5


def test_normalize_renames_and_drops():
    w = torch.zeros(6, 2)
    sd = {
        "module.transformer_encoder.layers.0.self_attn._impl.Wqkv.weight": w,
        "module.transformer_encoder.layers.0.self_attn._impl.out_proj.bias": w,
        "module.transformer_encoder.layers.1.self_attn.Wqkv.bias": w,
        "module.flag_encoder.weight": w,
        "encoder.embedding.weight": torch.zeros(5, 2),
    }
    out = normalize_scgpt_state_dict(sd, vocab=5)
    assert list(out) == [
        "transformer_encoder.layers.0.self_attn.in_proj_weight",
        "transformer_encoder.layers.0.self_attn.out_proj.bias",
        "transformer_encoder.layers.1.self_attn.in_proj_bias",
        "encoder.embedding.weight",
    ]
    # never drops by shape: an odd-shaped known key survives
    odd = normalize_scgpt_state_dict({"decoder.fc.0.weight": torch.zeros(3, 1)})
    assert "decoder.fc.0.weight" in odd


def test_normalize_rejects_collisions_and_non_tensors():
    w = torch.zeros(1)
    with pytest.raises(ValueError, match="collide"):
        normalize_scgpt_state_dict({"a.self_attn.Wqkv.weight": w, "a.self_attn.in_proj_weight": w})
    with pytest.raises(ValueError, match="not tensors"):
        normalize_scgpt_state_dict({"model_state_dict": {"a": w}})


def test_vocab_embedding_size_mismatch(tmp_path, official):
    model, _ = official
    vocab = _gene_vocab_json()
    vocab["EXTRA"] = len(vocab)
    folder = _write_folder(
        tmp_path / "bad_vocab", _to_checkpoint_layout(model.state_dict(), "flash"), vocab=vocab
    )
    with pytest.raises(ValueError, match=r"has 300 rows but the vocabulary has 301 tokens"):
        read_scgpt_checkpoint(folder)


def test_missing_files(tmp_path, official):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_scgpt_checkpoint(tmp_path / "nope")
    folder = tmp_path / "partial"
    folder.mkdir()
    (folder / "args.json").write_text(json.dumps(ARGS))
    with pytest.raises(FileNotFoundError, match=r"lacks vocab\.json, best_model\.pt"):
        read_scgpt_checkpoint(folder)


def test_missing_and_unexpected_keys_explained(ckpt_folder):
    ckpt = read_scgpt_checkpoint(ckpt_folder)
    module = SCGPTModule(**ckpt.module_kwargs())

    sd = dict(ckpt.state_dict)
    sd.pop("transformer_encoder.layers.1.linear1.weight")
    sd["cls_decoder.out_layer.weight"] = torch.zeros(3, 32)
    with pytest.raises(RuntimeError) as err:
        load_scgpt_state_dict(module, sd)
    msg = str(err.value)
    assert "missing keys (1): transformer_encoder.layers.1.linear1.weight" in msg
    assert "unexpected keys (1): cls_decoder.out_layer.weight" in msg
    assert "classification head" in msg and "nlayers" in msg

    no_mvc = SCGPTModule(**{**ckpt.module_kwargs(), "do_mvc": False})
    with pytest.raises(RuntimeError, match="do_mvc=True"):
        load_scgpt_state_dict(no_mvc, ckpt.state_dict)

    wrong_d = SCGPTModule(**{**ckpt.module_kwargs(), "d_hid": 64})
    with pytest.raises(RuntimeError, match=r"shape mismatches \(6\)"):
        load_scgpt_state_dict(wrong_d, ckpt.state_dict)

    raw = {k.replace("in_proj_", "Wqkv."): v for k, v in ckpt.state_dict.items()}
    with pytest.raises(RuntimeError, match="normalize_scgpt_state_dict"):
        load_scgpt_state_dict(module, raw)


def test_mvc_flag_follows_weights(tmp_path, official, caplog):
    model, _ = official
    sd = {
        k: v
        for k, v in _to_checkpoint_layout(model.state_dict(), "flash").items()
        if not k.startswith("mvc_decoder.")
    }
    folder = _write_folder(tmp_path / "no_mvc", sd)
    ckpt = read_scgpt_checkpoint(folder)
    assert ckpt.config["do_mvc"] is False
    assert "following the weights" in caplog.text
    load_scgpt_state_dict(SCGPTModule(**ckpt.module_kwargs()), ckpt.state_dict)


def test_unsupported_emb_style(tmp_path, official):
    model, _ = official
    folder = _write_folder(
        tmp_path / "cat",
        _to_checkpoint_layout(model.state_dict(), "flash"),
        args={**ARGS, "input_emb_style": "category"},
    )
    with pytest.raises(ValueError, match="input_emb_style"):
        read_scgpt_checkpoint(folder)
