from __future__ import annotations

import pytest
import torch

from cellformers.module import SCGPTModule

V, PAD, CLS = 300, 297, 298
D = 32


def _module(**kwargs):
    torch.manual_seed(0)
    defaults = {"d_model": D, "nhead": 4, "d_hid": 48, "nlayers": 2}
    return SCGPTModule(V, pad_id=PAD, **{**defaults, **kwargs})


def _batch(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    L = max(lengths)
    genes = torch.full((len(lengths), L), PAD, dtype=torch.long)
    values = torch.full((len(lengths), L), -2.0)
    for i, n in enumerate(lengths):
        genes[i, 0] = CLS
        genes[i, 1:n] = torch.randperm(PAD, generator=g)[: n - 1]
        values[i, 1:n] = torch.randint(1, 51, (n - 1,), generator=g).float()
    return genes, values


WHOLE_HUMAN_KEYS = [
    "encoder.embedding.weight",
    "encoder.enc_norm.weight",
    "encoder.enc_norm.bias",
    "value_encoder.linear1.weight",
    "value_encoder.linear1.bias",
    "value_encoder.linear2.weight",
    "value_encoder.linear2.bias",
    "value_encoder.norm.weight",
    "value_encoder.norm.bias",
    *[
        f"transformer_encoder.layers.{i}.{name}"
        for i in range(12)
        for name in (
            "self_attn.in_proj_weight",
            "self_attn.in_proj_bias",
            "self_attn.out_proj.weight",
            "self_attn.out_proj.bias",
            "linear1.weight",
            "linear1.bias",
            "linear2.weight",
            "linear2.bias",
            "norm1.weight",
            "norm1.bias",
            "norm2.weight",
            "norm2.bias",
        )
    ],
    "decoder.fc.0.weight",
    "decoder.fc.0.bias",
    "decoder.fc.2.weight",
    "decoder.fc.2.bias",
    "decoder.fc.4.weight",
    "decoder.fc.4.bias",
    "mvc_decoder.gene2query.weight",
    "mvc_decoder.gene2query.bias",
    "mvc_decoder.W.weight",
]


def test_whole_human_keys_shapes_and_size():
    with torch.device("meta"):
        m = SCGPTModule(60697, pad_id=60694)
    sd = m.state_dict()
    assert list(sd) == WHOLE_HUMAN_KEYS
    assert sd["encoder.embedding.weight"].shape == (60697, 512)
    assert sd["value_encoder.linear1.weight"].shape == (512, 1)
    assert sd["transformer_encoder.layers.11.self_attn.in_proj_weight"].shape == (1536, 512)
    assert sd["decoder.fc.4.weight"].shape == (1, 512)
    assert sd["mvc_decoder.W.weight"].shape == (512, 512)
    # spec A.1.3 / part C: 51 329 025 parameters without flag_encoder
    assert sum(p.numel() for p in m.parameters()) == 51_329_025


def test_no_mvc():
    m = _module(do_mvc=False)
    assert not any(k.startswith("mvc_decoder") for k in m.state_dict())
    genes, values = _batch([8, 5])
    _, gen, loss = m({"genes": genes, "values": values})
    assert "mvc_pred" not in gen and set(loss.extra_metrics) == {"mlm_mse"}


def test_init_like_official():
    m = _module()
    w = m.encoder.embedding.weight
    assert w.abs().max() <= 0.1 and w.std() > 0.05
    assert m.encoder.embedding.padding_idx == PAD


def test_constructor_validation():
    with pytest.raises(ValueError, match="pad_id"):
        SCGPTModule(10, pad_id=10)
    with pytest.raises(ValueError, match="mask_ratio"):
        SCGPTModule(10, pad_id=0, mask_ratio=1.0)


def test_padding_invariance():
    m = _module().eval()
    genes, values = _batch([6, 40, 23], seed=3)
    with torch.inference_mode():
        batched = m.cell_embedding(genes, values)
        for i, n in enumerate([6, 40, 23]):
            alone = m.cell_embedding(genes[i : i + 1, :n], values[i : i + 1, :n])
            assert (alone - batched[i]).abs().max() <= 1e-5


def test_gene_order_invariance():
    m = _module().eval()
    genes, values = _batch([20])
    perm = torch.cat([torch.zeros(1, dtype=torch.long), torch.randperm(19) + 1])
    with torch.inference_mode():
        a = m.cell_embedding(genes, values)
        b = m.cell_embedding(genes[:, perm], values[:, perm])
    assert (a - b).abs().max() <= 1e-5


def test_explicit_padding_mask_matches_default():
    m = _module().eval()
    genes, values = _batch([9, 4])
    with torch.inference_mode():
        a = m.encode(genes, values)
        b = m.encode(genes, values, genes == PAD)
    torch.testing.assert_close(a, b)


def test_shape_errors():
    m = _module()
    with pytest.raises(ValueError, match=r"\[batch, length\]"):
        m.encode(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 4))


