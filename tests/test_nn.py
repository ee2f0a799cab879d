from __future__ import annotations

import pytest
import torch
from torch import nn

from cellformers.nn import (
    ContinuousValueEncoder,
    MultiheadSelfAttention,
    TransformerEncoder,
    TransformerEncoderLayer,
)

D, H, HID = 32, 4, 48


def _padding_mask(lengths, L):
    return torch.arange(L)[None, :] >= torch.tensor(lengths)[:, None]


class _no_fastpath:
    def __enter__(self):
        self.prev = torch.backends.mha.get_fastpath_enabled()
        torch.backends.mha.set_fastpath_enabled(False)

    def __exit__(self, *exc):
        torch.backends.mha.set_fastpath_enabled(self.prev)


def _pair(norm_first=False, activation="relu", dropout=0.0):
    torch.manual_seed(0)
    ref = nn.TransformerEncoderLayer(
        D, H, HID, dropout, activation=activation, batch_first=True, norm_first=norm_first
    )
    ours = TransformerEncoderLayer(D, H, HID, dropout, activation=activation, norm_first=norm_first)
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def test_attention_keys_match_torch():
    ref = nn.MultiheadAttention(D, H, batch_first=True)
    ours = MultiheadSelfAttention(D, H)
    assert set(ours.state_dict()) == set(ref.state_dict())
    for k, v in ref.state_dict().items():
        assert ours.state_dict()[k].shape == v.shape


@pytest.mark.parametrize("use_mask", [False, True])
def test_attention_matches_torch(use_mask):
    torch.manual_seed(0)
    ref = nn.MultiheadAttention(D, H, batch_first=True)
    ours = MultiheadSelfAttention(D, H)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(3, 7, D)
    mask = _padding_mask([7, 4, 2], 7) if use_mask else None
    expected, _ = ref(x, x, x, key_padding_mask=mask, need_weights=False)
    got = ours(x, key_padding_mask=mask)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


def test_attention_rejects_float_mask():
    attn = MultiheadSelfAttention(D, H)
    with pytest.raises(TypeError, match="bool"):
        attn(
            torch.randn(1, 3, D),
            key_padding_mask=torch.zeros(1, 3).index_fill(1, torch.tensor([2]), 1.0),
        )


@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
@pytest.mark.parametrize("train", [False, True])
def test_layer_matches_torch(norm_first, activation, train):
    ref, ours = _pair(norm_first=norm_first, activation=activation)
    ref.train(train)
    ours.train(train)
    x = torch.randn(3, 9, D)
    mask = _padding_mask([9, 5, 3], 9)
    # torch's fast path (eval) leaves padded rows as zeros; compare it on real tokens only.
    expected = ref(x, src_key_padding_mask=mask)
    got = ours(x, key_padding_mask=mask)
    keep = ~mask
    torch.testing.assert_close(got[keep], expected[keep], atol=1e-6, rtol=0)
    with _no_fastpath():
        expected_full = ref(x, src_key_padding_mask=mask)
    torch.testing.assert_close(got, expected_full, atol=1e-6, rtol=0)
    # without padding
    torch.testing.assert_close(ours(x), ref(x), atol=1e-6, rtol=0)


def test_layer_gradients_match_torch():
    ref, ours = _pair()
    x = torch.randn(2, 6, D)
    mask = _padding_mask([6, 4], 6)
    ref(x, src_key_padding_mask=mask)[~mask].pow(2).sum().backward()
    ours(x, key_padding_mask=mask)[~mask].pow(2).sum().backward()
    ref_grads = dict(ref.named_parameters())
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[name].grad, atol=1e-5, rtol=1e-5)


def test_dropout_only_in_training():
    torch.manual_seed(0)
    layer = TransformerEncoderLayer(D, H, HID, dropout=0.5)
    x = torch.randn(2, 5, D)
    layer.eval()
    torch.testing.assert_close(layer(x), layer(x))
    layer.train()
    assert not torch.allclose(layer(x), layer(x))


@pytest.mark.parametrize("train", [False, True])
def test_encoder_matches_torch(train):
    torch.manual_seed(0)
    ref = nn.TransformerEncoder(
        nn.TransformerEncoderLayer(D, H, HID, 0.0, batch_first=True), 3, enable_nested_tensor=False
    )
    ours = TransformerEncoder(TransformerEncoderLayer(D, H, HID, 0.0), 3)
    assert list(ours.state_dict()) == list(ref.state_dict())
    ours.load_state_dict(ref.state_dict(), strict=True)
    ref.train(train)
    ours.train(train)
    x = torch.randn(4, 8, D)
    mask = _padding_mask([8, 6, 3, 1], 8)
    with _no_fastpath():
        expected = ref(x, src_key_padding_mask=mask)
    got = ours(x, key_padding_mask=mask)
    # real tokens match; padded positions are zero (as in torch's fast path)
    torch.testing.assert_close(got[~mask], expected[~mask], atol=1e-6, rtol=0)
    assert got[mask].abs().max() == 0
    torch.testing.assert_close(ours(x), ref(x), atol=1e-6, rtol=0)
    # only the first position, last layer computing just that query
    first = ours(x, key_padding_mask=mask, n_queries=1)
    assert first.shape == (4, 1, D)
    torch.testing.assert_close(first[:, 0], expected[:, 0], atol=1e-6, rtol=0)


@pytest.mark.parametrize("norm_first", [False, True])
def test_layer_n_queries_and_packed(norm_first):
    _, ours = _pair(norm_first=norm_first)
    ours.eval()
    x = torch.randn(3, 9, D)
    mask = _padding_mask([9, 5, 3], 9)
    full = ours(x, key_padding_mask=mask)
    torch.testing.assert_close(ours(x, key_padding_mask=mask, n_queries=2), full[:, :2])
    index = (~mask).reshape(-1).nonzero().squeeze(1)
    packed = ours.forward_packed(x.reshape(-1, D)[index], index, mask)
    torch.testing.assert_close(packed, full[~mask], atol=1e-6, rtol=0)


def test_encoder_gradients_through_packing():
    torch.manual_seed(0)
    ref = nn.TransformerEncoder(
        nn.TransformerEncoderLayer(D, H, HID, 0.0, batch_first=True), 2, enable_nested_tensor=False
    )
    ours = TransformerEncoder(TransformerEncoderLayer(D, H, HID, 0.0), 2)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(3, 7, D)
    mask = _padding_mask([7, 4, 2], 7)
    ref(x, src_key_padding_mask=mask)[~mask].pow(2).sum().backward()
    ours(x, key_padding_mask=mask)[~mask].pow(2).sum().backward()
    ref_grads = dict(ref.named_parameters())
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[name].grad, atol=1e-5, rtol=1e-5)


def test_encoder_layer_factory_gives_independent_layers():
    enc = TransformerEncoder(lambda: TransformerEncoderLayer(D, H, HID), 2)
    w0, w1 = (layer.linear1.weight for layer in enc.layers)
    assert not torch.equal(w0, w1)
    copied = TransformerEncoder(TransformerEncoderLayer(D, H, HID), 2)
    assert torch.equal(copied.layers[0].linear1.weight, copied.layers[1].linear1.weight)
    assert copied.layers[0].linear1.weight is not copied.layers[1].linear1.weight


def test_value_encoder_clamps():
    enc = ContinuousValueEncoder(D, dropout=0.0, max_value=512).eval()
    a = enc(torch.tensor([[512.0, 1e6, -2.0]]))
    torch.testing.assert_close(a[0, 0], a[0, 1])
    assert not torch.allclose(a[0, 0], a[0, 2])
