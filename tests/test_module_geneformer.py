"""GeneformerModule: masking, losses, input checks, invariance; the nn extensions it uses."""

from __future__ import annotations

import pytest
import torch
from scvi import REGISTRY_KEYS

from cellformers.module import GeneformerModule
from cellformers.nn import MaskedLMHead, TransformerEncoder, TransformerEncoderLayer

V, PAD, MASK = 60, 0, 1
H = 32


def _module(**kwargs):
    torch.manual_seed(0)
    defaults = {
        "hidden_size": H,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "intermediate_size": 48,
        "max_position_embeddings": 64,
    }
    return GeneformerModule(V, **{**defaults, **kwargs})


def _batch(lengths, seed=0, vocab=V):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.as_tensor(lengths)
    L = int(lengths.max())
    ids = torch.randint(2, vocab, (len(lengths), L), generator=g)
    ids = ids.masked_fill(torch.arange(L)[None, :] >= lengths[:, None], PAD)
    return ids, lengths


# ------------------------------------------------------------------------------ structure
def test_bert_layer_settings():
    m = _module(hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.3, layer_norm_eps=1e-12)
    for layer in m.encoder.layers:
        assert isinstance(layer, TransformerEncoderLayer) and not layer.norm_first
        assert layer.self_attn.dropout == 0.3
        assert layer.dropout1.p == layer.dropout2.p == 0.1
        assert layer.dropout.p == 0.0  # BERT has no dropout on the feed-forward activation
        assert layer.norm1.eps == layer.norm2.eps == 1e-12
        assert layer.activation_name == "relu"
    assert m.embeddings.dropout.p == 0.1 and m.embeddings.norm.eps == 1e-12
    assert m.embeddings.word_embeddings.padding_idx == PAD
    # HF initialisation: normal(0, 0.02), pad row and biases zero, layer norms (1, 0)
    w = m.encoder.layers[0].self_attn.in_proj_weight
    assert 0.015 < w.std().item() < 0.025
    assert m.embeddings.word_embeddings.weight[PAD].abs().max() == 0
    assert m.mlm_head.bias.abs().max() == 0
    assert m.classifier is None and m.pooler is None and m.objective == "mlm"


def test_classifier_heads_and_dropout():
    m = _module(n_labels=5, hidden_dropout_prob=0.1)
    assert m.pooler.weight.shape == (H, H) and m.classifier.weight.shape == (5, H)
    assert m.classifier_dropout.p == 0.1
    assert _module(n_labels=5, classifier_dropout=0.4).classifier_dropout.p == 0.4
    assert _module(n_labels=2, mlm_head=False).objective == "classification"


def test_tied_output_matrix():
    m = _module()
    ids, lengths = _batch([9, 5])
    out = m.mlm_logits(m.hidden_states(ids, lengths))
    assert out.shape == (2, 9, V)
    out[0, 0].sum().backward()
    # the output matrix is the embedding matrix: every row receives a gradient through it
    grad = m.embeddings.word_embeddings.weight.grad
    assert (grad.abs().sum(dim=1) > 0).sum() > V // 2
    assert "mlm_head.decoder.weight" not in m.state_dict()
    with torch.no_grad():
        m.embeddings.word_embeddings.weight[7] += 1.0
    assert not torch.equal(m.mlm_logits(m.hidden_states(ids, lengths))[..., 7], out[..., 7])


def test_invalid_arguments():
    with pytest.raises(ValueError, match="hidden_act"):
        _module(hidden_act="tanh")
    with pytest.raises(ValueError, match="divisible"):
        _module(num_attention_heads=5)
    with pytest.raises(ValueError, match="mask_token_id"):
        _module(mask_token_id=V)


