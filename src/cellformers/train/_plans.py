"""Lightning training plans for transformer modules."""

from __future__ import annotations

import math

import torch
from scvi.module.base import BaseModuleClass, LossOutput
from scvi.train import TrainingPlan


def warmup_cosine(step: int, *, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """Learning-rate multiplier: linear warm-up, then cosine decay to ``min_lr_ratio``.

    Parameters
    ----------
    step
        Optimiser step (0-based).
    warmup_steps
        Steps of linear warm-up from 0 to the full learning rate.
    total_steps
        Total number of optimiser steps.
    min_lr_ratio
        Final learning rate as a fraction of the full one.

    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(total_steps - warmup_steps, 1)
    progress = min((step - warmup_steps) / decay_steps, 1.0)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class PretrainingPlan(TrainingPlan):
    """Training plan for transformer pretraining and fine-tuning.

    The scvi-tools :class:`~scvi.train.TrainingPlan` with AdamW, settings suited to
    transformers (``eps=1e-8`` instead of the VAE-tuned ``0.01``) and a per-step schedule:
    linear warm-up over ``warmup_ratio`` of all optimiser steps, then cosine decay. Metrics are
    logged outside inference mode so that multi-process (DDP) training on CPU works.

    Parameters
    ----------
    module
        The module to train; its ``loss`` returns a :class:`~scvi.module.base.LossOutput`.
    lr
        Peak learning rate.
    weight_decay
        AdamW weight decay.
    eps
        AdamW epsilon.
    warmup_ratio
        Fraction of the optimiser steps used for linear warm-up.
    min_lr_ratio
        Learning rate at the end of the cosine decay, as a fraction of ``lr``.
    **kwargs
        Passed to :class:`~scvi.train.TrainingPlan`.

    """

    def __init__(
        self,
        module: BaseModuleClass,
        *,
        lr: float = 1e-4,
        weight_decay: float = 0.01,
        eps: float = 1e-8,
        warmup_ratio: float = 0.1,
        min_lr_ratio: float = 0.0,
        **kwargs,
    ) -> None:
        if not 0.0 <= warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {warmup_ratio}.")
        if not 0.0 <= min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}.")
        kwargs.setdefault("optimizer", "AdamW")
        super().__init__(module, lr=lr, weight_decay=weight_decay, eps=eps, **kwargs)
        self.warmup_ratio = warmup_ratio
        self.min_lr_ratio = min_lr_ratio

    def configure_optimizers(self):
        """AdamW with a per-step warm-up + cosine schedule sized by the trainer."""
        params = [p for p in self.module.parameters() if p.requires_grad]
        optimizer = self.get_optimizer_creator()(params)
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        warmup = max(round(self.warmup_ratio * total), 1) if self.warmup_ratio > 0 else 0
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lambda step: warmup_cosine(
                step, warmup_steps=warmup, total_steps=total, min_lr_ratio=self.min_lr_ratio
            ),
        )
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

    @torch.no_grad()
    def compute_and_log_metrics(self, loss_output: LossOutput, metrics, mode: str) -> None:
        """Log the ELBO-style metrics and every 0-d extra metric of ``loss_output``.

        Runs under :func:`torch.no_grad` (not inference mode), because distributed metric
        reduction on the gloo backend updates tensors in place.
        """
        n_obs = loss_output.n_obs_minibatch
        metrics[f"elbo_{mode}"].update(
            reconstruction_loss=loss_output.reconstruction_loss_sum,
            kl_local=loss_output.kl_local_sum,
            kl_global=loss_output.kl_global_sum,
            n_obs_minibatch=n_obs,
        )
        self.log_dict(
            metrics,
            on_step=self.on_step,
            on_epoch=self.on_epoch,
            batch_size=n_obs,
            sync_dist=self.use_sync_dist,
        )
        for key, value in (loss_output.extra_metrics or {}).items():
            if isinstance(value, torch.Tensor):
                if value.dim() != 0:
                    raise ValueError(f"Extra metric {key!r} must be a 0-d tensor.")
                value = value.detach()
            self.log(
                f"{key}_{mode}",
                value,
                on_step=self.on_step,
                on_epoch=self.on_epoch,
                batch_size=n_obs,
                sync_dist=self.use_sync_dist,
            )
