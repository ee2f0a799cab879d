"""LoRA adapters: the shared implementation (cellformers.nn) and the model API of every class."""

from __future__ import annotations

import copy
import json
import pickle

import numpy as np
import pytest
import scvi
import torch

import cellformers as cf
from cellformers.model import SCBERT, SCGPT, Geneformer, SCFoundation
from cellformers.nn import (
    LoRAAdapter,
    MultiheadSelfAttention,
    Performer,
    PerformerSelfAttention,
    TransformerEncoder,
    TransformerEncoderLayer,
    add_lora,
    find_lora_targets,
    lora_adapters,
    merge_lora,
    remove_lora,
)

# tiny networks; gene setup per class
MODELS = {
    "scgpt": (
        SCGPT,
        {},
        {"d_model": 16, "nhead": 2, "d_hid": 16, "nlayers": 2, "dropout": 0.0, "max_seq_len": 64},
    ),
    "geneformer": (
        Geneformer,
        {"gene_key": "ensembl_id"},
        {
            "hidden_size": 16,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "intermediate_size": 32,
            "hidden_dropout_prob": 0.0,
            "attention_probs_dropout_prob": 0.0,
            "max_input_size": 64,
        },
    ),
    "scbert": (
        SCBERT,
        {},
        {"dim": 16, "depth": 2, "heads": 2, "dim_head": 8, "classifier_hidden": (16, 8)},
    ),
    "scfoundation": (
        SCFoundation,
        {},
        {
            "encoder_dim": 16,
            "encoder_depth": 2,
            "encoder_heads": 2,
            "encoder_d_hid": 32,
            "decoder_dim": 12,
            "decoder_depth": 2,
            "decoder_heads": 2,
            "decoder_dim_head": 6,
            "decoder_nb_features": 8,
        },
    ),
}
# attention weights adapted with the default targets: (qkv + out) per softmax-attention layer,
# (q + k + v + out) per Performer layer
N_ADAPTED = {"scgpt": 4, "geneformer": 4, "scbert": 8, "scfoundation": 4 + 8}


@pytest.fixture(scope="module")
def cells():
    """60 CellBench cells (three cell lines) on their 150 most detected genes."""
    adata = cf.data.cellbench_2platform()
    rng = np.random.default_rng(0)
    adata = adata[np.sort(rng.choice(adata.n_obs, 60, replace=False))].copy()
    detected = np.asarray((adata.X > 0).mean(0)).ravel()
    return adata[:, np.argsort(-detected, kind="stable")[:150]].copy()


def _model(cells, name, seed=0, labels=True, **overrides):
    cls, setup, arch = MODELS[name]
    adata = cells.copy()
    cls.setup_anndata(adata, labels_key="cell_line" if labels else None, **setup)
    scvi.settings.seed = seed
    model = cls(adata, **{**arch, **overrides})
    model.is_trained_ = True  # random weights are enough to compare outputs
    return model


def _finetune(model, **kwargs):
    kwargs = {"max_epochs": 2, "batch_size": 16, "mode": "finetune", "lr": 1e-2, **kwargs}
    model.train(enable_progress_bar=False, **kwargs)


def _clone(state):
    return {k: v.detach().clone() for k, v in state.items()}


def _head_keys(model):
    names = {id(m): n for n, m in model.module.named_modules()}
    prefixes = tuple(f"{names[id(m)]}." for m in model._head_modules())
    return {k for k in model.module.state_dict() if k.startswith(prefixes)}


def _probs(model, adata=None):
    return model.predict_celltype(adata, soft=True).to_numpy()


# ---------------------------------------------------------------- shared implementation
def _network():
    torch.manual_seed(0)
    return torch.nn.ModuleDict(
        {
            "enc": TransformerEncoder(TransformerEncoderLayer(16, 4, 32, 0.0), 2),
            "dec": Performer(16, 2, 2, 8, nb_features=8),
        }
    )