def test_random_mask_excludes_cls_and_padding():
    m = _module(mask_ratio=0.4)
    genes, _ = _batch([50, 11, 2, 30, 33], seed=4)
    masked = m.random_mask(genes, generator=torch.Generator().manual_seed(0))
    assert not masked[:, 0].any()
    assert not masked[genes == PAD].any()
    n = (genes != PAD).sum(1) - 1
    assert masked.sum(1).tolist() == [int(k * 0.4) for k in n.tolist()]
    again = m.random_mask(genes, generator=torch.Generator().manual_seed(0))
    assert torch.equal(masked, again)
    # different cells get different positions (not one shared pattern)
    other = m.random_mask(genes, generator=torch.Generator().manual_seed(1))
    assert not torch.equal(masked, other)


def test_random_mask_uniform():
    m = _module(mask_ratio=0.5)
    genes, _ = _batch([11])
    gen = torch.Generator().manual_seed(0)
    freq = (
        torch.stack([m.random_mask(genes, generator=gen)[0] for _ in range(2000)]).float().mean(0)
    )
    assert freq[0] == 0
    assert (freq[1:] - 0.5).abs().max() < 0.05


def test_inference_outputs():
    m = _module()
    genes, values = _batch([12, 7])
    inf = m.inference(genes, values)
    assert inf["hidden"].shape == (2, 12, D)
    assert inf["cell_emb"].shape == (2, D)
    assert inf["gene_embs"].shape == (2, 12, D)
    assert inf["mask"].dtype == torch.bool
    torch.testing.assert_close(inf["target"], values)
    none = m.inference(genes, values, mask=False)
    assert not none["mask"].any()


def test_loss_output_and_formula(official_scgpt):
    from scgpt.loss import masked_mse_loss

    m = _module()
    genes, values = _batch([30, 14, 22])
    inf, gen, out = m({"genes": genes, "values": values})
    assert out.loss.dim() == 0
    assert out.reconstruction_loss["reconstruction_loss"].shape == (3,)
    assert set(out.extra_metrics) == {"mlm_mse", "mvc_mse"}
    assert all(v.dim() == 0 for v in out.extra_metrics.values())
    mlm = masked_mse_loss(gen["mlm_pred"], inf["target"], inf["mask"])
    mvc = masked_mse_loss(gen["mvc_pred"], inf["target"], inf["mask"])
    torch.testing.assert_close(out.loss, mlm + mvc)
    torch.testing.assert_close(out.extra_metrics["mlm_mse"], mlm.detach())


def test_loss_rejects_unknown_kwargs():
    m = _module()
    genes, values = _batch([5])
    with pytest.raises(TypeError):
        m({"genes": genes, "values": values}, loss_kwargs={"kl_weigth": 1.0})


def test_sample_not_implemented():
    with pytest.raises(NotImplementedError):
        _module().sample()


def test_masked_pretraining_reduces_loss():
    m = _module(dropout=0.0)
    genes, values = _batch([30, 25, 18, 30], seed=5)
    tensors = {"genes": genes, "values": values.long()}  # integer bins are accepted
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    losses = []
    torch.manual_seed(0)
    for _ in range(30):
        _, _, out = m(tensors)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5
    # the pad row of the embedding never receives gradient
    assert m.encoder.embedding.weight.grad[PAD].abs().max() == 0
