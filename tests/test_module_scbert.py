"""scBERT: official checkpoint layout loads strictly and matches a plain reference; batch
invariance; masking and losses; strict-loading errors; the full 16,907-position panel on CPU."""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest
import torch
from reference_scbert import official_state_dict, random_tokens, reference_forward
from scvi import REGISTRY_KEYS
from scvi.module.base import LossOutput

from cellformers.module import SCBERTModule
from cellformers.pretrained import (
    load_scbert_state_dict,
    read_scbert_checkpoint,
    scbert_config_from_state_dict,
    scbert_module_kwargs,
)

N_GENES = 40
SIZES = {"dim": 16, "depth": 2, "heads": 2, "dim_head": 8}
HIDDEN = (24, 12)


def _official(n_labels=0, seed=0, **kwargs):
    return official_state_dict(
        n_genes=N_GENES, n_labels=n_labels, classifier_hidden=HIDDEN, seed=seed, **SIZES, **kwargs
    )


def _save(sd, path, prefix=""):
    torch.save(
        {
            "epoch": 7,
            "model_state_dict": {prefix + k: v for k, v in sd.items()},
            "optimizer_state_dict": {"state": {}, "param_groups": [{"lr": 1e-4, "params": [0]}]},
            "scheduler_state_dict": {"last_epoch": 7},
            "losses": 0.25,
        },
        path,
    )
    return path


def _loaded(sd, tmp_path, **overrides):
    ckpt = read_scbert_checkpoint(_save(sd, tmp_path / "ckpt.pth"))
    module = SCBERTModule(**ckpt.module_kwargs(**overrides))
    return load_scbert_state_dict(module, ckpt.state_dict).eval()


def _module(**kwargs):
    torch.manual_seed(0)
    return SCBERTModule(N_GENES, **{**SIZES, **kwargs})


# ------------------------------------------------------------------------------ parity
def test_pretrained_checkpoint_loads_strictly_and_matches_reference(tmp_path):
    sd = _official()
    ckpt = read_scbert_checkpoint(_save(sd, tmp_path / "panglao_pretrain.pth"))
    assert ckpt.epoch == 7 and set(ckpt.state_dict) == set(sd)
    assert ckpt.config == {
        "n_genes": N_GENES,
        "num_tokens": 7,
        **SIZES,
        "nb_features": int(8 * math.log(8)),
        "ff_mult": 4,
        "position_embedding": True,
        "n_labels": 0,
        "classifier_hidden": (512, 128),
    }
    module = load_scbert_state_dict(SCBERTModule(**ckpt.module_kwargs()), ckpt.state_dict).eval()
    assert module.objective == "mlm"
    ours = module.state_dict()
    assert ours["pos_emb.emb.weight"].dtype == torch.float64
    for k, v in sd.items():
        assert torch.equal(ours[k], v), k
    assert not module.pos_emb.emb.weight.requires_grad
    tokens = random_tokens(3, N_GENES, seed=1)
    for cell in tokens:
        cell = cell[None]
        ref_h = reference_forward(sd, cell, heads=2, dim_head=8, return_encodings=True)
        ref_logits = reference_forward(sd, cell, heads=2, dim_head=8)
        with torch.no_grad():
            h = module.encode(cell)
            logits = module.forward_official(cell)
        assert (h - ref_h).abs().max() <= 1e-5
        assert (logits - ref_logits).abs().max() <= 1e-5
        assert torch.equal(module.mlm_logits(h), logits)


def test_finetuned_checkpoint_with_ddp_prefix_matches_reference(tmp_path):
    sd = _official(n_labels=5, seed=2)
    ckpt = read_scbert_checkpoint(_save(sd, tmp_path / "ft_best.pth", prefix="module."))
    assert ckpt.config["n_labels"] == 5 and ckpt.config["classifier_hidden"] == HIDDEN
    module = load_scbert_state_dict(SCBERTModule(**ckpt.module_kwargs()), ckpt.state_dict).eval()
    assert module.objective == "classification"
    tokens = random_tokens(3, N_GENES, seed=3)
    with torch.no_grad():
        for cell in tokens:
            ref = reference_forward(sd, cell[None], heads=2, dim_head=8)
            assert (module.classify(cell[None]) - ref).abs().max() <= 1e-5


