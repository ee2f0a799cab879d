"""Transformer encoder layers with the submodule names of :mod:`torch.nn`."""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ._attention import MultiheadSelfAttention

_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu,
    "gelu": F.gelu,
}


class TransformerEncoderLayer(nn.Module):
    """One transformer encoder block, key-compatible with :class:`torch.nn.TransformerEncoderLayer`.

    Submodules are named ``self_attn``, ``linear1``, ``linear2``, ``norm1`` and ``norm2`` as in
    torch, so state dicts of ``nn.TransformerEncoderLayer(batch_first=True)`` load unchanged.
    Inputs are batch-first.

    Parameters
    ----------
    d_model
        Model (embedding) dimension.
    nhead
        Number of attention heads.
    d_hid
        Hidden dimension of the feed-forward block.
    dropout
        Dropout probability (attention weights, residual branches and feed-forward hidden layer).
    activation
        Feed-forward activation, ``"relu"`` or ``"gelu"`` (exact, erf-based).
    norm_first
        Pre-norm (`True`) or post-norm (`False`, torch's default and scGPT's choice).
    layer_norm_eps
        Epsilon of both layer norms.
    attention_dropout
        Dropout probability on the attention weights; defaults to ``dropout``. BERT has its
        own ``attention_probs_dropout_prob``.
    activation_dropout
        Dropout probability on the feed-forward hidden layer (after the activation); defaults
        to ``dropout`` as in torch. BERT has none there (``0.0``).

    """

    def __init__(
        self,
        d_model: int,
        nhead: int,
        d_hid: int,
        dropout: float = 0.1,
        activation: str = "relu",
        norm_first: bool = False,
        layer_norm_eps: float = 1e-5,
        attention_dropout: float | None = None,
        activation_dropout: float | None = None,
    ):
        super().__init__()
        if activation not in _ACTIVATIONS:
            raise ValueError(
                f"activation must be one of {sorted(_ACTIVATIONS)}, got {activation!r}."
            )
        attention_dropout = dropout if attention_dropout is None else attention_dropout
        activation_dropout = dropout if activation_dropout is None else activation_dropout
        self.self_attn = MultiheadSelfAttention(d_model, nhead, dropout=attention_dropout)
        self.linear1 = nn.Linear(d_model, d_hid)
        self.dropout = nn.Dropout(activation_dropout)
        self.linear2 = nn.Linear(d_hid, d_model)
        self.norm_first = norm_first
        self.norm1 = nn.LayerNorm(d_model, eps=layer_norm_eps)
        self.norm2 = nn.LayerNorm(d_model, eps=layer_norm_eps)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.activation_name = activation
        self.activation = _ACTIVATIONS[activation]

    def _ff_block(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout2(self.linear2(self.dropout(self.activation(self.linear1(x)))))

    def _block(
        self,
        x: torch.Tensor,
        residual: torch.Tensor,
        attend: Callable[[torch.Tensor], torch.Tensor],
    ) -> torch.Tensor:
        if self.norm_first:
            x = residual + self.dropout1(attend(self.norm1(x)))
            return x + self._ff_block(self.norm2(x))
        x = self.norm1(residual + self.dropout1(attend(x)))
        return self.norm2(x + self._ff_block(x))

    def forward(
        self,
        x: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        *,
        n_queries: int | None = None,
    ) -> torch.Tensor:
        """Apply the block.

        Parameters
        ----------
        x
            Input of shape ``[batch, length, d_model]``.
        key_padding_mask
            Boolean ``[batch, length]``, `True` at padded positions, or `None`.
        n_queries
            Compute the output only for the first ``n_queries`` positions (all positions are
            still attended to).

        Returns
        -------
        Tensor of shape ``[batch, length, d_model]`` (``[batch, n_queries, d_model]`` with
        ``n_queries``).

        """
        residual = x if n_queries is None else x[:, :n_queries]
        return self._block(
            x,
            residual,
            lambda h: self.self_attn(h, key_padding_mask=key_padding_mask, n_queries=n_queries),
        )

    def forward_packed(
        self, x: torch.Tensor, index: torch.Tensor, key_padding_mask: torch.Tensor
    ) -> torch.Tensor:
        """Apply the block to real tokens packed without padding.

        All per-token operations (projections, feed-forward, norms) run on the real tokens
        only, which saves the work on padding; the results for real tokens equal
        :meth:`forward`'s.

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
        return self._block(
            x, x, lambda h: self.self_attn.forward_packed(h, index, key_padding_mask)
        )


class TransformerEncoder(nn.Module):
    """A stack of encoder layers held in ``.layers``, like :class:`torch.nn.TransformerEncoder`.

    Parameters
    ----------
    layer
        Either a layer instance, which is deep-copied ``num_layers`` times (so all layers start
        with the same weights, as in torch), or a zero-argument callable returning a fresh layer
        (independent initialisation per layer).
    num_layers
        Number of layers.
    norm
        Optional final normalisation module.

    """

    def __init__(
        self,
        layer: nn.Module | Callable[[], nn.Module],
        num_layers: int,
        norm: nn.Module | None = None,
    ):
        super().__init__()
        if isinstance(layer, nn.Module):
            layers = [copy.deepcopy(layer) for _ in range(num_layers)]
        elif callable(layer):
            layers = [layer() for _ in range(num_layers)]
        else:
            raise TypeError(f"layer must be an nn.Module or a callable, got {type(layer)!r}.")
        self.layers = nn.ModuleList(layers)
        self.num_layers = num_layers
        self.norm = norm

    def forward(
        self,
        x: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        *,
        n_queries: int | None = None,
        n_layers: int | None = None,
    ) -> torch.Tensor:
        """Apply the layers in order.

        With padding, per-token work runs on the real tokens only and padded positions of the
        output are zero (as in torch's fast path and flash attention); real positions are
        unaffected by padding.

        Parameters
        ----------
        x
            Input of shape ``[batch, length, d_model]``.
        key_padding_mask
            Boolean ``[batch, length]``, `True` at padded positions, or `None`.
        n_queries
            Return only the first ``n_queries`` positions; the last layer run then computes
            only those (e.g. ``1`` for the ``<cls>`` embedding).
        n_layers
            Run only the first ``n_layers`` layers (``0`` returns ``x`` unchanged); `None` runs
            all. The final ``norm`` belongs to the end of the stack and is applied only when
            all layers run.

        Returns
        -------
        Tensor of shape ``[batch, length, d_model]`` (``[batch, n_queries, d_model]`` with
        ``n_queries``).

        """
        if n_layers is None:
            n_layers = len(self.layers)
        elif not 0 <= n_layers <= len(self.layers):
            raise ValueError(
                f"n_layers must be in [0, {len(self.layers)}] (the number of layers), got {n_layers}."
            )
        if key_padding_mask is not None:
            if key_padding_mask.dtype != torch.bool:
                raise TypeError(
                    f"key_padding_mask must be a bool tensor (True = padding), got {key_padding_mask.dtype}."
                )
            if not key_padding_mask.any():
                key_padding_mask = None
        layers = list(self.layers)[:n_layers]
        last = layers.pop() if n_queries is not None and layers else None
        packable = key_padding_mask is not None and all(
            isinstance(layer, TransformerEncoderLayer) for layer in layers
        )
        if packable and layers:
            batch, length, d = x.shape
            index = (~key_padding_mask).reshape(-1).nonzero().squeeze(1)
            h = x.reshape(batch * length, d).index_select(0, index)
            for layer in layers:
                h = layer.forward_packed(h, index, key_padding_mask)
            x = h.new_zeros(batch * length, d).index_copy(0, index, h).view(batch, length, d)
        else:
            for layer in layers:
                x = layer(x, key_padding_mask=key_padding_mask)
        if last is not None:
            x = last(x, key_padding_mask=key_padding_mask, n_queries=n_queries)
        elif n_queries is not None:
            x = x[:, :n_queries]
        if self.norm is not None and n_layers == len(self.layers):
            x = self.norm(x)
        return x
