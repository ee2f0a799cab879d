"""Batch-effect parts: batch-label embedding, domain-specific batch norm, adversarial discriminator.

The state-dict layouts are those of scGPT's integration model (``batch_encoder.*``,
``dsbn.bns.{k}.*``, ``grad_reverse_discriminator.*``); the gradient reversal and the
discriminator work on any model's cell embedding.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn


class _GradReverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, lambd: float) -> torch.Tensor:
        ctx.lambd = lambd
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        return grad_output.neg() * ctx.lambd, None


def grad_reverse(x: torch.Tensor, lambd: float = 1.0) -> torch.Tensor:
    """Identity in the forward pass; multiplies the gradient by ``-lambd`` in the backward pass.

    Parameters
    ----------
    x
        Any tensor.
    lambd
        Scale of the reversed gradient.

    Returns
    -------
    ``x`` (a view), whose gradient is reversed.

    """
    return _GradReverse.apply(x, float(lambd))


class GradientReversal(nn.Module):
    """Module form of :func:`grad_reverse` (Ganin & Lempitsky 2015).

    Parameters
    ----------
    lambd
        Scale of the reversed gradient.

    """

    def __init__(self, lambd: float = 1.0):
        super().__init__()
        self.lambd = float(lambd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return ``x``; its gradient is multiplied by ``-lambd``."""
        return grad_reverse(x, self.lambd)

    def extra_repr(self) -> str:
        return f"lambd={self.lambd}"


class BatchLabelEncoder(nn.Module):
    """Batch-label embedding followed by a layer norm (scGPT's ``BatchLabelEncoder``).

    Keys ``embedding.weight`` ``[n_batch, d_model]`` and ``enc_norm.weight/bias``.

    Parameters
    ----------
    n_batch
        Number of batch labels.
    d_model
        Embedding dimension.

    """

    def __init__(self, n_batch: int, d_model: int):
        super().__init__()
        if n_batch < 1:
            raise ValueError(f"n_batch must be >= 1, got {n_batch}.")
        self.embedding = nn.Embedding(n_batch, d_model)
        self.enc_norm = nn.LayerNorm(d_model)

    def forward(self, batch_labels: torch.Tensor) -> torch.Tensor:
        """Embed integer labels ``[batch]`` into ``[batch, d_model]``."""
        return self.enc_norm(self.embedding(batch_labels.long()))