def test_bare_state_dict_and_no_position_table(tmp_path):
    sd = _official(position_embedding=False)
    torch.save(sd, tmp_path / "bare.pth")
    ckpt = read_scbert_checkpoint(tmp_path / "bare.pth")
    assert ckpt.epoch is None and ckpt.config["n_genes"] is None
    with pytest.raises(ValueError, match="n_genes"):
        ckpt.module_kwargs()
    module = SCBERTModule(**ckpt.module_kwargs(n_genes=N_GENES))
    assert module.pos_emb is None
    load_scbert_state_dict(module, ckpt.state_dict).eval()
    tokens = random_tokens(1, N_GENES, seed=4)
    with torch.no_grad():
        ref = reference_forward(sd, tokens, heads=2, dim_head=8, return_encodings=True)
        assert (module.encode(tokens) - ref).abs().max() <= 1e-5


# ------------------------------------------------------------------------------ batches
def test_cell_stabilizer_batch_invariant_and_batch_stabilizer_official(tmp_path):
    sd = _official(seed=5)
    module = _loaded(sd, tmp_path)
    tokens = random_tokens(4, N_GENES, seed=6, p_zero=0.3)
    tokens[1, :-1] = 5  # a cell with much larger activations shifts the batch-wide maximum
    with torch.no_grad():
        batched = module.encode(tokens)
        for i in range(4):
            assert (module.encode(tokens[i : i + 1])[0] - batched[i]).abs().max() <= 1e-5
        flipped = module.encode(tokens.flip(0))
        assert (flipped.flip(0) - batched).abs().max() <= 1e-5
        module.stabilizer = "batch"
        official = module.encode(tokens)
    ref = reference_forward(sd, tokens, heads=2, dim_head=8, return_encodings=True)
    assert (official - ref).abs().max() <= 1e-5
    # for one cell both stabilisers agree (predict.py's batch size 1)
    with torch.no_grad():
        assert (module.encode(tokens[:1]) - batched[:1]).abs().max() <= 1e-5
    assert SCBERTModule(N_GENES, **SIZES, stabilizer="batch").stabilizer == "batch"


# ------------------------------------------------------------------------------ full panel
def test_full_panel_runs_on_cpu():
    """The published panel (16,906 genes + 1 position) at dim 200, 10 heads, batch 1."""
    torch.manual_seed(0)
    g2v = np.random.default_rng(0).normal(size=(16906, 200))
    module = SCBERTModule(gene2vec=g2v, depth=1, n_labels=3).eval()
    assert module.pos_emb.emb.weight.shape == (16907, 200)
    assert module.pos_emb.emb.weight[-1].abs().max() == 0  # the appended zero row
    assert module.to_out.fc1.weight.shape == (512, 16907)
    tokens = random_tokens(1, 16906, seed=0)
    with torch.no_grad():
        logits = module.classify(tokens)
    assert logits.shape == (1, 3) and torch.isfinite(logits).all()


# ------------------------------------------------------------------------------ structure
def test_published_sizes_and_keys():
    m = SCBERTModule(100)
    sd = m.state_dict()
    assert sd["token_emb.weight"].shape == (7, 200)
    assert sd["pos_emb.emb.weight"].shape == (101, 200)
    assert sd["performer.net.layers.5.0.fn.fast_attention.projection_matrix"].shape == (266, 64)
    assert sd["performer.net.layers.5.0.fn.to_q.weight"].shape == (640, 200)
    assert sd["to_out.weight"].shape == (7, 200)
    assert "performer.net.layers.6.0.norm.weight" not in sd
    assert m.max_seq_len == 101 and m.mask_token_id == 6


