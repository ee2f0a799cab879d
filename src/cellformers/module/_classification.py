"""Cell classification loss shared by every module with a classification head."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from scvi import REGISTRY_KEYS
from scvi.module.base import LossOutput


class ClassifierMixin:
    """Cross-entropy on the registered labels for a module's class logits.

    A module that can classify cells inherits from this class and has ``n_labels``. The
    model class may set :attr:`class_weights` (one weight per class, e.g. inverse class
    frequencies for imbalanced labels) for the duration of a training run; it is a plain
    attribute, not part of the state dict, so checkpoints keep their official layout.
    """

    n_labels: int
    class_weights: torch.Tensor | None = None

    def _classification_loss(
        self, tensors: dict[str, torch.Tensor], logits: torch.Tensor
    ) -> LossOutput:
        """Cross-entropy of ``logits`` ``[batch, n_labels]`` against the minibatch labels.

        ``loss`` is the (class-weighted) mean cross-entropy, ``reconstruction_loss`` the
        per-cell cross-entropy; ``logits`` and ``true_labels`` are returned too, so the
        training plan can score macro-F1 on the validation cells, and
        ``extra_metrics["accuracy"]`` is the minibatch accuracy.
        """
        labels = tensors.get(REGISTRY_KEYS.LABELS_KEY)
        if labels is None:
            raise KeyError(
                f"The minibatch has no {REGISTRY_KEYS.LABELS_KEY!r}; classification needs labels "
                "(register a labels_key in setup_anndata)."
            )
        labels = labels.reshape(-1).to(logits.device).long()
        if labels.numel() and (labels.min() < 0 or labels.max() >= self.n_labels):
            raise ValueError(
                f"Label codes must be in [0, {self.n_labels}); got values in "
                f"[{int(labels.min())}, {int(labels.max())}]."
            )
        logits = logits.float()
        ce = F.cross_entropy(logits, labels, reduction="none")
        weights = self.class_weights
        if weights is None:
            loss = ce.mean()
        else:
            # torch's weighted mean: sum(w_y * ce) / sum(w_y)
            w = weights.to(device=ce.device, dtype=ce.dtype)[labels]
            loss = (w * ce).sum() / w.sum().clamp_min(torch.finfo(ce.dtype).tiny)
        accuracy = (logits.argmax(dim=-1) == labels).float().mean()
        return LossOutput(
            loss=loss,
            reconstruction_loss=ce,
            classification_loss=loss.detach(),
            logits=logits.detach(),
            true_labels=labels,
            extra_metrics={"accuracy": accuracy.detach()},
        )