class DomainSpecificBatchNorm1d(nn.Module):
    """Batch norm with separate statistics per domain (batch label), applied per cell.

    Holds one :class:`torch.nn.BatchNorm1d` per domain in ``bns`` (keys
    ``bns.{k}.running_mean/running_var/num_batches_tracked`` and, with ``affine``,
    ``bns.{k}.weight/bias``), as scGPT's ``DomainSpecificBatchNorm1d``. Input is a token tensor
    ``[batch, length, num_features]`` and one domain per cell.

    Each cell is normalised with the statistics of its own domain. scGPT instead normalises a
    whole minibatch with the domain of its first cell (its integration recipe draws each
    minibatch from one batch label); with running statistics (evaluation) both agree whenever a
    minibatch holds one domain, and the result here never depends on the other cells. In
    training, the statistics of each domain are computed over the non-padding tokens of that
    domain's cells in the minibatch (scGPT's batch norm also counts padding positions), and each
    domain's running statistics are updated as :class:`torch.nn.BatchNorm1d` updates them
    (unbiased variance, ``momentum``). Domains marked with :meth:`freeze_domains` always use,
    and never update, their running statistics.

    Parameters
    ----------
    num_features
        Feature dimension.
    num_domains
        Number of domains.
    eps
        Added to the variance (scGPT: 6.1e-5).
    momentum
        Running-statistics momentum.
    affine
        Learn a per-domain scale and shift (scGPT's integration model has none).

    """

    def __init__(
        self,
        num_features: int,
        num_domains: int,
        *,
        eps: float = 6.1e-5,
        momentum: float = 0.1,
        affine: bool = False,
    ):
        super().__init__()
        if num_domains < 1:
            raise ValueError(f"num_domains must be >= 1, got {num_domains}.")
        self.num_features = num_features
        self.num_domains = num_domains
        self.eps = float(eps)
        self.momentum = float(momentum)
        self.affine = affine
        self.bns = nn.ModuleList(
            [
                nn.BatchNorm1d(num_features, eps=eps, momentum=momentum, affine=affine)
                for _ in range(num_domains)
            ]
        )
        self.register_buffer("frozen", torch.zeros(num_domains, dtype=torch.bool), persistent=False)

    def freeze_domains(self, domains: Iterable[int]) -> None:
        """Keep the running statistics of ``domains`` fixed and use them also in training."""
        for k in domains:
            if not 0 <= int(k) < self.num_domains:
                raise ValueError(f"Domain {k} out of range [0, {self.num_domains}).")
            self.frozen[int(k)] = True

    def _stack(self, name: str) -> torch.Tensor:
        return torch.stack([getattr(bn, name) for bn in self.bns])

    def forward(
        self,
        x: torch.Tensor,
        domains: torch.Tensor,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Normalise each cell's tokens with its domain's statistics.

        Parameters
        ----------
        x
            Tokens ``[batch, length, num_features]``.
        domains
            Domain of each cell, integers ``[batch]`` in ``[0, num_domains)``.
        mask
            Boolean ``[batch, length]``, `True` at tokens that count for the training
            statistics (non-padding); all tokens by default.

        Returns
        -------
        Tensor of the shape of ``x``.

        """
        if x.dim() != 3 or x.shape[-1] != self.num_features:
            raise ValueError(
                f"Expected input [batch, length, {self.num_features}], got {tuple(x.shape)}."
            )
        domains = domains.reshape(-1).long()
        if domains.shape[0] != x.shape[0]:
            raise ValueError(
                f"Got {domains.shape[0]} domain labels for a batch of {x.shape[0]} cells."
            )
        if domains.numel() and (domains.min() < 0 or domains.max() >= self.num_domains):
            raise ValueError(
                f"Domain labels must be in [0, {self.num_domains}); got values in "
                f"[{int(domains.min())}, {int(domains.max())}]."
            )
        mean = self._stack("running_mean")[domains].to(x.dtype)  # [B, d]
        var = self._stack("running_var")[domains].to(x.dtype)
        if self.training:
            mean, var = self._batch_statistics(x, domains, mask, mean, var)
        out = (x - mean.unsqueeze(1)) * torch.rsqrt(var.unsqueeze(1) + self.eps)
        if self.affine:
            weight = self._stack("weight")[domains].unsqueeze(1)
            bias = self._stack("bias")[domains].unsqueeze(1)
            out = out * weight + bias
        return out

    def _batch_statistics(
        self,
        x: torch.Tensor,
        domains: torch.Tensor,
        mask: torch.Tensor | None,
        running_mean: torch.Tensor,
        running_var: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-cell mean/variance of the cell's domain in this minibatch (frozen: running)."""
        valid = torch.ones(x.shape[:2], dtype=x.dtype, device=x.device)
        if mask is not None:
            valid = mask.to(x.dtype)
        onehot = F.one_hot(domains, self.num_domains).to(x.dtype)  # [B, K]
        counts = onehot.T @ valid.sum(1)  # tokens per domain [K]
        sums = onehot.T @ (x * valid.unsqueeze(-1)).sum(1)  # [K, d]
        dom_mean = sums / counts.clamp_min(1.0).unsqueeze(-1)
        centred = (x - dom_mean[domains].unsqueeze(1)) * valid.unsqueeze(-1)
        dom_var = (onehot.T @ centred.pow(2).sum(1)) / counts.clamp_min(1.0).unsqueeze(-1)
        use_batch = (counts > 0) & ~self.frozen
        with torch.no_grad():
            for k in torch.nonzero(use_batch).flatten().tolist():
                bn = self.bns[k]
                n = counts[k]
                unbiased = dom_var[k] * n / (n - 1).clamp_min(1.0)
                bn.running_mean.mul_(1 - self.momentum).add_(self.momentum * dom_mean[k].detach())
                bn.running_var.mul_(1 - self.momentum).add_(self.momentum * unbiased.detach())
                bn.num_batches_tracked.add_(1)
        per_cell = use_batch[domains].unsqueeze(-1)
        mean = torch.where(per_cell, dom_mean[domains], running_mean)
        var = torch.where(per_cell, dom_var[domains], running_var)
        return mean, var

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, num_domains={self.num_domains}, eps={self.eps}, "
            f"momentum={self.momentum}, affine={self.affine}"
        )