def test_gene2vec_table_input():
    g2v = torch.randn(N_GENES, 16, dtype=torch.float32)
    m = _module(gene2vec=g2v)
    table = m.pos_emb.emb.weight
    assert table.dtype == torch.float64 and table.shape == (N_GENES + 1, 16)
    assert torch.equal(table[:N_GENES], g2v.double()) and table[-1].abs().max() == 0
    full = torch.randn(N_GENES + 1, 16, dtype=torch.float64)
    assert torch.equal(_module(gene2vec=full.numpy()).pos_emb.emb.weight, full)
    with pytest.raises(ValueError, match="rows"):
        _module(gene2vec=torch.randn(N_GENES + 3, 16))
    with pytest.raises(ValueError, match="table"):
        _module(gene2vec=torch.randn(N_GENES, 15))
    with pytest.raises(ValueError, match="NaN"):
        _module(gene2vec=torch.full((N_GENES, 16), float("nan")))
    with pytest.raises(ValueError, match="position_embedding"):
        _module(gene2vec=g2v, position_embedding=False)


def test_input_and_setting_errors():
    m = _module()
    with pytest.raises(ValueError, match=r"\[0, 7\)"):
        m.encode(torch.full((1, 5), 7))
    with pytest.raises(TypeError, match="integer"):
        m.encode(torch.zeros(1, 5))
    with pytest.raises(ValueError, match="more than"):
        m.encode(torch.zeros(1, N_GENES + 2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[batch, length\]"):
        m.encode(torch.zeros(5, dtype=torch.long))
    with pytest.raises(RuntimeError, match="no fine-tuning head"):
        m.classify(random_tokens(1, N_GENES))
    with pytest.raises(ValueError, match="n_labels > 0"):
        m.objective = "classification"
    c = _module(n_labels=3, classifier_hidden=HIDDEN)
    with pytest.raises(ValueError, match="all 41 positions"):
        c.classify(torch.zeros(1, 10, dtype=torch.long))
    with pytest.raises(ValueError, match="n_labels=0"):
        c.objective = "mlm"
    with pytest.raises(RuntimeError, match="masked-LM"):
        c.mlm_logits(torch.zeros(1, 16))
    with pytest.raises(ValueError, match="objective"):
        m.objective = "mse"
    for kwargs, match in (
        ({"stabilizer": "x"}, "stabilizer"),
        ({"n_labels": -1}, "n_labels"),
        ({"mlm_probability": 1.5}, "mlm_probability"),
        ({"num_tokens": 2}, "num_tokens"),
    ):
        with pytest.raises(ValueError, match=match):
            _module(**kwargs)
    with pytest.raises(KeyError, match="input_ids"):
        m._get_inference_input({"X": torch.zeros(1)})


# ------------------------------------------------------------------------------ masking, losses
def test_random_mask_follows_pretrain_rule():
    m = _module()
    torch.manual_seed(0)
    tokens = random_tokens(400, N_GENES, seed=7, p_zero=0.5)
    tokens[:5, :-1] = 0  # cells without expressed genes
    tokens[5, 3] = 6  # a [MASK] in the input is never chosen
    masked, mask = m.random_mask(tokens)
    n_nonzero = ((tokens != 0) & (tokens != 6)).sum(1)
    expected = (n_nonzero.float() * 0.15).ceil().long()
    assert torch.equal(mask.sum(1), expected)
    assert not mask[tokens == 0].any() and not mask[tokens == 6].any() and not mask[:, -1].any()
    # 90 % of the chosen tokens become [MASK], the rest keep their value; nothing else changes
    assert torch.equal(masked[~mask], tokens[~mask])
    replaced = (masked[mask] == 6).float().mean().item()
    assert 0.85 < replaced < 0.95
    kept = masked[mask] != 6
    assert torch.equal(masked[mask][kept], tokens[mask][kept])
    # the choice is uniform over the expressed genes
    per_position = mask[:, :-1].float().sum(0) / (tokens[:, :-1] != 0).float().sum(0)
    assert per_position.min() > 0.05 and per_position.max() < 0.3


def test_mlm_loss_backward_and_metrics():
    m = _module().train()
    tokens = random_tokens(3, N_GENES, seed=8)
    tensors = {"input_ids": tokens}
    torch.manual_seed(1)
    inf, gen, out = m(tensors)
    assert isinstance(out, LossOutput)
    assert gen["mlm_logits"].shape == (int(inf["mask"].sum()), 7)
    rec = out.reconstruction_loss["reconstruction_loss"]
    assert rec.shape == (3,) and torch.isfinite(rec).all() and torch.isfinite(out.loss)
    # loss = mean over all masked tokens, as CrossEntropyLoss(ignore_index=6) of pretrain.py
    labels = tokens.masked_fill(~inf["mask"], 6)
    full_logits = m.mlm_logits(inf["hidden"])
    official = torch.nn.functional.cross_entropy(
        full_logits.transpose(1, 2), labels, ignore_index=6
    )
    torch.testing.assert_close(out.loss, official)
    projections = [b.clone() for n, b in m.named_buffers() if n.endswith("projection_matrix")]
    out.loss.backward()
    assert m.token_emb.weight.grad.abs().sum() > 0
    assert m.performer.net.layers[0][0].fn.to_q.weight.grad.abs().sum() > 0
    assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)
    assert 0.0 <= float(out.extra_metrics["mlm_accuracy"]) <= 1.0
    # training-mode forwards never redraw the random features
    for _ in range(3):
        m(tensors)
    after = [b for n, b in m.named_buffers() if n.endswith("projection_matrix")]
    assert all(torch.equal(a, b) for a, b in zip(projections, after, strict=True))
    # no chosen token: a zero loss that still backpropagates
    _, _, empty = m({"input_ids": torch.zeros(2, N_GENES + 1, dtype=torch.long)})
    assert float(empty.loss.detach()) == 0.0 and empty.reconstruction_loss[
        "reconstruction_loss"
    ].shape == (2,)
    empty.loss.backward()


def test_classification_loss():
    m = _module(n_labels=4, classifier_hidden=HIDDEN)
    tokens = random_tokens(5, N_GENES, seed=9)
    labels = torch.tensor([[0], [1], [3], [2], [1]])
    _, gen, out = m({"input_ids": tokens, REGISTRY_KEYS.LABELS_KEY: labels})
    assert gen["logits"].shape == (5, 4)
    torch.testing.assert_close(gen["logits"], m.classify(tokens))
    ce = out.reconstruction_loss["reconstruction_loss"]
    assert ce.shape == (5,) and torch.isfinite(out.loss)
    torch.testing.assert_close(out.loss, ce.mean())
    out.loss.backward()
    assert m.to_out.fc3.weight.grad.abs().sum() > 0 and m.to_out.conv1.weight.grad is not None
    with pytest.raises(KeyError, match="labels"):
        m({"input_ids": tokens})
    with pytest.raises(ValueError, match="Label codes"):
        m({"input_ids": tokens, REGISTRY_KEYS.LABELS_KEY: labels + 3})


# ------------------------------------------------------------------------------ loading errors
def _load_error(module, sd, **kwargs) -> str:
    with pytest.raises(RuntimeError) as info:
        load_scbert_state_dict(module, sd, **kwargs)
    return str(info.value)


def test_strict_loading_errors_explain():
    sd = _official()
    msg = _load_error(SCBERTModule(N_GENES + 10, **SIZES), sd)
    assert "pos_emb.emb.weight: checkpoint (41, 16) vs module (51, 16)" in msg
    assert "gene-panel size" in msg
    msg = _load_error(SCBERTModule(N_GENES, **{**SIZES, "depth": 3}), sd)
    assert "missing keys" in msg and "Performer layers [2] are missing" in msg
    msg = _load_error(SCBERTModule(N_GENES, **{**SIZES, "depth": 1}), sd)
    assert "Performer layers [1] are unexpected" in msg
    msg = _load_error(SCBERTModule(N_GENES, **{**SIZES, "heads": 4}), sd)
    assert "heads x dim_head" in msg and "to_q.weight" in msg
    msg = _load_error(SCBERTModule(N_GENES, **{**SIZES, "dim_head": 4, "heads": 4}), sd)
    assert "dim_head or nb_features" in msg
    msg = _load_error(SCBERTModule(N_GENES, **SIZES, num_tokens=9), sd)
    assert "num_tokens" in msg
    msg = _load_error(SCBERTModule(N_GENES, **SIZES, position_embedding=False), sd)
    assert "use position_embedding=True" in msg
    no_pos = {k: v for k, v in sd.items() if k != "pos_emb.emb.weight"}
    assert "position_embedding=False" in _load_error(SCBERTModule(N_GENES, **SIZES), no_pos)
    extra = {**sd, "performer.net.layers.0.0.fn.local_attn.rel_pos": torch.zeros(1)}
    assert "unexpected keys (1)" in _load_error(SCBERTModule(N_GENES, **SIZES), extra)


def test_head_mismatch_and_init_missing_head():
    pretrained = _official()
    finetuned = _official(n_labels=3)
    clf = SCBERTModule(N_GENES, **SIZES, n_labels=3, classifier_hidden=HIDDEN)
    msg = _load_error(clf, pretrained)
    assert "to_out.weight" in msg and "init_missing_head=True" in msg
    head = {k: v.clone() for k, v in clf.state_dict().items() if k.startswith("to_out.")}
    load_scbert_state_dict(clf, pretrained, init_missing_head=True)
    for k, v in clf.state_dict().items():
        if k.startswith("to_out."):
            assert torch.equal(v, head[k])  # fresh head kept
        else:
            assert torch.equal(v, pretrained[k])
    msg = _load_error(SCBERTModule(N_GENES, **SIZES), finetuned)
    assert "fine-tuned" in msg and "n_labels" in msg
    msg = _load_error(
        SCBERTModule(N_GENES, **SIZES, n_labels=5, classifier_hidden=HIDDEN), finetuned
    )
    assert "n_labels differs" in msg
    msg = _load_error(SCBERTModule(N_GENES, **SIZES, n_labels=3), finetuned)
    assert "classifier_hidden" in msg


def test_reader_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_scbert_checkpoint(tmp_path / "absent.pth")
    torch.save({"epoch": 1, "optimizer_state_dict": {}}, tmp_path / "noweights.pth")
    with pytest.raises(ValueError, match="model_state_dict"):
        read_scbert_checkpoint(tmp_path / "noweights.pth")
    torch.save([torch.zeros(1)], tmp_path / "list.pth")
    with pytest.raises(ValueError, match="not a checkpoint dict"):
        read_scbert_checkpoint(tmp_path / "list.pth")

    class Payload:
        def __reduce__(self):
            return (print, ("pickled code ran",))

    with open(tmp_path / "evil.pth", "wb") as f:
        pickle.dump({"model_state_dict": Payload()}, f, protocol=2)
    with pytest.raises(RuntimeError, match="weights_only"):
        read_scbert_checkpoint(tmp_path / "evil.pth")
    with pytest.raises(KeyError, match="Not an scBERT"):
        scbert_config_from_state_dict({"encoder.weight": torch.zeros(1)})
    biased = {**_official(), "performer.net.layers.0.0.fn.to_q.bias": torch.zeros(16)}
    with pytest.raises(ValueError, match="qkv_bias"):
        scbert_config_from_state_dict(biased)
    kwargs = scbert_module_kwargs(scbert_config_from_state_dict(_official()), stabilizer="batch")
    assert kwargs["stabilizer"] == "batch" and kwargs["n_genes"] == N_GENES
