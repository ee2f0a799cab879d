"""Output heads on transformer token and cell embeddings."""

from __future__ import annotations

import torch
from torch import nn


class ExprDecoder(nn.Module):
    """Per-token value regression head (scGPT's ``ExprDecoder`` without the zero-probability branch).

    ``fc`` is ``Linear(d_in, d_model) → LeakyReLU → Linear(d_model, d_model) → LeakyReLU →
    Linear(d_model, 1)``.

    Parameters
    ----------
    d_model
        Hidden dimension.
    d_in
        Input dimension; defaults to ``d_model``.

    """

    def __init__(self, d_model: int, d_in: int | None = None):
        super().__init__()
        d_in = d_model if d_in is None else d_in
        self.fc = nn.Sequential(
            nn.Linear(d_in, d_model),
            nn.LeakyReLU(),
            nn.Linear(d_model, d_model),
            nn.LeakyReLU(),
            nn.Linear(d_model, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Predict one value per token: ``[batch, length, d_in]`` -> ``[batch, length]``."""
        return self.fc(x).squeeze(-1)


class MVCDecoder(nn.Module):
    """Inner-product decoder from a cell embedding and gene-token embeddings (scGPT's ``MVCDecoder``).

    ``pred[b, i] = W(sigmoid(gene2query(gene_embs[b, i]))) · cell_emb[b]`` — the "inner product"
    style of scGPT's masked value prediction for cell embeddings (MVC / GEPC).

    Parameters
    ----------
    d_model
        Dimension of the gene-token embeddings.
    d_in
        Dimension of the cell embedding; defaults to ``d_model``.

    """

    def __init__(self, d_model: int, d_in: int | None = None):
        super().__init__()
        d_in = d_model if d_in is None else d_in
        self.gene2query = nn.Linear(d_model, d_model)
        self.query_activation = nn.Sigmoid()
        self.W = nn.Linear(d_model, d_in, bias=False)

    def forward(self, cell_emb: torch.Tensor, gene_embs: torch.Tensor) -> torch.Tensor:
        """Predict one value per gene token.

        Parameters
        ----------
        cell_emb
            Cell embeddings of shape ``[batch, d_in]``.
        gene_embs
            Gene-token embeddings of shape ``[batch, length, d_model]``.

        Returns
        -------
        Tensor of shape ``[batch, length]``.

        """
        query = self.query_activation(self.gene2query(gene_embs))
        return torch.matmul(self.W(query), cell_emb.unsqueeze(-1)).squeeze(-1)
