"""Performer (FAVOR+) attention: official key layout, parity with a plain reference, batch
invariance of the per-cell stabiliser, padding, fixed random features, linear memory."""

from __future__ import annotations

import resource
import sys

import pytest
import torch
from reference_scbert import official_state_dict, reference_performer

from cellformers.nn import (
    FastAttention,
    Performer,
    gaussian_orthogonal_random_matrix,
    linear_attention,
    softmax_kernel_features,
)

DIM, DEPTH, HEADS, DH = 16, 2, 2, 8


def _performer_sd(seed=0, **kwargs):
    """The ``performer.*`` part of a random official state dict, without the prefix."""
    sd = official_state_dict(n_genes=10, dim=DIM, depth=DEPTH, heads=HEADS, dim_head=DH, seed=seed)
    return {k.removeprefix("performer."): v for k, v in sd.items() if k.startswith("performer.")}


def _loaded(stabilizer="cell", seed=0):
    p = Performer(DIM, DEPTH, HEADS, DH, stabilizer=stabilizer)
    p.load_state_dict(_performer_sd(seed), strict=True)
    return p.eval()


def _cells(lengths, seed=1, scale=None):
    g = torch.Generator().manual_seed(seed)
    cells = [torch.randn(n, DIM, generator=g) for n in lengths]
    if scale is not None:
        cells = [c * s for c, s in zip(cells, scale, strict=True)]
    return cells


# ------------------------------------------------------------------------------ layout
def test_official_key_layout_and_shapes():
    p = Performer(200, 6, 10, 64)
    sd = p.state_dict()
    assert (
        sd["calls_since_last_redraw"].dtype == torch.int64
        and sd["calls_since_last_redraw"].dim() == 0
    )
    for i in range(6):
        pre = f"net.layers.{i}."
        assert sd[pre + "0.fn.fast_attention.projection_matrix"].shape == (266, 64)
        for name in ("to_q", "to_k", "to_v"):
            assert sd[pre + f"0.fn.{name}.weight"].shape == (640, 200)
            assert pre + f"0.fn.{name}.bias" not in sd  # scBERT: qkv_bias=False
        assert sd[pre + "0.fn.to_out.weight"].shape == (200, 640)
        assert sd[pre + "0.fn.to_out.bias"].shape == (200,)
        assert sd[pre + "1.fn.fn.w1.weight"].shape == (800, 200)
        assert sd[pre + "1.fn.fn.w2.weight"].shape == (200, 800)
        for j in (0, 1):
            assert sd[pre + f"{j}.norm.weight"].shape == (200,)
    assert len(sd) == 1 + 6 * 14
    # scFoundation's decoder: dim 512, 8 heads, qkv bias
    sf = Performer(512, 1, 8, 64, qkv_bias=True).state_dict()
    assert sf["net.layers.0.0.fn.to_q.bias"].shape == (512,)
    assert sf["net.layers.0.0.fn.to_k.weight"].shape == (512, 512)
    assert sf["net.layers.0.1.fn.fn.w1.weight"].shape == (2048, 512)


def test_random_feature_matrix():
    g = torch.Generator().manual_seed(0)
    P = gaussian_orthogonal_random_matrix(266, 64, generator=g)
    assert P.shape == (266, 64)
    unit = P / P.norm(dim=1, keepdim=True)
    for start in range(0, 256, 64):  # rows within each block are orthogonal
        block = unit[start : start + 64]
        assert torch.allclose(block @ block.T, torch.eye(64), atol=1e-5)
    # Gaussian row norms (chi with 64 degrees of freedom, mean about 8)
    assert 7.0 < P.norm(dim=1).mean() < 9.0
    constant = gaussian_orthogonal_random_matrix(10, 4, scaling=1, generator=g)
    assert torch.allclose(constant.norm(dim=1), torch.full((10,), 2.0))
    with pytest.raises(ValueError, match="scaling"):
        gaussian_orthogonal_random_matrix(4, 4, scaling=2)