class AdversarialDiscriminator(nn.Module):
    """Batch classifier on cell embeddings behind a gradient reversal (scGPT's DAB head).

    ``_decoder`` holds ``nlayers - 1`` blocks of ``Linear(d_model, d_model) → activation →
    LayerNorm(d_model)`` (keys ``_decoder.{0,2,3,5}.*`` for ``nlayers=3``), then ``out_layer``
    is ``Linear(d_model, n_cls)``. With ``reverse_grad`` the input passes through
    :func:`grad_reverse`, so minimising the classifier's cross-entropy trains the classifier
    while pushing the encoder that produced the embedding to remove batch information.

    Parameters
    ----------
    d_model
        Dimension of the cell embedding.
    n_cls
        Number of batch labels.
    nlayers
        Linear layers, the output layer included.
    activation
        Activation module class (scGPT: :class:`torch.nn.LeakyReLU`).
    reverse_grad
        Reverse the gradient flowing into the embedding.
    lambd
        Scale of the reversed gradient.

    """

    def __init__(
        self,
        d_model: int,
        n_cls: int,
        *,
        nlayers: int = 3,
        activation: Callable[[], nn.Module] = nn.LeakyReLU,
        reverse_grad: bool = True,
        lambd: float = 1.0,
    ):
        super().__init__()
        if nlayers < 1 or n_cls < 1:
            raise ValueError(f"nlayers and n_cls must be >= 1, got {nlayers} and {n_cls}.")
        blocks: list[nn.Module] = []
        for _ in range(nlayers - 1):
            blocks += [nn.Linear(d_model, d_model), activation(), nn.LayerNorm(d_model)]
        self._decoder = nn.ModuleList(blocks)
        self.out_layer = nn.Linear(d_model, n_cls)
        self.reverse_grad = reverse_grad
        self.lambd = float(lambd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Batch logits ``[batch, n_cls]`` of cell embeddings ``[batch, d_model]``."""
        if self.reverse_grad:
            x = grad_reverse(x, self.lambd)
        for layer in self._decoder:
            x = layer(x)
        return self.out_layer(x)


def elastic_cell_similarity(cell_emb: torch.Tensor, threshold: float) -> torch.Tensor:
    """Elastic cell similarity (ECS) loss of scGPT.

    With ``S`` the cosine similarities of all pairs of cells in the minibatch, diagonal set to
    zero and negative entries to zero, the loss is ``mean(1 - (S - threshold)²)`` over all
    ``batch²`` entries. Minimising it pushes pairs more similar than ``threshold`` closer and
    the others apart.

    Parameters
    ----------
    cell_emb
        Cell embeddings ``[batch, d]``.
    threshold
        Similarity threshold (scGPT's ``ecs_threshold``, 0.8 in the integration recipe).

    Returns
    -------
    0-d tensor.

    """
    normed = F.normalize(cell_emb, p=2, dim=1)
    sim = normed @ normed.T
    eye = torch.eye(sim.shape[0], dtype=torch.bool, device=sim.device)
    sim = F.relu(sim.masked_fill(eye, 0.0))
    return torch.mean(1 - (sim - threshold) ** 2)
