"""Output heads on transformer token and cell embeddings."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._transformer import _ACTIVATIONS


class ExprDecoder(nn.Module):
    """Per-token value regression head (scGPT's ``ExprDecoder``).

    ``fc`` is ``Linear(d_in, d_model) → LeakyReLU → Linear(d_model, d_model) → LeakyReLU →
    Linear(d_model, 1)``. With ``explicit_zero_prob`` an MLP of the same shape, ``zero_logit``,
    gives the probability that each value is non-zero (:meth:`zero_probs`; scGPT calls it
    ``zero_probs``).

    Parameters
    ----------
    d_model
        Hidden dimension.
    d_in
        Input dimension; defaults to ``d_model`` (scGPT uses ``2 * d_model`` when the token
        states are concatenated with a batch embedding).
    explicit_zero_prob
        Build the ``zero_logit`` branch.

    """

    def __init__(self, d_model: int, d_in: int | None = None, *, explicit_zero_prob: bool = False):
        super().__init__()
        d_in = d_model if d_in is None else d_in
        self.fc = self._mlp(d_in, d_model)
        self.explicit_zero_prob = explicit_zero_prob
        if explicit_zero_prob:
            self.zero_logit = self._mlp(d_in, d_model)

    @staticmethod
    def _mlp(d_in: int, d_model: int) -> nn.Sequential:
        return nn.Sequential(
            nn.Linear(d_in, d_model),
            nn.LeakyReLU(),
            nn.Linear(d_model, d_model),
            nn.LeakyReLU(),
            nn.Linear(d_model, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Predict one value per token: ``[batch, length, d_in]`` -> ``[batch, length]``."""
        return self.fc(x).squeeze(-1)

    def zero_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[batch, length]`` of each value being non-zero (``explicit_zero_prob``)."""
        if not self.explicit_zero_prob:
            raise RuntimeError("This decoder was built without explicit_zero_prob.")
        return self.zero_logit(x).squeeze(-1)

    def zero_probs(self, x: torch.Tensor) -> torch.Tensor:
        """Probabilities ``[batch, length]`` of each value being non-zero (sigmoid of the logits)."""
        return torch.sigmoid(self.zero_logits(x))


class MVCDecoder(nn.Module):
    """Inner-product decoder from a cell embedding and gene-token embeddings (scGPT's ``MVCDecoder``).

    ``pred[b, i] = W(sigmoid(gene2query(gene_embs[b, i]))) · cell_emb[b]`` — the "inner product"
    style of scGPT's masked value prediction for cell embeddings (MVC / GEPC). With
    ``explicit_zero_prob``, ``W_zero_logit`` (with bias) gives the logits of each value being
    non-zero in the same way (:meth:`zero_probs`).

    Parameters
    ----------
    d_model
        Dimension of the gene-token embeddings.
    d_in
        Dimension of the cell embedding; defaults to ``d_model`` (scGPT uses ``2 * d_model``
        when the cell embedding is concatenated with a batch embedding).
    explicit_zero_prob
        Build ``W_zero_logit``.

    """

    def __init__(self, d_model: int, d_in: int | None = None, *, explicit_zero_prob: bool = False):
        super().__init__()
        d_in = d_model if d_in is None else d_in
        self.gene2query = nn.Linear(d_model, d_model)
        self.query_activation = nn.Sigmoid()
        self.W = nn.Linear(d_model, d_in, bias=False)
        self.explicit_zero_prob = explicit_zero_prob
        if explicit_zero_prob:
            self.W_zero_logit = nn.Linear(d_model, d_in)

    def _query(self, gene_embs: torch.Tensor) -> torch.Tensor:
        return self.query_activation(self.gene2query(gene_embs))

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
        return torch.matmul(self.W(self._query(gene_embs)), cell_emb.unsqueeze(-1)).squeeze(-1)

    def zero_logits(self, cell_emb: torch.Tensor, gene_embs: torch.Tensor) -> torch.Tensor:
        """Logits ``[batch, length]`` of each value being non-zero (``explicit_zero_prob``)."""
        if not self.explicit_zero_prob:
            raise RuntimeError("This decoder was built without explicit_zero_prob.")
        query = self._query(gene_embs)
        return torch.matmul(self.W_zero_logit(query), cell_emb.unsqueeze(-1)).squeeze(-1)

    def zero_probs(self, cell_emb: torch.Tensor, gene_embs: torch.Tensor) -> torch.Tensor:
        """Probabilities ``[batch, length]`` of each value being non-zero."""
        return torch.sigmoid(self.zero_logits(cell_emb, gene_embs))


class MaskedLMHead(nn.Module):
    """Token prediction head with an output matrix tied to the input embeddings (BERT's MLM head).

    ``logits = LayerNorm(act(dense(x))) @ Wᵀ + bias``, where ``W`` is the word-embedding matrix
    ``[vocab, d_model]`` passed to :meth:`forward`. The head owns ``dense``, ``norm`` and
    ``bias`` only, so the tie cannot be broken by loading, moving or casting the module.

    Parameters
    ----------
    d_model
        Hidden dimension.
    vocab_size
        Number of output tokens.
    activation
        ``"relu"`` or ``"gelu"`` (exact, erf-based).
    layer_norm_eps
        Epsilon of the layer norm.

    """

    def __init__(
        self, d_model: int, vocab_size: int, activation: str = "gelu", layer_norm_eps: float = 1e-12
    ):
        super().__init__()
        if activation not in _ACTIVATIONS:
            raise ValueError(
                f"activation must be one of {sorted(_ACTIVATIONS)}, got {activation!r}."
            )
        self.dense = nn.Linear(d_model, d_model)
        self.activation_name = activation
        self.activation = _ACTIVATIONS[activation]
        self.norm = nn.LayerNorm(d_model, eps=layer_norm_eps)
        self.bias = nn.Parameter(torch.zeros(vocab_size))

    def forward(self, x: torch.Tensor, embedding_weight: torch.Tensor) -> torch.Tensor:
        """Token logits.

        Parameters
        ----------
        x
            Token states ``[..., d_model]``.
        embedding_weight
            The tied output matrix ``[vocab_size, d_model]`` (the word embeddings).

        Returns
        -------
        Tensor of shape ``[..., vocab_size]``.

        """
        h = self.norm(self.activation(self.dense(x)))
        return F.linear(h, embedding_weight, self.bias)


class ClsDecoder(nn.Module):
    """Cell classification head on the cell embedding (scGPT's ``ClsDecoder``).

    ``_decoder`` holds ``nlayers - 1`` blocks of ``Linear(d_model, d_model) → ReLU →
    LayerNorm(d_model)`` (keys ``_decoder.{0,2,3,5}.*`` for ``nlayers=3``), then ``out_layer``
    is ``Linear(d_model, n_cls)``.

    Parameters
    ----------
    d_model
        Embedding dimension.
    n_cls
        Number of classes.
    nlayers
        Number of linear layers, the output layer included.

    """

    def __init__(self, d_model: int, n_cls: int, nlayers: int = 3):
        super().__init__()
        if nlayers < 1 or n_cls < 1:
            raise ValueError(f"nlayers and n_cls must be >= 1, got {nlayers} and {n_cls}.")
        blocks: list[nn.Module] = []
        for _ in range(nlayers - 1):
            blocks += [nn.Linear(d_model, d_model), nn.ReLU(), nn.LayerNorm(d_model)]
        self._decoder = nn.ModuleList(blocks)
        self.out_layer = nn.Linear(d_model, n_cls)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits ``[batch, n_cls]`` of cell embeddings ``[batch, d_model]``."""
        for layer in self._decoder:
            x = layer(x)
        return self.out_layer(x)