def test_objective_setter():
    m = _module()
    with pytest.raises(ValueError, match="objective must be one of"):
        m.objective = "contrastive"
    with pytest.raises(ValueError, match="n_labels > 0"):
        m.objective = "classification"
    c = _module(n_labels=3, mlm_head=False)
    with pytest.raises(ValueError, match="mlm_head=True"):
        c.objective = "mlm"
    both = _module(n_labels=3)
    both.objective = "classification"
    assert both.objective == "classification"


# ------------------------------------------------------------------------------ encoding
def test_hidden_states_layers_and_padding():
    m = _module().eval()
    ids, lengths = _batch([12, 4, 7])
    pad = torch.arange(12)[None, :] >= lengths[:, None]
    with torch.inference_mode():
        states = [m.hidden_states(ids, lengths, n_layers=k) for k in range(4)]
        assert torch.equal(states[3], m.hidden_states(ids, lengths))
        assert torch.equal(states[2], m.hidden_states(ids, lengths, n_layers=-2))
        assert torch.equal(states[0], m.hidden_states(ids, lengths, n_layers=-4))
        # layer k+1 applied to layer k's output
        nxt = m.encoder.layers[2](states[2], key_padding_mask=pad)
    assert (nxt[~pad] - states[3][~pad]).abs().max() <= 1e-5
    for s in states:
        assert s.shape == (3, 12, H) and s[pad].abs().max() == 0
    with pytest.raises(ValueError, match="n_layers must be in"):
        m.hidden_states(ids, lengths, n_layers=4)
    with pytest.raises(ValueError, match="n_layers must be in"):
        m.hidden_states(ids, lengths, n_layers=-5)


def test_batch_and_order_invariance():
    m = _module(n_labels=3).eval()
    ids, lengths = _batch([15, 3, 9, 15, 1], seed=1)
    with torch.inference_mode():
        hidden = m.hidden_states(ids, lengths)
        logits = m.classify(ids, lengths)
        perm = torch.tensor([3, 0, 4, 2, 1])
        assert (m.classify(ids[perm], lengths[perm]) - logits[perm]).abs().max() <= 1e-5
        for i, n in enumerate(lengths.tolist()):
            alone = m.hidden_states(ids[i : i + 1, :n], lengths[i : i + 1])
            assert (alone[0] - hidden[i, :n]).abs().max() <= 1e-5
            assert (
                m.classify(ids[i : i + 1, :n], lengths[i : i + 1]) - logits[i]
            ).abs().max() <= 1e-5


def test_input_checks():
    m = _module().eval()
    ids, lengths = _batch([5, 3])
    with pytest.raises(ValueError, match=r"lengths must be in \[1, 5\]"):
        m.hidden_states(ids, torch.tensor([5, 0]))
    assert torch.equal(
        m.hidden_states(ids, lengths[:, None].float()), m.hidden_states(ids, lengths)
    )
    with pytest.raises(ValueError, match=r"lengths must have shape \(2,\)"):
        m.hidden_states(ids, torch.tensor([5]))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        m.hidden_states(torch.full((1, 65), 3), torch.tensor([65]))
    with pytest.raises(ValueError, match=r"token ids in \[0, 60\)"):
        m.hidden_states(ids + V, lengths)
    with pytest.raises(RuntimeError, match="n_labels=0"):
        m.classify(ids, lengths)
    with pytest.raises(RuntimeError, match="mlm_head=False"):
        _module(mlm_head=False).mlm_logits(torch.zeros(2, H))


# ------------------------------------------------------------------------------ masking
def test_random_mask_equals_transformers_collator():
    transformers = pytest.importorskip("transformers")

    class Tokenizer:  # the two specials Geneformer's precollator registers
        mask_token, pad_token = "<mask>", "<pad>"

        def __len__(self):
            return V

        def convert_tokens_to_ids(self, token):
            return {"<mask>": MASK, "<pad>": PAD}[token]

    collator = transformers.DataCollatorForLanguageModeling(Tokenizer(), mlm_probability=0.15)
    m = _module()
    ids, lengths = _batch([40, 17, 33, 40], seed=2)
    ids[1, 3] = MASK
    torch.manual_seed(11)
    expected, labels = collator.torch_mask_tokens(
        ids.clone(), special_tokens_mask=(ids == PAD) | (ids == MASK)
    )
    torch.manual_seed(11)
    got, mask = m.random_mask(ids, lengths)
    assert torch.equal(got, expected) and torch.equal(mask, labels != -100)


