"""Auto-discretisation value embedding of scFoundation (xTrimoGene)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class AutoDiscretizationEmbedding(nn.Module):
    """Embed scalar expression values as soft mixtures of learned bin vectors.

    For each value ``v``::

        h1 = LeakyReLU_0.1(mlp(v))              # Linear(1 -> bin_num)
        a  = softmax(bin_alpha * h1 + mlp2(h1))  # over the bins; mlp2 = Linear(bin_num -> bin_num)
        e  = a @ emb.weight                      # emb = Embedding(bin_num, dim)

    Positions flagged in ``mask`` get the mask vector ``emb_mask.weight[0]`` and those flagged in
    ``padding`` the pad vector ``emb_pad.weight[0]`` instead. The submodule names (``mlp``,
    ``mlp2``, ``emb``, ``emb_mask``, ``emb_pad``) are those of scFoundation's
    ``AutoDiscretizationEmbedding2``, so its ``token_emb.*`` weights load unchanged.

    Unlike the official module, which replaces **by value** (every value equal to the mask id
    102.0 or the pad id 103.0 is swapped for the special vector, so a real value of exactly
    102 or 103 would be too), special positions are given as explicit boolean masks and every
    real value, whatever it is, goes through the bin mixture.

    Parameters
    ----------
    dim
        Embedding dimension.
    bin_num
        Number of bins.
    bin_alpha
        Weight of the first layer's activation in the bin logits.

    """

    def __init__(self, dim: int, bin_num: int = 100, bin_alpha: float = 1.0):
        super().__init__()
        if dim < 1 or bin_num < 1:
            raise ValueError(f"dim and bin_num must be >= 1, got dim={dim}, bin_num={bin_num}.")
        self.dim = int(dim)
        self.bin_num = int(bin_num)
        self.bin_alpha = float(bin_alpha)
        self.mlp = nn.Linear(1, self.bin_num)
        self.mlp2 = nn.Linear(self.bin_num, self.bin_num)
        self.emb = nn.Embedding(self.bin_num, self.dim)
        self.emb_mask = nn.Embedding(1, self.dim)
        self.emb_pad = nn.Embedding(1, self.dim)

    def bin_weights(self, values: torch.Tensor) -> torch.Tensor:
        """Softmax weights over the bins, ``[..., bin_num]``, for values of shape ``[...]``."""
        h = F.leaky_relu(self.mlp(values.unsqueeze(-1).to(self.mlp.weight.dtype)), 0.1)
        return torch.softmax(self.bin_alpha * h + self.mlp2(h), dim=-1)

    def forward(
        self,
        values: torch.Tensor,
        *,
        mask: torch.Tensor | None = None,
        padding: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Embed values.

        Parameters
        ----------
        values
            Float values ``[batch, length]`` (any shape ``[...]`` works).
        mask
            Boolean, same shape as ``values``: positions given the mask embedding.
        padding
            Boolean, same shape as ``values``: positions given the pad embedding (applied after
            ``mask``, so it wins where both are set).

        Returns
        -------
        Tensor ``[..., dim]``.

        """
        x = torch.matmul(self.bin_weights(values), self.emb.weight)
        for flags, table, name in (
            (mask, self.emb_mask, "mask"),
            (padding, self.emb_pad, "padding"),
        ):
            if flags is None:
                continue
            if flags.dtype != torch.bool or flags.shape != values.shape:
                raise ValueError(
                    f"{name} must be a bool tensor of the shape of values {tuple(values.shape)}, "
                    f"got {flags.dtype} {tuple(flags.shape)}."
                )
            x = torch.where(flags.unsqueeze(-1), table.weight[0].to(x.dtype), x)
        return x

    def extra_repr(self) -> str:
        return f"dim={self.dim}, bin_num={self.bin_num}, bin_alpha={self.bin_alpha}"
