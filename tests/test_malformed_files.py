"""Damaged or malformed files: every reader names the file and the field, nothing passes silently."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from test_lora import MODELS, _model

import cellformers as cf
from cellformers.module import GeneformerModule, SCGPTModule
from cellformers.nn import lora_state_dict
from cellformers.pretrained import (
    load_geneformer_state_dict,
    load_scgpt_state_dict,
    read_geneformer_checkpoint,
    read_scgpt_checkpoint,
    scfoundation_module_kwargs,
)

pytestmark = pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")


@pytest.fixture(scope="module")
def cells():
    """30 CellBench cells on their 100 most detected genes."""
    adata = cf.data.cellbench_2platform()[:30].copy()
    detected = np.asarray((adata.X > 0).mean(0)).ravel()
    return adata[:, np.argsort(-detected, kind="stable")[:100]].copy()


def _truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _edit_json(path, edit):
    content = json.loads(path.read_text())
    edit(content)
    path.write_text(json.dumps(content))


def _edit_tensors(path, edit):
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


def _first_float(tensors):
    return next(k for k, v in tensors.items() if v.is_floating_point() and v.dim() == 2)


# ---------------------------------------------------------------------------- saved models
def _nan(t):
    t[_first_float(t)][0, 0] = float("nan")


def _to_int(t):
    k = _first_float(t)
    t[k] = t[k].to(torch.int32)


def _to_bool(t):
    k = _first_float(t)
    t[k] = t[k] > 0


SAVED_CASES = {
    "truncated weights": (lambda d: _truncate(d / "model.safetensors"), "model.safetensors"),
    "weights not safetensors": (
        lambda d: (d / "model.safetensors").write_bytes(b"\x00" * 64),
        "model.safetensors",
    ),
    "metadata not JSON": (lambda d: _truncate(d / "model.json", 0.3), "model.json"),
    "no registry": (
        lambda d: _edit_json(d / "model.json", lambda m: m["attr_dict"].pop("registry_")),
        "registry_",
    ),
    "other class": (
        lambda d: _edit_json(d / "model.json", lambda m: m.update(model_class="SCVI")),
        "SCVI",
    ),
    "private attribute": (
        lambda d: _edit_json(d / "model.json", lambda m: m["attr_dict"].update(_module=1)),
        "_module",
    ),
    "NaN weight": (lambda d: _edit_tensors(d / "model.safetensors", _nan), "NaN"),
    "int32 weight": (lambda d: _edit_tensors(d / "model.safetensors", _to_int), "int32"),
    "bool weight": (lambda d: _edit_tensors(d / "model.safetensors", _to_bool), "bool"),
    "missing weight": (
        lambda d: _edit_tensors(d / "model.safetensors", lambda t: t.pop(_first_float(t))),
        "model.safetensors",
    ),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_damaged_saved_model_names_the_file(cells, name, tmp_path):
    model = _model(cells, name)
    model.save(tmp_path / "good")
    for case, (damage, match) in SAVED_CASES.items():
        folder = tmp_path / case.replace(" ", "_")
        model.save(folder)
        damage(folder)
        with pytest.raises(ValueError, match=match):
            type(model).load(folder, adata=model.adata)
    type(model).load(tmp_path / "good", adata=model.adata)  # the intact save still loads


# ---------------------------------------------------------------------------- LoRA files
@pytest.fixture(scope="module")
def lora_model(cells, tmp_path_factory):
    model = _model(cells, "scbert", labels=False)
    model.add_lora(rank=2)
    folder = tmp_path_factory.mktemp("lora") / "adapters"
    model.save_lora(folder)
    return model, folder


LORA_CASES = {
    "truncated weights": (
        lambda d: _truncate(d / "lora_weights.safetensors"),
        "lora_weights.safetensors",
    ),
    "config not JSON": (lambda d: _truncate(d / "lora_config.json", 0.4), "lora_config.json"),
    "no rank": (lambda d: _edit_json(d / "lora_config.json", lambda m: m.pop("rank")), "rank"),
    "rank not a number": (
        lambda d: _edit_json(d / "lora_config.json", lambda m: m.update(rank="abc")),
        "'rank'",
    ),
    "bad targets": (
        lambda d: _edit_json(d / "lora_config.json", lambda m: m.update(targets=["x"])),
        "targets",
    ),
    "rank disagrees with the weights": (
        lambda d: _edit_json(d / "lora_config.json", lambda m: m.update(rank=4)),
        "shape mismatches",
    ),
    "NaN adapter": (lambda d: _edit_tensors(d / "lora_weights.safetensors", _nan), "NaN"),
}


@pytest.mark.parametrize("case", list(LORA_CASES))
def test_damaged_lora_files_leave_the_model_unchanged(lora_model, case, tmp_path):
    import shutil

    model, good = lora_model
    folder = tmp_path / "adapters"
    shutil.copytree(good, folder)
    damage, match = LORA_CASES[case]
    damage(folder)
    with torch.no_grad():  # adapters that differ from the saved ones
        for v in lora_state_dict(model.module).values():
            v.normal_()
    before = {k: v.clone() for k, v in model.module.state_dict().items()}
    config = model.lora_
    with pytest.raises(ValueError, match=match):
        model.load_lora(folder)
    after = model.module.state_dict()
    assert model.lora_ == config and after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)


# ---------------------------------------------------------------------------- scGPT folders
N_GENES = 40
SCGPT_ARGS = {
    "embsize": 16,
    "nheads": 2,
    "d_hid": 16,
    "nlayers": 1,
    "dropout": 0.0,
    "pad_value": -2,
    "mask_value": -1,
    "n_bins": 51,
    "MVC": False,
    "input_emb_style": "continuous",
}


def _scgpt_folder(path, args=SCGPT_ARGS, d_model=16):
    torch.manual_seed(0)
    module = SCGPTModule(N_GENES + 3, pad_id=N_GENES, d_model=d_model, nhead=2, d_hid=16,
                         nlayers=1, do_mvc=False)  # fmt: skip
    path.mkdir()
    (path / "args.json").write_text(json.dumps(args))
    (path / "vocab.json").write_text(json.dumps({f"G{i}": i for i in range(N_GENES)}))
    torch.save(module.state_dict(), path / "best_model.pt")
    return path


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"embsize": "big"}, "args.json: field 'embsize'"),
        ({"nheads": 0}, "args.json: field 'nheads'"),
        ({"embsize": -32}, "args.json: field 'embsize'"),
        ({"embsize": 32}, "embsize 32 disagrees with the weights"),
        ({"nheads": 3, "embsize": 16}, "not divisible"),
        ({"dropout": "x"}, "'dropout'"),
    ],
)
def test_bad_scgpt_args(tmp_path, change, match):
    folder = _scgpt_folder(tmp_path / "ckpt", args={**SCGPT_ARGS, **change})
    with pytest.raises(ValueError, match=match):
        read_scgpt_checkpoint(folder)


@pytest.mark.parametrize(
    ("damage", "match"),
    [
        (lambda d: (d / "args.json").write_text("{embsize: 16"), "args.json is not valid JSON"),
        (lambda d: _truncate(d / "best_model.pt"), "best_model.pt"),
    ],
)
def test_damaged_scgpt_files(tmp_path, damage, match):
    folder = _scgpt_folder(tmp_path / "ckpt")
    read_scgpt_checkpoint(folder)
    damage(folder)
    with pytest.raises((ValueError, RuntimeError), match=match):
        read_scgpt_checkpoint(folder)


@pytest.mark.parametrize(("dtype", "value"), [(torch.int32, 1), (torch.float32, float("inf"))])
def test_scgpt_weights_of_wrong_dtype_or_not_finite(tmp_path, dtype, value):
    folder = _scgpt_folder(tmp_path / "ckpt")
    state = torch.load(folder / "best_model.pt", weights_only=True)
    state["encoder.embedding.weight"] = state["encoder.embedding.weight"].to(dtype)
    state["encoder.embedding.weight"][0, 0] = value
    torch.save(state, folder / "best_model.pt")
    ckpt = read_scgpt_checkpoint(folder)
    with pytest.raises(ValueError, match="encoder.embedding.weight"):
        load_scgpt_state_dict(SCGPTModule(**ckpt.module_kwargs()), ckpt.state_dict)


# ---------------------------------------------------------------------------- Geneformer folders
@pytest.fixture
def geneformer_folder(cells, tmp_path):
    model = _model(cells, "geneformer", labels=False)
    return model.save_pretrained(tmp_path / "gf")


def _load_geneformer(folder):
    ckpt = read_geneformer_checkpoint(folder)
    module = GeneformerModule(**ckpt.module_kwargs())
    load_geneformer_state_dict(module, ckpt.state_dict)
    return module


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"hidden_size": "abc"}, "'hidden_size' must be a positive int"),
        ({"num_attention_heads": 0}, "'num_attention_heads' must be a positive int"),
        ({"hidden_size": -32}, "'hidden_size' must be a positive int"),
        ({"hidden_dropout_prob": 2.0}, "'hidden_dropout_prob' must be a probability"),
    ],
)
def test_bad_geneformer_config(geneformer_folder, change, match):
    _edit_json(geneformer_folder / "config.json", lambda c: c.update(change))
    with pytest.raises(ValueError, match=match):
        read_geneformer_checkpoint(geneformer_folder)


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/etc/passwd", "a/../../x"])
def test_geneformer_shards_must_stay_in_the_folder(geneformer_folder, shard):
    weights = load_file(geneformer_folder / "model.safetensors")
    (geneformer_folder / "model.safetensors").unlink()
    save_file(weights, geneformer_folder.parent / "outside.safetensors")
    index = {"weight_map": dict.fromkeys(weights, shard)}
    (geneformer_folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="outside"):
        read_geneformer_checkpoint(geneformer_folder)
    # inside the folder, shards load
    save_file(weights, geneformer_folder / "shard.safetensors")
    index = {"weight_map": dict.fromkeys(weights, "shard.safetensors")}
    (geneformer_folder / "model.safetensors.index.json").write_text(json.dumps(index))
    _load_geneformer(geneformer_folder)


@pytest.mark.parametrize("damage", [_nan, _to_int, _to_bool])
def test_geneformer_weights_of_wrong_dtype_or_nan(geneformer_folder, damage):
    _edit_tensors(geneformer_folder / "model.safetensors", damage)
    with pytest.raises(ValueError, match="tensor"):
        _load_geneformer(geneformer_folder)


def test_truncated_geneformer_weights(geneformer_folder):
    _truncate(geneformer_folder / "model.safetensors")
    with pytest.raises(ValueError, match="model.safetensors"):
        read_geneformer_checkpoint(geneformer_folder)


@pytest.mark.parametrize(
    ("tokens", "medians", "match"),
    [
        ({"<pad>": 0, "<mask>": 1, "G": "2"}, {"G": 1.0}, "token id of 'G'"),
        ({"<pad>": 0, "<mask>": 1, "G": 1}, {"G": 1.0}, "token ids \\[1\\]"),
        ({"<pad>": 0, "<mask>": 1, "G": 2}, {"G": "1.5"}, "median of 'G'"),
        ({"<pad>": 0, "<mask>": 1, "G": 2}, {"G": float("nan")}, "median of 'G'"),
        ({"<pad>": 0, "<mask>": 1, "G": 2}, {"G": float("inf")}, "median of 'G'"),
        ({"<pad>": 0, "<mask>": 1, "G": 2}, {"G": 0.0}, "median of 'G'"),
    ],
)
def test_bad_gene_dictionaries(cells, tmp_path, tokens, medians, match):
    (tmp_path / "tokens.json").write_text(json.dumps(tokens))
    with pytest.raises(ValueError, match=match):
        _model(cells, "geneformer", token_dictionary=tmp_path / "tokens.json", gene_medians=medians)


# ---------------------------------------------------------------------------- scFoundation
@pytest.mark.parametrize(
    ("part", "change", "match"),
    [
        ("encoder", {"hidden_dim": "wide"}, "'hidden_dim' must be a positive int"),
        ("decoder", {"heads": 0}, "'heads' must be a positive int"),
        ("encoder", {"heads": 5}, "not divisible"),
        ("encoder", {"depth": None}, "lacks encoder settings"),
    ],
)
def test_bad_scfoundation_config(part, change, match):
    config = {
        "seq_len": 12,
        "encoder": {"hidden_dim": 16, "depth": 1, "heads": 2},
        "decoder": {"hidden_dim": 12, "depth": 1, "heads": 2, "dim_head": 6},
    }
    scfoundation_module_kwargs(config)
    config[part].update(change)
    with pytest.raises((ValueError, KeyError), match=match):
        scfoundation_module_kwargs(config)


# ---------------------------------------------------------------------------- torch files
def test_torch_files_need_a_safe_torch(tmp_path, monkeypatch):
    from cellformers._io import read_torch_file

    torch.save({"w": torch.ones(2)}, tmp_path / "w.pt")
    assert torch.equal(read_torch_file(tmp_path / "w.pt")["w"], torch.ones(2))
    _truncate(tmp_path / "w.pt")
    with pytest.raises(RuntimeError, match="w.pt"):
        read_torch_file(tmp_path / "w.pt")
    monkeypatch.setattr(torch, "__version__", "2.5.1+cpu")
    with pytest.raises(RuntimeError, match="needs torch >= 2.6"):
        read_torch_file(tmp_path / "w.pt")


def test_failed_lora_load_does_not_add_a_head(cells, tmp_path):
    model = _model(cells, "scbert")
    model._prepare_classifier(3)
    model.add_lora(rank=2)
    model.save_lora(tmp_path / "adapters")
    _edit_json(tmp_path / "adapters" / "lora_config.json", lambda m: m.update(rank=4))
    fresh = _model(cells, "scbert")
    module, init_params = fresh.module, json.dumps(fresh.init_params_, default=str)
    with pytest.raises(ValueError, match="shape mismatches"):
        fresh.load_lora(tmp_path / "adapters")
    assert fresh.module is module and fresh.module.n_labels == 0 and fresh.lora_ is None
    assert json.dumps(fresh.init_params_, default=str) == init_params