def test_random_mask_statistics():
    m = _module(mlm_probability=0.15)
    ids, lengths = _batch(torch.randint(20, 64, (400,), generator=torch.Generator().manual_seed(0)))
    ids[:, 5] = MASK  # an input <mask> is never chosen
    real = (torch.arange(ids.shape[1])[None, :] < lengths[:, None]) & (ids != MASK)
    torch.manual_seed(0)
    masked, mask = m.random_mask(ids, lengths)
    assert not mask[~real].any()
    assert torch.equal(masked[~mask], ids[~mask])
    n = mask.sum().item()
    assert abs(n / real.sum().item() - 0.15) < 0.01
    to_mask = (masked[mask] == MASK).float().mean().item()
    changed = ((masked[mask] != MASK) & (masked[mask] != ids[mask])).float().mean().item()
    assert abs(to_mask - 0.8) < 0.02
    assert abs(changed - 0.1 * (1 - 1 / V)) < 0.015  # a random id may equal the original
    assert masked.min() >= 0 and masked.max() < V


# ------------------------------------------------------------------------------ losses
def test_mlm_loss():
    m = _module()
    ids, lengths = _batch([30, 12, 1, 25], seed=3)
    torch.manual_seed(0)
    inf, gen, out = m({"input_ids": ids, "lengths": lengths}, compute_loss=True)
    mask = inf["mask"]
    assert gen["mlm_logits"].shape == (mask.sum().item(), V)
    rec = out.reconstruction_loss["reconstruction_loss"]
    assert rec.shape == (4,) and torch.isfinite(out.loss)
    ce = torch.nn.functional.cross_entropy(gen["mlm_logits"], ids[mask], reduction="none")
    assert torch.allclose(out.loss, ce.mean())
    rows = mask.nonzero()[:, 0]
    for i in range(4):
        expected = ce[rows == i].mean() if (rows == i).any() else torch.tensor(0.0)
        assert torch.allclose(rec[i], expected)
    assert not mask[2].any() and rec[2] == 0  # a one-token cell may have nothing masked
    acc = out.extra_metrics["mlm_accuracy"]
    assert acc.dim() == 0 and 0 <= acc <= 1
    out.loss.backward()
    assert m.encoder.layers[0].self_attn.in_proj_weight.grad.abs().sum() > 0
    assert m.mlm_head.dense.weight.grad.abs().sum() > 0


def test_mlm_loss_without_masked_tokens():
    m = _module()
    ids, lengths = _batch([6, 4])
    inf, _, out = m({"input_ids": ids, "lengths": lengths}, inference_kwargs={"mask": False})
    assert not inf["mask"].any() and torch.equal(inf["target"], ids)
    assert out.loss.item() == 0 and out.reconstruction_loss["reconstruction_loss"].shape == (2,)
    out.loss.backward()


def test_classification_loss():
    m = _module(n_labels=3)
    m.objective = "classification"
    ids, lengths = _batch([10, 7, 3, 10], seed=4)
    labels = torch.tensor([[0.0], [2.0], [1.0], [2.0]])
    tensors = {"input_ids": ids, "lengths": lengths, REGISTRY_KEYS.LABELS_KEY: labels}
    _, gen, out = m(tensors)
    assert gen["logits"].shape == (4, 3)
    rec = out.reconstruction_loss["reconstruction_loss"]
    assert rec.shape == (4,) and torch.isfinite(out.loss)
    ce = torch.nn.functional.cross_entropy(gen["logits"], labels.view(-1).long(), reduction="none")
    assert torch.allclose(rec, ce) and torch.allclose(out.loss, ce.mean())
    assert out.extra_metrics["accuracy"].dim() == 0
    out.loss.backward()
    assert m.classifier.weight.grad.abs().sum() > 0 and m.pooler.weight.grad.abs().sum() > 0
    m.eval()
    with torch.inference_mode():
        assert (m.classify(ids, lengths) - m(tensors)[1]["logits"]).abs().max() <= 1e-6

    with pytest.raises(KeyError, match="labels"):
        m({"input_ids": ids, "lengths": lengths})
    with pytest.raises(ValueError, match=r"Label codes must be in \[0, 3\)"):
        m({**tensors, REGISTRY_KEYS.LABELS_KEY: labels + 2})


