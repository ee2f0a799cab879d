"""An independent, deliberately plain re-statement of scFoundation's forward pass for parity tests.

Written from the algorithm in the spec (``MaeAutobin`` of biomap-research/scFoundation, spec
section 2.2-2.4), not from cellformers' modules. It reads a state dict under the **official**
key names (``encoder.transformer_encoder.{i}.*``, no ``model.`` prefix) and runs ONE cell the
way ``get_embedding.py`` does, without padding:

* the value embedding is evaluated per value with hand-written LeakyReLU and softmax, and the
  mask/pad vectors replace values **by value** (``== 102`` and ``== 103``), as the official code;
* the encoder layers are stock ``torch.nn.TransformerEncoderLayer(batch_first=True)`` modules
  loaded from the state dict, followed by a hand-written LayerNorm;
* the Performer decoder is evaluated in its *quadratic* form ``A = q' k'^T``,
  ``out = A v / A 1`` (the same FAVOR+ approximation as the linear-time ``q' (k'^T v)``,
  computed the other way round) with query/key/value biases and the official key stabiliser:
  one maximum over all heads, positions and features of the (single-cell) batch.

:func:`official_state_dict` builds random weights in the official layout, scaled so that
attention, residuals and the kernel's ``eps`` all matter numerically.
"""

from __future__ import annotations

import math

import torch
from torch import nn

EPS_LN = 1e-5
EPS_KERNEL = 1e-4
MASK_VALUE = 102.0
PAD_VALUE = 103.0