def _run(net, x, mask):
    h = net["enc"](x, key_padding_mask=mask)
    return torch.cat([net["dec"](h, key_padding_mask=mask), net["enc"](x, mask, n_queries=1)], 1)


def test_adapter_is_a_weight_update_that_merges_exactly():
    net = _network().eval()
    x = torch.randn(3, 7, 16)
    mask = torch.zeros(3, 7, dtype=torch.bool)
    mask[0, 4:] = True
    reference = _run(net, x, mask)
    official = {k: v.clone() for k, v in net.state_dict().items()}
    names = add_lora(net, rank=2, alpha=4)
    assert names == list(find_lora_targets(net)) and len(names) == 4 + 8
    assert torch.equal(_run(net, x, mask), reference)  # B = 0: exactly nothing changes
    state = net.state_dict()
    assert all(torch.equal(state[k], v) for k, v in official.items())  # official keys stay
    assert sorted(set(state) - set(official))[:2] == [
        "dec.net.layers.0.0.fn.to_k.lora_weight.A",
        "dec.net.layers.0.0.fn.to_k.lora_weight.B",
    ]
    assert "enc.layers.0.self_attn.lora_in_proj_weight.B" in state
    attn = net["enc"].layers[0].self_attn
    assert isinstance(attn, MultiheadSelfAttention) and attn.in_proj_weight.shape == (48, 16)
    for adapter in lora_adapters(net).values():
        torch.nn.init.normal_(adapter.B)
    adapter = lora_adapters(net)["enc.layers.0.self_attn.in_proj_weight"]
    expected = official["enc.layers.0.self_attn.in_proj_weight"] + 2.0 * adapter.B @ adapter.A
    assert torch.equal(attn.in_proj_weight, expected)
    adapted = _run(net, x, mask)
    assert not torch.allclose(adapted, reference, atol=1e-3)
    # copies and pickles keep the adapters
    for other in (copy.deepcopy(net), pickle.loads(pickle.dumps(net))):
        assert torch.equal(_run(other, x, mask), adapted)
    merged = merge_lora(net)
    assert merged == names and not lora_adapters(net)
    assert set(net.state_dict()) == set(official)
    assert type(net["enc"].layers[0].self_attn) is MultiheadSelfAttention
    assert type(net["dec"].net.layers[0][0].fn) is PerformerSelfAttention
    torch.testing.assert_close(_run(net, x, mask), adapted, rtol=0, atol=1e-6)


def test_adapter_gradients_targets_dropout_and_removal():
    net = _network().train()
    official = {k: v.clone() for k, v in net.state_dict().items()}
    assert len(add_lora(net, rank=3, alpha=3, targets="out")) == 2 + 2
    assert {a.target for a in lora_adapters(net).values()} == {"out"}
    for p in net.parameters():
        p.requires_grad_(False)
    for adapter in lora_adapters(net).values():
        adapter.requires_grad_(True)
    _run(net, torch.randn(2, 5, 16), None).sum().backward()
    assert all(a.B.grad.abs().sum() > 0 for a in lora_adapters(net).values())
    assert remove_lora(net) and set(net.state_dict()) == set(official)
    assert all(torch.equal(net.state_dict()[k], v) for k, v in official.items())
    # dropout drops input features of the update, rescaled; none in evaluation mode
    adapter = LoRAAdapter(6, 40, 4, 8.0, dropout=0.5)
    torch.nn.init.normal_(adapter.B)
    full = adapter.B @ adapter.A * 2.0
    assert torch.equal(adapter.eval().delta(), full)
    torch.manual_seed(1)
    dropped = adapter.train().delta()
    kept = (dropped != 0).any(0)
    assert 0 < kept.sum() < 40
    torch.testing.assert_close(dropped[:, kept], 2 * full[:, kept])