def test_meta_device_and_dtype():
    with torch.device("meta"):
        m = GeneformerModule(25426)
    assert sum(p.numel() for p in m.parameters()) == 10_288_722  # Geneformer-V1-10M
    d = _module().double().eval()
    ids, lengths = _batch([5, 2])
    assert d.hidden_states(ids, lengths).dtype == torch.float64


# ------------------------------------------------------------------------------ nn extensions
def _stack(norm=None):
    torch.manual_seed(0)
    return TransformerEncoder(
        lambda: TransformerEncoderLayer(H, 4, 48, 0.0, layer_norm_eps=1e-12), 3, norm=norm
    ).eval()


@pytest.mark.parametrize("padded", [False, True])
def test_encoder_runs_first_k_layers(padded):
    enc = _stack()
    x = torch.randn(3, 8, H)
    mask = torch.arange(8)[None, :] >= torch.tensor([8, 3, 6])[:, None] if padded else None
    keep = ~mask if padded else torch.ones(3, 8, dtype=torch.bool)
    with torch.no_grad():
        assert torch.equal(enc(x, mask, n_layers=0), x)
        ref = x
        for k in range(1, 4):
            ref = enc.layers[k - 1](ref, key_padding_mask=mask)
            got = enc(x, mask, n_layers=k)
            assert (got[keep] - ref[keep]).abs().max() <= 1e-5
            first = enc(x, mask, n_layers=k, n_queries=1)
            assert first.shape == (3, 1, H)
            assert (first[:, 0] - ref[:, 0]).abs().max() <= 1e-5
    with pytest.raises(ValueError, match=r"n_layers must be in \[0, 3\]"):
        enc(x, mask, n_layers=4)


def test_encoder_final_norm_only_after_all_layers():
    norm = torch.nn.LayerNorm(H)
    with torch.no_grad():
        norm.bias.fill_(3.0)
    enc = _stack(norm)
    x = torch.randn(2, 5, H)
    with torch.no_grad():
        inner = enc(x, n_layers=2)
        assert torch.equal(enc(x), enc(x, n_layers=3))
        assert (enc(x) - norm(enc.layers[2](inner))).abs().max() <= 1e-5
        assert (inner.mean(-1) - 3.0).abs().min() > 0.5  # not normalised


def test_layer_dropout_defaults_unchanged():
    layer = TransformerEncoderLayer(H, 4, 48, 0.2)
    assert layer.self_attn.dropout == 0.2 and layer.dropout.p == 0.2
    layer = TransformerEncoderLayer(H, 4, 48, 0.2, attention_dropout=0.0, activation_dropout=0.05)
    assert layer.self_attn.dropout == 0.0 and layer.dropout.p == 0.05
    assert layer.dropout1.p == layer.dropout2.p == 0.2


def test_masked_lm_head():
    head = MaskedLMHead(H, V, activation="relu")
    emb = torch.randn(V, H)
    x = torch.randn(2, 3, H)
    expected = head.norm(torch.relu(head.dense(x))) @ emb.T + head.bias
    assert torch.allclose(head(x, emb), expected, atol=1e-6)
    with pytest.raises(ValueError, match="activation"):
        MaskedLMHead(H, V, activation="swish")