def official_state_dict(
    *,
    n_genes: int,
    bin_num: int = 10,
    enc_dim: int = 32,
    enc_depth: int = 2,
    enc_ff: int | None = None,
    dec_dim: int = 24,
    dec_depth: int = 2,
    dec_heads: int = 2,
    dim_head: int = 12,
    nb_features: int = 16,
    ff_mult: int = 4,
    to_final: bool = True,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Random float32 weights under the official ``MaeAutobin`` key names (``model.`` stripped)."""
    g = torch.Generator().manual_seed(seed)
    enc_ff = 4 * enc_dim if enc_ff is None else enc_ff

    def normal(*shape, std=1.0, mean=0.0):
        return torch.randn(*shape, generator=g) * std + mean

    def linear(prefix, n_out, n_in, bias=True):
        sd[prefix + ".weight"] = normal(n_out, n_in, std=1.0 / math.sqrt(n_in))
        if bias:
            sd[prefix + ".bias"] = normal(n_out, std=0.1)

    def norm(prefix, dim):
        sd[prefix + ".weight"] = normal(dim, std=0.1, mean=1.0)
        sd[prefix + ".bias"] = normal(dim, std=0.1)

    sd: dict[str, torch.Tensor] = {}
    sd["token_emb.mlp.weight"] = normal(bin_num, 1, std=0.5)
    sd["token_emb.mlp.bias"] = normal(bin_num, std=0.5)
    linear("token_emb.mlp2", bin_num, bin_num)
    sd["token_emb.emb.weight"] = normal(bin_num, enc_dim)
    sd["token_emb.emb_mask.weight"] = normal(1, enc_dim)
    sd["token_emb.emb_pad.weight"] = normal(1, enc_dim)
    sd["pos_emb.weight"] = normal(n_genes + 3, enc_dim, std=0.5)
    for i in range(enc_depth):
        p = f"encoder.transformer_encoder.{i}."
        linear(p + "self_attn.in_proj", 3 * enc_dim, enc_dim)
        sd[p + "self_attn.in_proj_weight"] = sd.pop(p + "self_attn.in_proj.weight")
        sd[p + "self_attn.in_proj_bias"] = sd.pop(p + "self_attn.in_proj.bias")
        linear(p + "self_attn.out_proj", enc_dim, enc_dim)
        linear(p + "linear1", enc_ff, enc_dim)
        linear(p + "linear2", enc_dim, enc_ff)
        norm(p + "norm1", enc_dim)
        norm(p + "norm2", enc_dim)
    norm("encoder.norm", enc_dim)
    sd["decoder.performer.calls_since_last_redraw"] = torch.tensor(123)
    inner = dec_heads * dim_head
    for j in range(dec_depth):
        p = f"decoder.performer.net.layers.{j}."
        norm(p + "0.norm", dec_dim)
        sd[p + "0.fn.fast_attention.projection_matrix"] = normal(nb_features, dim_head)
        for name in ("to_q", "to_k", "to_v"):
            linear(p + f"0.fn.{name}", inner, dec_dim)
        linear(p + "0.fn.to_out", dec_dim, inner)
        norm(p + "1.norm", dec_dim)
        linear(p + "1.fn.fn.w1", dec_dim * ff_mult, dec_dim)
        linear(p + "1.fn.fn.w2", dec_dim, dec_dim * ff_mult)
    norm("decoder.norm", dec_dim)
    linear("decoder_embed", dec_dim, enc_dim)
    norm("norm", dec_dim)
    if to_final:
        linear("to_final", 1, dec_dim)
    return sd


def _layer_norm(x, w, b):
    mean = x.mean(dim=-1, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + EPS_LN) * w + b


def _gelu(x):
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def token_embedding(sd, values: torch.Tensor) -> torch.Tensor:
    """``AutoDiscretizationEmbedding2`` on 1-D values, with the official by-value replacement."""
    h = values[:, None] * sd["token_emb.mlp.weight"][:, 0] + sd["token_emb.mlp.bias"]
    h = torch.where(h >= 0, h, 0.1 * h)
    logits = h + h @ sd["token_emb.mlp2.weight"].T + sd["token_emb.mlp2.bias"]  # bin_alpha 1
    logits = logits - logits.max(dim=-1, keepdim=True).values
    weights = torch.exp(logits) / torch.exp(logits).sum(dim=-1, keepdim=True)
    out = weights @ sd["token_emb.emb.weight"]
    out[values == MASK_VALUE] = sd["token_emb.emb_mask.weight"][0]
    out[values == PAD_VALUE] = sd["token_emb.emb_pad.weight"][0]
    return out


def reference_encoder(sd, x: torch.Tensor, heads: int) -> torch.Tensor:
    """Official ``pytorchTransformerModule`` on one cell ``[n, dim]`` (no padding)."""
    depth = 1 + max(
        int(k.split(".")[2]) for k in sd if k.startswith("encoder.transformer_encoder.")
    )
    dim = x.shape[-1]
    h = x[None]
    padding = torch.zeros(1, x.shape[0], dtype=torch.bool)
    for i in range(depth):
        p = f"encoder.transformer_encoder.{i}."
        d_ff = sd[p + "linear1.weight"].shape[0]
        layer = nn.TransformerEncoderLayer(
            d_model=dim,
            nhead=heads,
            dim_feedforward=d_ff,
            dropout=0.1,
            activation="relu",
            batch_first=True,
            norm_first=False,
        )
        layer.load_state_dict({k[len(p) :]: v for k, v in sd.items() if k.startswith(p)})
        layer.eval()
        with torch.no_grad():
            h = layer(h, src_key_padding_mask=padding)
    return _layer_norm(h[0], sd["encoder.norm.weight"], sd["encoder.norm.bias"])


def reference_encode(sd, full_values: torch.Tensor, heads: int) -> torch.Tensor:
    """Encoder states of one cell from its full ``[n_genes + 2]`` value vector (genes, T, S).

    Like ``get_embedding.py``'s cell path: the tokens are the positive values in position order
    (T and S included), embedded with ``token_emb`` plus ``pos_emb`` of their positions.
    """
    ids = torch.nonzero(full_values > 0).flatten()
    x = token_embedding(sd, full_values[ids]) + sd["pos_emb.weight"][ids]
    return reference_encoder(sd, x, heads)


def reference_cell_embedding(
    sd, full_values: torch.Tensor, heads: int, pool_type: str = "all"
) -> torch.Tensor:
    """``get_embedding.py --output_type cell`` for one cell: pool ``all`` or ``max``."""
    emb = reference_encode(sd, full_values, heads)
    if pool_type == "max":
        return emb.max(dim=0).values
    return torch.cat([emb[-1], emb[-2], emb[:-2].max(dim=0).values, emb[:-2].mean(dim=0)])


def reference_attention(x, sd, prefix, heads, dim_head):
    """Official FAVOR+ self-attention (with q/k/v biases) of one layer on one cell ``[n, dim]``."""
    P = sd[prefix + "fast_attention.projection_matrix"]
    m = P.shape[0]
    c = dim_head**-0.25
    ratio = m**-0.5
    q = x @ sd[prefix + "to_q.weight"].T + sd[prefix + "to_q.bias"]
    k = x @ sd[prefix + "to_k.weight"].T + sd[prefix + "to_k.bias"]
    v = x @ sd[prefix + "to_v.weight"].T + sd[prefix + "to_v.bias"]
    parts = []
    for h in range(heads):
        cols = slice(h * dim_head, (h + 1) * dim_head)
        parts.append((q[:, cols], k[:, cols], v[:, cols]))
    dks = [(c * kh) @ P.T for _, kh, _ in parts]
    key_max = max(float(dk.max()) for dk in dks)  # torch.max(data_dash): the whole tensor
    outs = []
    for (qh, kh, vh), dk in zip(parts, dks, strict=True):
        dq = (c * qh) @ P.T
        q_diag = (qh**2).sum(dim=-1, keepdim=True) / 2.0 * c**2
        k_diag = (kh**2).sum(dim=-1, keepdim=True) / 2.0 * c**2
        qf = ratio * (torch.exp(dq - q_diag - dq.max(dim=-1, keepdim=True).values) + EPS_KERNEL)
        kf = ratio * (torch.exp(dk - k_diag - key_max) + EPS_KERNEL)
        A = qf @ kf.T
        outs.append((A @ vh) / A.sum(dim=-1, keepdim=True))
    out = torch.cat(outs, dim=-1)
    return out @ sd[prefix + "to_out.weight"].T + sd[prefix + "to_out.bias"]


def reference_decoder(sd, x: torch.Tensor, heads: int, dim_head: int) -> torch.Tensor:
    """Official ``PerformerModule`` (pre-norm layers, then ``decoder.norm``) on one cell."""
    prefix = "decoder.performer.net.layers."
    depth = 1 + max(int(k[len(prefix) :].split(".")[0]) for k in sd if k.startswith(prefix))
    for i in range(depth):
        p = f"{prefix}{i}."
        h = _layer_norm(x, sd[p + "0.norm.weight"], sd[p + "0.norm.bias"])
        x = x + reference_attention(h, sd, p + "0.fn.", heads, dim_head)
        h = _layer_norm(x, sd[p + "1.norm.weight"], sd[p + "1.norm.bias"])
        h = _gelu(h @ sd[p + "1.fn.fn.w1.weight"].T + sd[p + "1.fn.fn.w1.bias"])
        x = x + h @ sd[p + "1.fn.fn.w2.weight"].T + sd[p + "1.fn.fn.w2.bias"]
    return _layer_norm(x, sd["decoder.norm.weight"], sd["decoder.norm.bias"])


def reference_full_forward(
    sd,
    full_values: torch.Tensor,
    *,
    enc_heads: int,
    dec_heads: int,
    dim_head: int,
    to_final: bool = True,
    masked: torch.Tensor | None = None,
) -> torch.Tensor:
    """``MaeAutobin.forward`` for one cell (``getEncoerDecoderData`` with batch 1).

    ``full_values``: ``[n_genes + 2]`` (genes, T, S). With ``masked`` (bool ``[n_genes + 2]``)
    the decoder input holds the mask id 102 there and the encoder sees only the positive
    values outside it, as in masked pretraining. Returns ``[n_genes + 2]`` predicted values
    (``to_final``) or ``[n_genes + 2, dec_dim]`` decoder states.
    """
    decoder_data = full_values.clone()
    labels = full_values > 0
    if masked is not None:
        decoder_data[masked] = MASK_VALUE
        labels &= ~masked
    ids = torch.nonzero(labels).flatten()
    x = token_embedding(sd, full_values[ids]) + sd["pos_emb.weight"][ids]
    enc = reference_encoder(sd, x, enc_heads)
    dec = token_embedding(sd, decoder_data)
    dec[ids] = enc
    dec = dec + sd["pos_emb.weight"][: full_values.shape[0]]
    dec = dec @ sd["decoder_embed.weight"].T + sd["decoder_embed.bias"]
    y = reference_decoder(sd, dec, dec_heads, dim_head)
    y = _layer_norm(y, sd["norm.weight"], sd["norm.bias"])
    if not to_final:
        return y
    return (y @ sd["to_final.weight"].T + sd["to_final.bias"])[:, 0]


def random_full_values(n_cells: int, n_genes: int, *, seed: int = 0):
    """Full value vectors ``[n_cells, n_genes + 2]`` as ``get_embedding.py`` builds them.

    Raw counts are normalised to ``log1p(x / total * 1e4)``; T = 4 (``t4``), S = log10(total).
    Cell sizes vary, so a padded batch has real padding.
    """
    g = torch.Generator().manual_seed(seed)
    counts = torch.poisson(torch.rand(n_cells, n_genes, generator=g) * 6.0, generator=g)
    keep = torch.rand(n_cells, n_genes, generator=g) >= torch.linspace(0.5, 0.95, n_cells)[:, None]
    counts = counts * keep
    counts[:, 0] += 1  # every cell expresses at least one gene
    total = counts.sum(dim=1, keepdim=True)
    genes = torch.log1p(counts / total * 1e4)
    t = torch.full((n_cells, 1), 4.0)
    s = torch.log10(total)
    return torch.cat([genes, t, s], dim=1)


def official_config(
    *,
    n_genes: int,
    bin_num: int = 10,
    enc_dim: int = 32,
    enc_depth: int = 2,
    enc_heads: int = 4,
    dec_dim: int = 24,
    dec_depth: int = 2,
    dec_heads: int = 2,
    dim_head: int = 12,
) -> dict:
    """A nested config as stored in ``models.ckpt`` (keys of the published flattened config)."""
    seq_len = n_genes + 2
    return {
        "model": "mae_autobin",
        "model_config": {
            "mae_autobin": {
                "n_class": 104,
                "pad_token_id": 103,
                "mask_token_id": 102,
                "bin_num": bin_num,
                "bin_alpha": 1.0,
                "mask_gene_name": False,
                "encoder": {
                    "hidden_dim": enc_dim,
                    "depth": enc_depth,
                    "heads": enc_heads,
                    "dim_head": 64,
                    "seq_len": seq_len,
                    "module_type": "transformer",
                    "norm_first": False,
                },
                "decoder": {
                    "hidden_dim": dec_dim,
                    "depth": dec_depth,
                    "heads": dec_heads,
                    "dim_head": dim_head,
                    "seq_len": seq_len,
                    "module_type": "performer",
                    "norm_first": False,
                },
                "decoder_add_zero": True,
                "num_tokens": 13,
            }
        },
        "dataset_config": {
            "rnaseq": {
                "seq_len": seq_len,
                "gene_num": seq_len,
                "rawcount": True,
                "bin_type": "auto_bin",
                "value_mask_prob": 0.3,
                "zero_mask_prob": 0.03,
                "replace_prob": 0.8,
                "random_token_prob": 0.1,
                "mask_prob": 0.3,
                "mask_ignore_token_ids": [0],
                "mae_encoder_max_seq_len": 15000,
            }
        },
    }


def save_models_ckpt(path, state_dicts: dict, config: dict):
    """Write ``{version: {"config", "state_dict"}}`` with the ``model.`` key prefix, as models.ckpt."""
    from collections import OrderedDict

    torch.save(
        {
            version: {
                "config": config,
                "state_dict": OrderedDict(("model." + k, v) for k, v in sd.items()),
            }
            for version, sd in state_dicts.items()
        },
        path,
    )
    return path