def test_bad_adapter_arguments():
    net = _network()
    for kwargs, message in (
        ({"rank": 0}, "rank"),
        ({"rank": 2.5}, "rank"),
        ({"alpha": 0}, "alpha"),
        ({"dropout": 1.0}, "dropout"),
        ({"targets": ("q",)}, "targets"),
        ({"targets": ()}, "targets"),
    ):
        with pytest.raises(ValueError, match=message):
            add_lora(net, **kwargs)
    assert not lora_adapters(net)
    add_lora(net)
    with pytest.raises(ValueError, match="already has LoRA adapters"):
        add_lora(net)
    with pytest.raises(ValueError, match="no MultiheadSelfAttention"):
        add_lora(torch.nn.Linear(3, 3))


# ---------------------------------------------------------------- model classes
@pytest.mark.parametrize("name", list(MODELS))
def test_adding_adapters_leaves_embeddings_unchanged(cells, name):
    model = _model(cells, name)
    assert model.lora_ is None
    unfrozen = model.get_latent_representation()
    # In inference the adapted weights are plain tensors, like frozen weights. PyTorch picks the
    # matmul kernel of a sliced input (scGPT's <cls> query) by whether the weight requires
    # gradients, which alone moves scGPT's embeddings by ~1e-7: compare with frozen weights.
    model.module.requires_grad_(False)
    before = model.get_latent_representation()
    model.module.requires_grad_(True)
    keys = set(model.module.state_dict())
    model.add_lora(rank=4, alpha=8)
    assert model.lora_ == {"rank": 4, "alpha": 8.0, "dropout": 0.0, "targets": ("qkv", "out")}
    after = model.get_latent_representation()
    np.testing.assert_array_equal(after, before)
    np.testing.assert_allclose(after, unfrozen, rtol=0, atol=1e-6)
    added = set(model.module.state_dict()) - keys
    assert len(added) == 2 * N_ADAPTED[name] and all(".lora_" in k for k in added)
    model.remove_lora()
    assert model.lora_ is None and set(model.module.state_dict()) == keys


@pytest.mark.parametrize("name", list(MODELS))
def test_finetune_trains_only_adapters_and_head(cells, name, tmp_path):
    model = _model(cells, name)
    official = _clone(model.module.state_dict())  # before adapters (and before any new head)
    model.add_lora(rank=4, alpha=8)
    _finetune(model)
    state = model.module.state_dict()
    head = _head_keys(model)
    assert head and model.module.n_labels == 3
    base = [k for k in official if k in state and k not in head]
    assert set(official) - set(state) <= {"to_out.weight", "to_out.bias"}  # scBERT's MLM head
    assert base and all(torch.equal(state[k], official[k]) for k in base), [
        k for k in base if not torch.equal(state[k], official[k])
    ][:5]
    adapters = lora_adapters(model.module)
    assert len(adapters) == N_ADAPTED[name]
    trained = {k for k, a in adapters.items() if a.B.abs().sum() > 0}
    # every adapter on the path to the classifier was trained (scFoundation's decoder is not)
    assert trained == {k for k in adapters if not k.startswith("decoder.")}
    # the optimiser held exactly the adapters and the head; freezing is undone afterwards
    optimised = {id(p) for g in model.trainer.optimizers[0].param_groups for p in g["params"]}
    adapter_ids = {id(p) for a in adapters.values() for p in a.parameters()}
    head_ids = {id(p) for m in model._head_modules() for p in m.parameters()}
    assert optimised == adapter_ids | head_ids
    assert all(p.requires_grad for p in model.module.parameters())
    probs = _probs(model)

    # adapters (+ head) alone reproduce the predictions on a fresh model with the base weights
    model.save_lora(tmp_path / "lora")
    meta = json.loads((tmp_path / "lora" / "lora_config.json").read_text())
    assert meta["model_class"] == type(model).__name__ and meta["rank"] == 4
    assert meta["head"]["labels"] == ["H1975", "H2228", "HCC827"]
    fresh = _model(cells, name, seed=1)
    fresh.module.load_state_dict(official, strict=False)
    fresh.load_lora(tmp_path / "lora")
    assert fresh.lora_ == model.lora_ and fresh.finetuned_
    np.testing.assert_allclose(_probs(fresh), probs, rtol=0, atol=1e-6)

    # scvi-tools save / load keeps the adapters
    model.save(tmp_path / "model", overwrite=True)
    loaded = type(model).load(tmp_path / "model", adata=model.adata)
    assert loaded.lora_ == model.lora_
    np.testing.assert_allclose(_probs(loaded), probs, rtol=0, atol=1e-6)

    # merging folds the adapters in: official keys, same outputs
    z = model.get_latent_representation()
    model.merge_lora()
    assert model.lora_ is None
    assert set(model.module.state_dict()) == {k for k in state if ".lora_" not in k}
    np.testing.assert_allclose(_probs(model), probs, rtol=0, atol=1e-5)
    np.testing.assert_allclose(model.get_latent_representation(), z, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ["geneformer", "scbert"])
