"""An independent, deliberately plain re-statement of scBERT's forward pass for parity tests.

Written from the algorithm in the spec (``PerformerLM`` of TencentAILabHealthcare/scBERT,
spec part B.2-B.4 and B.7), not from cellformers' modules: explicit loops over layers, cells
and heads, hand-written LayerNorm and erf-GELU, and the Performer attention evaluated in its
*quadratic* form ``A = q' k'^T``, ``out = A v / A 1`` (the same FAVOR+ approximation as the
linear-time ``q' (k'^T v)``, computed the other way round), so it is only usable on short
sequences. The key stabiliser is the official one: a single maximum over every cell, head,
position and feature of the batch given to :func:`reference_forward` (for one cell that is
that cell's own maximum).

:func:`official_state_dict` builds random weights under the official key names and shapes
(``panglao_pretrain.pth``'s ``model_state_dict``; with ``n_labels`` the fine-tuned layout whose
``to_out`` is the convolutional head). Weights are scaled so that attention, residuals and the
kernel's ``eps`` all matter numerically.
"""

from __future__ import annotations

import math

import torch

EPS_LN = 1e-5
EPS_KERNEL = 1e-4


def official_state_dict(
    *,
    n_genes: int,
    num_tokens: int = 7,
    dim: int = 16,
    depth: int = 2,
    heads: int = 2,
    dim_head: int = 8,
    nb_features: int | None = None,
    ff_mult: int = 4,
    n_labels: int = 0,
    classifier_hidden: tuple[int, int] = (512, 128),
    position_embedding: bool = True,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Random weights in the official ``PerformerLM`` key layout (float32; pos table float64)."""
    g = torch.Generator().manual_seed(seed)
    m = int(dim_head * math.log(dim_head)) if nb_features is None else nb_features
    inner = heads * dim_head

    def normal(*shape, std=1.0, mean=0.0):
        return torch.randn(*shape, generator=g) * std + mean

    sd: dict[str, torch.Tensor] = {"token_emb.weight": normal(num_tokens, dim)}
    if position_embedding:
        table = torch.randn(n_genes, dim, generator=g, dtype=torch.float64) * 0.5
        sd["pos_emb.emb.weight"] = torch.cat([table, torch.zeros(1, dim, dtype=torch.float64)])
    sd["performer.calls_since_last_redraw"] = torch.tensor(37)
    for i in range(depth):
        p = f"performer.net.layers.{i}."
        sd[p + "0.norm.weight"] = normal(dim, std=0.1, mean=1.0)
        sd[p + "0.norm.bias"] = normal(dim, std=0.1)
        sd[p + "0.fn.fast_attention.projection_matrix"] = normal(m, dim_head)
        for name in ("to_q", "to_k", "to_v"):
            sd[p + f"0.fn.{name}.weight"] = normal(inner, dim, std=1.0 / math.sqrt(dim))
        sd[p + "0.fn.to_out.weight"] = normal(dim, inner, std=1.0 / math.sqrt(inner))
        sd[p + "0.fn.to_out.bias"] = normal(dim, std=0.1)
        sd[p + "1.norm.weight"] = normal(dim, std=0.1, mean=1.0)
        sd[p + "1.norm.bias"] = normal(dim, std=0.1)
        sd[p + "1.fn.fn.w1.weight"] = normal(dim * ff_mult, dim, std=1.0 / math.sqrt(dim))
        sd[p + "1.fn.fn.w1.bias"] = normal(dim * ff_mult, std=0.1)
        sd[p + "1.fn.fn.w2.weight"] = normal(dim, dim * ff_mult, std=1.0 / math.sqrt(dim * ff_mult))
        sd[p + "1.fn.fn.w2.bias"] = normal(dim, std=0.1)
    sd["norm.weight"] = normal(dim, std=0.1, mean=1.0)
    sd["norm.bias"] = normal(dim, std=0.1)
    if n_labels:
        seq_len = n_genes + 1
        h1, h2 = classifier_hidden
        sd["to_out.conv1.weight"] = normal(1, 1, 1, dim, std=1.0 / math.sqrt(dim))
        sd["to_out.conv1.bias"] = normal(1, std=0.1)
        sd["to_out.fc1.weight"] = normal(h1, seq_len, std=1.0 / math.sqrt(seq_len))
        sd["to_out.fc1.bias"] = normal(h1, std=0.1)
        sd["to_out.fc2.weight"] = normal(h2, h1, std=1.0 / math.sqrt(h1))
        sd["to_out.fc2.bias"] = normal(h2, std=0.1)
        sd["to_out.fc3.weight"] = normal(n_labels, h2, std=1.0 / math.sqrt(h2))
        sd["to_out.fc3.bias"] = normal(n_labels, std=0.1)
    else:
        sd["to_out.weight"] = normal(num_tokens, dim, std=1.0 / math.sqrt(dim))
        sd["to_out.bias"] = normal(num_tokens, std=0.1)
    return sd


def _layer_norm(x, w, b):
    mean = x.mean(dim=-1, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + EPS_LN) * w + b


def _gelu(x):
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def reference_attention(xs, sd, prefix, heads, dim_head):
    """Official FAVOR+ self-attention of one layer for a list of cells (one batch).

    ``xs``: list of ``[length, dim]`` (already layer-normed). Returns the list of outputs.
    The key stabiliser is one maximum over all cells, heads, positions and features.
    """
    P = sd[prefix + "fast_attention.projection_matrix"]
    m = P.shape[0]
    c = dim_head**-0.25
    ratio = m**-0.5
    per_cell = []
    for x in xs:
        q = x @ sd[prefix + "to_q.weight"].T
        k = x @ sd[prefix + "to_k.weight"].T
        v = x @ sd[prefix + "to_v.weight"].T
        heads_qkv = []
        for h in range(heads):
            cols = slice(h * dim_head, (h + 1) * dim_head)
            qh, kh, vh = q[:, cols], k[:, cols], v[:, cols]
            dq = (c * qh) @ P.T
            dk = (c * kh) @ P.T
            heads_qkv.append((qh, kh, vh, dq, dk))
        per_cell.append(heads_qkv)
    global_max = max(float(dk.max()) for cell in per_cell for (*_, dk) in cell)
    outs = []
    for cell in per_cell:
        head_outs = []
        for qh, kh, vh, dq, dk in cell:
            q_norm = (qh**2).sum(dim=-1, keepdim=True) / 2.0 * c**2
            k_norm = (kh**2).sum(dim=-1, keepdim=True) / 2.0 * c**2
            row_max = dq.max(dim=-1, keepdim=True).values
            qf = ratio * (torch.exp(dq - q_norm - row_max) + EPS_KERNEL)
            kf = ratio * (torch.exp(dk - k_norm - global_max) + EPS_KERNEL)
            A = qf @ kf.T  # [length, length]: fine for the short test sequences
            head_outs.append((A @ vh) / A.sum(dim=-1, keepdim=True))
        out = torch.cat(head_outs, dim=-1)
        outs.append(out @ sd[prefix + "to_out.weight"].T + sd[prefix + "to_out.bias"])
    return outs


def reference_performer(xs, sd, heads, dim_head, prefix="performer.net.layers."):
    """Pre-norm Performer layers (no final norm) for a list of ``[length, dim]`` cells."""
    depth = 1 + max(int(k[len(prefix) :].split(".")[0]) for k in sd if k.startswith(prefix))
    xs = [x.clone() for x in xs]
    for i in range(depth):
        p = f"{prefix}{i}."
        normed = [_layer_norm(x, sd[p + "0.norm.weight"], sd[p + "0.norm.bias"]) for x in xs]
        attn = reference_attention(normed, sd, p + "0.fn.", heads, dim_head)
        xs = [x + a for x, a in zip(xs, attn, strict=True)]
        new = []
        for x in xs:
            h = _layer_norm(x, sd[p + "1.norm.weight"], sd[p + "1.norm.bias"])
            h = _gelu(h @ sd[p + "1.fn.fn.w1.weight"].T + sd[p + "1.fn.fn.w1.bias"])
            new.append(x + h @ sd[p + "1.fn.fn.w2.weight"].T + sd[p + "1.fn.fn.w2.bias"])
        xs = new
    return xs


def reference_forward(
    sd: dict[str, torch.Tensor],
    tokens: torch.Tensor,
    *,
    heads: int,
    dim_head: int,
    return_encodings: bool = False,
) -> torch.Tensor:
    """Official ``PerformerLM.forward`` on a batch of tokens ``[batch, length]``.

    All cells of ``tokens`` share the key stabiliser (official batch behaviour); call it with one
    cell for ``predict.py``'s batch-1 inference. Returns final states ``[batch, length, dim]``
    (``return_encodings``), token logits ``[batch, length, num_tokens]`` or, for the fine-tuned
    layout, class logits ``[batch, n_labels]``.
    """
    length = tokens.shape[1]
    xs = []
    for row in tokens:
        x = torch.stack([sd["token_emb.weight"][int(t)] for t in row])
        if "pos_emb.emb.weight" in sd:
            # float32 += float64 in the official code: summed in float64, rounded once
            x = (x.double() + sd["pos_emb.emb.weight"][:length]).float()
        xs.append(x)
    xs = reference_performer(xs, sd, heads, dim_head)
    xs = [_layer_norm(x, sd["norm.weight"], sd["norm.bias"]) for x in xs]
    if return_encodings:
        return torch.stack(xs)
    outs = []
    for x in xs:
        if "to_out.conv1.weight" in sd:
            h = x @ sd["to_out.conv1.weight"].reshape(-1) + sd["to_out.conv1.bias"]
            h = torch.relu(h)
            h = torch.relu(sd["to_out.fc1.weight"] @ h + sd["to_out.fc1.bias"])
            h = torch.relu(sd["to_out.fc2.weight"] @ h + sd["to_out.fc2.bias"])
            outs.append(sd["to_out.fc3.weight"] @ h + sd["to_out.fc3.bias"])
        else:
            outs.append(x @ sd["to_out.weight"].T + sd["to_out.bias"])
    return torch.stack(outs)


def random_tokens(
    n_cells: int, n_genes: int, *, num_tokens: int = 7, seed: int = 0, p_zero: float = 0.6
) -> torch.Tensor:
    """Tokens as the official preprocessing yields: bins 0..num_tokens-2 plus a trailing 0."""
    g = torch.Generator().manual_seed(seed)
    bins = torch.randint(1, num_tokens - 1, (n_cells, n_genes), generator=g)
    zero = torch.rand(n_cells, n_genes, generator=g) < p_zero
    bins = bins.masked_fill(zero, 0)
    return torch.cat([bins, torch.zeros(n_cells, 1, dtype=torch.long)], dim=1)
