"""Multi-head self-attention on :func:`torch.nn.functional.scaled_dot_product_attention`."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class MultiheadSelfAttention(nn.Module):
    """Multi-head self-attention with the parameter layout of :class:`torch.nn.MultiheadAttention`.

    The query, key and value projections are packed in one matrix ``in_proj_weight`` of shape
    ``[3 * d_model, d_model]`` (rows ``[W_q; W_k; W_v]``, each split into heads as contiguous
    blocks), followed by ``out_proj``. This is the layout of torch's ``nn.MultiheadAttention``
    and, after renaming ``Wqkv.`` to ``in_proj_``, of flash-attn's ``FlashMHA``, so published
    checkpoints load without reshaping.

    The attention itself runs in :func:`torch.nn.functional.scaled_dot_product_attention`
    (one packed QKV matmul, no loop over heads), which picks a fused kernel on CPU and GPU.

    Parameters
    ----------
    d_model
        Model (embedding) dimension.
    nhead
        Number of attention heads; must divide ``d_model``.
    dropout
        Dropout probability on the attention weights, applied in training mode only.
    bias
        Whether the input and output projections have a bias.

    """

    def __init__(self, d_model: int, nhead: int, dropout: float = 0.0, bias: bool = True):
        super().__init__()
        if d_model % nhead != 0:
            raise ValueError(f"d_model ({d_model}) must be divisible by nhead ({nhead}).")
        self.d_model = d_model
        self.nhead = nhead
        self.head_dim = d_model // nhead
        self.dropout = dropout
        self.in_proj_weight = nn.Parameter(torch.empty(3 * d_model, d_model))
        if bias:
            self.in_proj_bias = nn.Parameter(torch.empty(3 * d_model))
        else:
            self.register_parameter("in_proj_bias", None)
        self.out_proj = nn.Linear(d_model, d_model, bias=bias)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialise like :class:`torch.nn.MultiheadAttention`."""
        nn.init.xavier_uniform_(self.in_proj_weight)
        if self.in_proj_bias is not None:
            nn.init.zeros_(self.in_proj_bias)
        if self.out_proj.bias is not None:
            nn.init.zeros_(self.out_proj.bias)

    def forward(
        self,
        x: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        *,
        n_queries: int | None = None,
    ) -> torch.Tensor:
        """Attend every position to every non-padded position of the same sequence.

        Parameters
        ----------
        x
            Input of shape ``[batch, length, d_model]``.
        key_padding_mask
            Boolean tensor of shape ``[batch, length]``, `True` at padded positions (which are
            not attended to), or `None` for no padding.
        n_queries
            Compute the output only for the first ``n_queries`` positions (keys and values
            still cover the whole sequence); e.g. ``1`` for a ``<cls>`` token at position 0.

        Returns
        -------
        Tensor of shape ``[batch, length, d_model]`` (``[batch, n_queries, d_model]`` with
        ``n_queries``).

        """
        batch, length, _ = x.shape
        d, h, hd = self.d_model, self.nhead, self.head_dim
        w, b = self.in_proj_weight, self.in_proj_bias
        if n_queries is None:
            qkv = F.linear(x, w, b)
            # [B, L, 3, H, Dh] -> [3, B, H, L, Dh]
            q, k, v = qkv.view(batch, length, 3, h, hd).permute(2, 0, 3, 1, 4).unbind(0)
            n_out = length
        else:
            n_out = n_queries
            q = F.linear(x[:, :n_queries], w[:d], None if b is None else b[:d])
            q = q.view(batch, n_queries, h, hd).transpose(1, 2)
            kv = F.linear(x, w[d:], None if b is None else b[d:])
            k, v = kv.view(batch, length, 2, h, hd).permute(2, 0, 3, 1, 4).unbind(0)
        out = self._attend(q, k, v, key_padding_mask)
        return self.out_proj(out.transpose(1, 2).reshape(batch, n_out, d))

    def forward_packed(
        self,
        x: torch.Tensor,
        index: torch.Tensor,
        key_padding_mask: torch.Tensor,
    ) -> torch.Tensor:
        """Self-attention on tokens packed without padding.

        The projections run on the real tokens only; the attention itself runs on the padded
        layout.

        Parameters
        ----------
        x
            Real tokens, shape ``[n_tokens, d_model]``.
        index
            Position of each real token in the flattened ``[batch * length]`` layout.
        key_padding_mask
            Boolean ``[batch, length]``, `True` at padded positions.

        Returns
        -------
        Tensor of shape ``[n_tokens, d_model]``.

        """
        batch, length = key_padding_mask.shape
        d, h, hd = self.d_model, self.nhead, self.head_dim
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        # scatter into the padded layout; padded rows must be finite (zero), not garbage
        full = qkv.new_empty(batch * length, 3 * d).index_copy_(0, index, qkv)
        full.index_fill_(0, key_padding_mask.reshape(-1).nonzero().squeeze(1), 0.0)
        q, k, v = full.view(batch, length, 3, h, hd).permute(2, 0, 3, 1, 4).unbind(0)
        out = self._attend(q, k, v, key_padding_mask)
        out = out.transpose(1, 2).reshape(batch * length, d).index_select(0, index)
        return self.out_proj(out)

    def _attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        key_padding_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        attn_mask = None
        if key_padding_mask is not None:
            if key_padding_mask.dtype != torch.bool:
                raise TypeError(
                    f"key_padding_mask must be a bool tensor (True = padding), got {key_padding_mask.dtype}."
                )
            if key_padding_mask.any():
                # sdpa's bool mask means "may attend"; broadcast over heads and queries.
                attn_mask = ~key_padding_mask[:, None, None, :]
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.dropout if self.training else 0.0
        )