def test_pretraining_trains_only_adapters_and_freezing_composes(cells, name):
    model = _model(cells, name, labels=False)
    model.add_lora(rank=2, alpha=2, targets="qkv")
    before = _clone(model.module.state_dict())
    model.train(max_epochs=1, batch_size=16, lr=1e-2, enable_progress_bar=False)
    after = model.module.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(".lora_" in k for k in changed), sorted(changed)[:5]
    assert all(p.requires_grad for p in model.module.parameters())
    # freeze_layers="all" trains the head only, adapters included in what stays fixed
    model = _model(cells, name)
    model.add_lora(rank=2, alpha=2)
    _finetune(model, max_epochs=1)
    before = _clone(model.module.state_dict())
    _finetune(model, max_epochs=1, freeze_layers="all")
    after = model.module.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and changed <= _head_keys(model), sorted(changed - _head_keys(model))[:5]


def test_bad_lora_arguments_and_mismatched_models(cells, tmp_path):
    model = _model(cells, "scgpt")
    for kwargs, message in (
        ({"rank": 0}, "rank"),
        ({"alpha": -1.0}, "alpha"),
        ({"targets": ("qkv", "ffn")}, "targets"),
    ):
        with pytest.raises(ValueError, match=message):
            model.add_lora(**kwargs)
    for method in (model.merge_lora, model.remove_lora):
        with pytest.raises(ValueError, match="no LoRA adapters"):
            method()
    with pytest.raises(ValueError, match="add_lora"):
        model.save_lora(tmp_path / "none")
    model.add_lora(rank=2)
    with pytest.raises(ValueError, match="already has LoRA adapters"):
        model.add_lora(rank=2)
    model.save_lora(tmp_path / "a")
    with pytest.raises(ValueError, match="already exists"):
        model.save_lora(tmp_path / "a")
    with pytest.raises(FileNotFoundError, match="save_lora"):
        model.load_lora(tmp_path)
    deeper = _model(cells, "scgpt", nlayers=3)
    with pytest.raises(ValueError, match="another architecture(.|\\n)*2 attention weights here"):
        deeper.load_lora(tmp_path / "a")
    wider = _model(cells, "scgpt", d_model=32, d_hid=32)
    with pytest.raises(ValueError, match="shape mismatches"):
        wider.load_lora(tmp_path / "a")
    assert deeper.lora_ is None and wider.lora_ is None  # nothing was changed
    with pytest.raises(ValueError, match="saved from a SCGPT model"):
        _model(cells, "geneformer").load_lora(tmp_path / "a")
    with pytest.warns(UserWarning, match="differ"):
        _model(cells, "scgpt", seed=5).load_lora(tmp_path / "a")  # other base weights
    # a head for other labels
    _finetune(model, max_epochs=1)
    model.save_lora(tmp_path / "a", overwrite=True)
    other = cells.copy()
    other.obs["cell_line"] = other.obs["cell_line"].cat.rename_categories(["a", "b", "c"])
    SCGPT.setup_anndata(other, labels_key="cell_line")
    scvi.settings.seed = 0
    relabelled = SCGPT(other, **MODELS["scgpt"][2])
    with pytest.raises(ValueError, match="registered labels"):
        relabelled.load_lora(tmp_path / "a")
