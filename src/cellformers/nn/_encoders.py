"""Token and value encoders."""

from __future__ import annotations

import torch
from torch import nn


class GeneEncoder(nn.Module):
    """Gene-token embedding followed by a layer norm (scGPT's ``GeneEncoder``).

    Parameters
    ----------
    n_tokens
        Vocabulary size.
    d_model
        Embedding dimension.
    padding_idx
        Token id of ``<pad>``; its embedding row gets no gradient.
    layer_norm_eps
        Epsilon of the layer norm.

    """

    def __init__(
        self,
        n_tokens: int,
        d_model: int,
        padding_idx: int | None = None,
        layer_norm_eps: float = 1e-5,
    ):
        super().__init__()
        self.embedding = nn.Embedding(n_tokens, d_model, padding_idx=padding_idx)
        self.enc_norm = nn.LayerNorm(d_model, eps=layer_norm_eps)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Embed ``tokens`` of shape ``[batch, length]`` into ``[batch, length, d_model]``."""
        return self.enc_norm(self.embedding(tokens))


class ContinuousValueEncoder(nn.Module):
    """Project a scalar value per token to ``d_model`` with a small MLP (scGPT's ``ContinuousValueEncoder``).

    ``Dropout(LayerNorm(Linear2(ReLU(Linear1(min(x, max_value))))))``. Negative sentinel values
    (padding, masking) go through the MLP unchanged; only an upper clamp is applied.

    Parameters
    ----------
    d_model
        Output dimension.
    dropout
        Dropout probability on the output.
    max_value
        Values are clamped to at most this.
    layer_norm_eps
        Epsilon of the layer norm.

    """

    def __init__(
        self,
        d_model: int,
        dropout: float = 0.1,
        max_value: float = 512,
        layer_norm_eps: float = 1e-5,
    ):
        super().__init__()
        self.dropout = nn.Dropout(p=dropout)
        self.linear1 = nn.Linear(1, d_model)
        self.activation = nn.ReLU()
        self.linear2 = nn.Linear(d_model, d_model)
        self.norm = nn.LayerNorm(d_model, eps=layer_norm_eps)
        self.max_value = max_value

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        """Encode ``values`` of shape ``[batch, length]`` into ``[batch, length, d_model]``."""
        x = torch.clamp(values.unsqueeze(-1), max=self.max_value)
        x = self.linear2(self.activation(self.linear1(x)))
        return self.dropout(self.norm(x))
