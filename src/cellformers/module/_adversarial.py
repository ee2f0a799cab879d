"""Adversarial batch removal for any module: a discriminator on its cell embedding."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from scvi import REGISTRY_KEYS
from scvi.module.base import BaseModuleClass, LossOutput
from torch import nn

from ..nn import AdversarialDiscriminator


class BatchAdversarialModule(BaseModuleClass):
    """Wrap a module so that training also removes batch information from its cell embedding.

    The wrapped module's own loss (masked pretraining, classification …) is computed as
    usual; in the same step the cell embedding of the minibatch (``embed(tensors)``, e.g. the
    model's default embedding of the unmasked tokens) goes through a gradient-reversal layer
    into a batch discriminator (:class:`~cellformers.nn.AdversarialDiscriminator`). The
    discriminator learns to tell the batches apart while the reversed gradient pushes the
    encoder to make them indistinguishable (domain-adversarial training, Ganin & Lempitsky
    2015; scGPT's ``DAB`` objective). The total loss is ``loss + weight * cross-entropy``.

    Attributes of the wrapped module are reachable through the wrapper, so code holding the
    model's module works unchanged during training.

    Parameters
    ----------
    backbone
        The module to train.
    embed
        Cell embeddings ``[batch, dim]`` of a minibatch (with gradients).
    n_batch
        Number of batch categories.
    dim
        Width of the cell embedding.
    weight
        Weight of the discriminator's cross-entropy in the loss.
    discriminator
        A trained discriminator to continue with; a fresh one by default.

    """

    def __init__(
        self,
        backbone: BaseModuleClass,
        embed: Callable[[dict[str, torch.Tensor]], torch.Tensor],
        n_batch: int,
        dim: int,
        weight: float = 1.0,
        discriminator: nn.Module | None = None,
    ):
        super().__init__()
        if n_batch < 2:
            raise ValueError(
                f"Adversarial batch removal needs at least 2 batches, got {n_batch}; register "
                "`batch_key` in setup_anndata."
            )
        if not weight > 0:
            raise ValueError(f"The adversarial weight must be > 0, got {weight}.")
        self.backbone = backbone
        self.discriminator = discriminator or AdversarialDiscriminator(dim, n_batch)
        self.weight = float(weight)
        self._embed = embed

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("backbone"), name)

    def forward(self, tensors, *args, compute_loss: bool = True, **kwargs):
        """Run the wrapped module and add the discriminator's loss (see the class docstring)."""
        out = self.backbone.forward(tensors, *args, compute_loss=compute_loss, **kwargs)
        if not compute_loss:
            return out
        inference_outputs, generative_outputs, loss_output = out
        batch = tensors.get(REGISTRY_KEYS.BATCH_KEY)
        if batch is None:
            raise KeyError("The minibatch has no batch labels; register `batch_key`.")
        batch = batch.reshape(-1).long().to(loss_output.loss.device)
        logits = self.discriminator(self._embed(tensors)).float()
        ce = F.cross_entropy(logits, batch)
        extra = dict(loss_output.extra_metrics or {})
        extra["batch_adversary_ce"] = ce.detach()
        extra["batch_adversary_accuracy"] = (logits.argmax(-1) == batch).float().mean().detach()
        loss = LossOutput(
            loss=loss_output.loss + self.weight * ce,
            reconstruction_loss=loss_output.reconstruction_loss,
            classification_loss=loss_output.classification_loss,
            logits=loss_output.logits,
            true_labels=loss_output.true_labels,
            extra_metrics=extra,
            n_obs_minibatch=loss_output.n_obs_minibatch,
        )
        return inference_outputs, generative_outputs, loss

    # the scvi-tools protocol is the wrapped module's (forward is overridden)
    def _get_inference_input(self, tensors, **kwargs):  # pragma: no cover - unused
        return self.backbone._get_inference_input(tensors, **kwargs)

    def inference(self, *args, **kwargs):  # pragma: no cover - unused
        return self.backbone.inference(*args, **kwargs)

    def _get_generative_input(self, *args, **kwargs):  # pragma: no cover - unused
        return self.backbone._get_generative_input(*args, **kwargs)

    def generative(self, *args, **kwargs):  # pragma: no cover - unused
        return self.backbone.generative(*args, **kwargs)

    def loss(self, *args, **kwargs):  # pragma: no cover - unused
        return self.backbone.loss(*args, **kwargs)

    def sample(self, *args, **kwargs):  # pragma: no cover - unused
        return self.backbone.sample(*args, **kwargs)