def test_linear_attention_equals_quadratic_form():
    g = torch.Generator().manual_seed(0)
    q, k = torch.rand(2, 3, 7, 5, generator=g), torch.rand(2, 3, 7, 5, generator=g)
    v = torch.randn(2, 3, 7, 4, generator=g)
    A = q @ k.transpose(-1, -2)
    expected = (A @ v) / A.sum(-1, keepdim=True)
    torch.testing.assert_close(linear_attention(q, k, v), expected, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------ parity
@pytest.mark.parametrize("stabilizer", ["cell", "batch"])
def test_single_cell_matches_reference(stabilizer):
    p = _loaded(stabilizer)
    sd = _performer_sd()
    for x in _cells([1, 9, 23]):
        (ref,) = reference_performer([x], sd, HEADS, DH, prefix="net.layers.")
        with torch.no_grad():
            out = p(x[None])[0]
        assert (out - ref).abs().max() <= 1e-5


def test_batch_stabilizer_matches_official_batch_behaviour():
    cells = _cells([12, 12, 12], scale=[1.0, 4.0, 0.5])
    sd = _performer_sd()
    ref = torch.stack(reference_performer(cells, sd, HEADS, DH, prefix="net.layers."))
    with torch.no_grad():
        out = _loaded("batch")(torch.stack(cells))
    assert (out - ref).abs().max() <= 1e-5
    # the official outputs do depend on the batch: the small cell differs from its batch-1 result
    alone = reference_performer([cells[2]], sd, HEADS, DH, prefix="net.layers.")[0]
    assert (ref[2] - alone).abs().max() > 1e-4


def test_cell_stabilizer_is_batch_invariant():
    p = _loaded("cell")
    cells = _cells([15, 15, 15, 15], scale=[1.0, 5.0, 0.3, 2.0])
    with torch.no_grad():
        batched = p(torch.stack(cells))
        for order in ([2, 0, 3, 1], [3, 2]):
            reordered = p(torch.stack([cells[i] for i in order]))
            for row, i in enumerate(order):
                assert (reordered[row] - batched[i]).abs().max() <= 1e-5
        for i, x in enumerate(cells):
            assert (p(x[None])[0] - batched[i]).abs().max() <= 1e-5


def test_padding_is_ignored():
    p = _loaded("cell")
    cells = _cells([5, 11, 8], scale=[1.0, 3.0, 0.5])
    L = 11
    x = torch.zeros(3, L, DIM)
    pad = torch.ones(3, L, dtype=torch.bool)
    for i, c in enumerate(cells):
        x[i, : len(c)] = c
        x[i, len(c) :] = 100.0  # garbage at padded positions must not leak
        pad[i, : len(c)] = False
    with torch.no_grad():
        out = p(x, key_padding_mask=pad)
        for i, c in enumerate(cells):
            alone = p(c[None])[0]
            assert (out[i, : len(c)] - alone).abs().max() <= 1e-5
        # no padding at all equals no mask
        full = torch.zeros(3, L, dtype=torch.bool)
        torch.testing.assert_close(p(x, key_padding_mask=full), p(x), rtol=0, atol=0)
    # the batch stabiliser ignores padded keys too
    pb = _loaded("batch")
    with torch.no_grad():
        out_b = pb(x, key_padding_mask=pad)
    ref = reference_performer(cells, _performer_sd(), HEADS, DH, prefix="net.layers.")
    for i, c in enumerate(cells):
        assert (out_b[i, : len(c)] - ref[i]).abs().max() <= 1e-5
    with pytest.raises(TypeError, match="bool"):
        p(x, key_padding_mask=pad.long())
    with pytest.raises(ValueError, match="shape"):
        p(x, key_padding_mask=pad[:, :3])


def test_kernel_features_positive_and_masked():
    g = torch.Generator().manual_seed(0)
    P = torch.randn(12, 4, generator=g)
    k = torch.randn(2, 3, 5, 4, generator=g)
    pad = torch.tensor([[False] * 5, [False, False, True, True, True]])
    f = softmax_kernel_features(k, P, is_query=False, key_padding_mask=pad)
    assert (f[1, :, 2:] == 0).all() and (f[~pad[:, None, :, None].expand_as(f)] > 0).all()
    with pytest.raises(ValueError, match="stabilizer"):
        softmax_kernel_features(k, P, is_query=False, stabilizer="global")


# ------------------------------------------------------------------------------ random features
def test_projections_are_fixed_unless_redrawn():
    p = _loaded("cell")
    before = {k: v.clone() for k, v in p.state_dict().items()}
    p.train()
    x = torch.randn(2, 6, DIM)
    for _ in range(5):
        p(x).sum().backward()
    after = p.state_dict()
    for k in before:
        if k.endswith("projection_matrix") or k == "calls_since_last_redraw":
            assert torch.equal(before[k], after[k]), k
    assert int(after["calls_since_last_redraw"]) == 37  # as loaded
    p.redraw_projections(torch.Generator().manual_seed(3))
    new = p.state_dict()
    assert int(new["calls_since_last_redraw"]) == 0
    P = "net.layers.0.0.fn.fast_attention.projection_matrix"
    assert not torch.equal(new[P], before[P]) and new[P].shape == before[P].shape


def test_stabilizer_setting_and_validation():
    p = Performer(DIM, DEPTH, HEADS, DH)
    assert p.stabilizer == "cell"
    p.stabilizer = "batch"
    assert all(m.stabilizer == "batch" for m in p.modules() if isinstance(m, FastAttention))
    with pytest.raises(ValueError, match="stabilizer"):
        p.stabilizer = "global"
    with pytest.raises(ValueError, match="stabilizer"):
        Performer(DIM, 1, 2, 4, stabilizer="none")
    with pytest.raises(ValueError, match="n_layers"):
        p(torch.randn(1, 3, DIM), n_layers=3)
    with pytest.raises(ValueError, match="Expected input"):
        p(torch.randn(1, 3, DIM + 1))


def test_gradients_finite_and_ff_chunks():
    p = Performer(DIM, DEPTH, HEADS, DH, qkv_bias=True)
    chunked = Performer(DIM, DEPTH, HEADS, DH, qkv_bias=True, ff_chunks=3)
    chunked.load_state_dict(p.state_dict())
    x = torch.randn(2, 10, DIM, requires_grad=True)
    out = p(x)
    torch.testing.assert_close(chunked(x), out)
    out.pow(2).mean().backward()
    assert torch.isfinite(x.grad).all()
    assert all(torch.isfinite(q.grad).all() for q in p.parameters() if q.grad is not None)
    assert p.net.layers[0][0].fn.to_q.weight.grad.abs().sum() > 0


# ------------------------------------------------------------------------------ memory
def _peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def test_full_panel_length_runs_in_linear_memory():
    """16,907 positions (scBERT's panel + 1) at dim 200 and 10 heads on CPU, batch 1.

    One L x L score matrix would take 16,907^2 * 4 B = 1.1 GB per head (11 GB for 10 heads);
    the linear form needs a few [heads, L, 266] tensors (about 180 MB each).
    """
    torch.manual_seed(0)
    p = Performer(200, 1, 10, 64).eval()
    x = torch.randn(1, 16907, 200)
    before = _peak_rss_bytes()
    with torch.no_grad():
        out = p(x)
    assert out.shape == (1, 16907, 200) and torch.isfinite(out).all()
    assert _peak_rss_bytes() - before < 1.5e9
