"""Lightning training plans for transformer modules."""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import torch
from scvi.module.base import BaseModuleClass, LossOutput
from scvi.train import TrainingPlan

from ..data import derive_seed, seed_random_states

logger = logging.getLogger(__name__)

LR_SCHEDULES: tuple[str, ...] = ("cosine", "linear", "step", "constant")
LAST_CHECKPOINT = "last.ckpt"
_RESUME_KEY = "cellformers_resume"  # where a checkpoint keeps the seed and the position
_TRAIN_STREAM, _VALIDATION_STREAM = 1, 2  # keys of the per-step seeds (0 is the data's)


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
    return lr_multiplier(
        step,
        schedule="cosine",
        warmup_steps=warmup_steps,
        total_steps=total_steps,
        min_lr_ratio=min_lr_ratio,
    )


def lr_multiplier(
    step: int,
    *,
    schedule: str,
    warmup_steps: int,
    total_steps: int,
    min_lr_ratio: float = 0.0,
    steps_per_epoch: int = 1,
    step_gamma: float = 0.9,
) -> float:
    """Learning-rate multiplier of a warm-up + decay schedule at optimiser step ``step``.

    Linear warm-up from 0 over ``warmup_steps``, then

    * ``"cosine"``: cosine decay to ``min_lr_ratio`` at ``total_steps``;
    * ``"linear"``: linear decay to ``min_lr_ratio`` (Hugging Face's default, Geneformer);
    * ``"step"``: multiply by ``step_gamma`` after every epoch (scGPT's ``StepLR``);
    * ``"constant"``: the full rate.

    Parameters
    ----------
    step
        Optimiser step (0-based).
    schedule
        One of ``"cosine"``, ``"linear"``, ``"step"``, ``"constant"``.
    warmup_steps
        Steps of linear warm-up.
    total_steps
        Total number of optimiser steps.
    min_lr_ratio
        Final rate of the cosine and linear decays, as a fraction of the full one.
    steps_per_epoch
        Optimiser steps per epoch (for ``"step"``).
    step_gamma
        Decay factor per epoch (for ``"step"``).

    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min((step - warmup_steps) / max(total_steps - warmup_steps, 1), 1.0)
    if schedule == "cosine":
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "linear":
        return min_lr_ratio + (1.0 - min_lr_ratio) * (1.0 - progress)
    if schedule == "step":
        return step_gamma ** (step // max(steps_per_epoch, 1))
    if schedule == "constant":
        return 1.0
    raise ValueError(f"schedule must be one of {LR_SCHEDULES}, got {schedule!r}.")


def macro_f1(confusion: torch.Tensor) -> torch.Tensor:
    """Macro-averaged F1 from a confusion matrix (rows: true class, columns: predicted).

    Classes that occur neither as a label nor as a prediction are left out of the average,
    as in :func:`sklearn.metrics.f1_score` with ``average="macro"``.

    Parameters
    ----------
    confusion
        Square count matrix.

    Returns
    -------
    0-d tensor.

    """
    confusion = confusion.double()
    tp = confusion.diagonal()
    support = confusion.sum(1) + confusion.sum(0)  # 2 tp + fp + fn
    present = support > 0
    if not present.any():
        return confusion.new_tensor(0.0)
    return (2 * tp[present] / support[present]).mean()


class PretrainingPlan(TrainingPlan):
    """Training plan for transformer pretraining and fine-tuning.

    The scvi-tools :class:`~scvi.train.TrainingPlan` with AdamW, settings suited to
    transformers (``eps=1e-8`` instead of the VAE-tuned ``0.01``) and a per-step schedule:
    linear warm-up over ``warmup_ratio`` of all optimiser steps, then cosine decay. Metrics are
    logged outside inference mode so that multi-process (DDP) training on CPU works.

    With a ``seed``, every training and validation step first seeds the random states of
    Python, NumPy and torch with a function of ``(seed, epoch, batch, rank)``, so masking,
    dropout and any other draw do not depend on what ran before; together with the seeded
    training order of :class:`~cellformers.data.ResumableDataSplitter` this makes a run that
    restarts from a checkpoint end with the same weights as one that never stopped. With a
    ``checkpoint_dir`` the plan writes ``last.ckpt`` there every ``checkpoint_every_n_steps``
    optimiser steps (replacing the previous one; a step that ends an epoch is saved with the
    next one). A checkpoint holds only tensors, numbers, strings and dicts, so it loads with
    ``torch.load(..., weights_only=True)``.

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
    lr_schedule
        Decay after the warm-up: one of ``"cosine"``, ``"linear"``, ``"step"``, ``"constant"``
        (see :func:`lr_multiplier`).
    step_gamma
        Decay factor per epoch of the ``"step"`` schedule.
    seed
        Seed of the per-step random states; `None` leaves them alone.
    checkpoint_dir
        Folder for the resumable checkpoint ``last.ckpt``; `None` writes none.
    checkpoint_every_n_steps
        Optimiser steps between two checkpoints.
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
        lr_schedule: str = "cosine",
        step_gamma: float = 0.9,
        seed: int | None = None,
        checkpoint_dir: str | os.PathLike | None = None,
        checkpoint_every_n_steps: int = 50,
        **kwargs,
    ) -> None:
        if lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {lr_schedule!r}.")
        if not 0.0 < step_gamma <= 1.0:
            raise ValueError(f"step_gamma must be in (0, 1], got {step_gamma}.")
        if not 0.0 <= warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {warmup_ratio}.")
        if not 0.0 <= min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}.")
        if isinstance(checkpoint_every_n_steps, bool) or not (
            isinstance(checkpoint_every_n_steps, int) and checkpoint_every_n_steps > 0
        ):
            raise ValueError(
                "checkpoint_every_n_steps must be a positive integer, got "
                f"{checkpoint_every_n_steps!r}."
            )
        kwargs.setdefault("optimizer", "AdamW")
        super().__init__(module, lr=lr, weight_decay=weight_decay, eps=eps, **kwargs)
        self.warmup_ratio = warmup_ratio
        self.min_lr_ratio = min_lr_ratio
        self.lr_schedule = lr_schedule
        self.step_gamma = step_gamma
        self._confusion: dict[str, torch.Tensor] = {}
        self.seed = seed
        self.checkpoint_dir = None if checkpoint_dir is None else Path(checkpoint_dir)
        self.checkpoint_every_n_steps = checkpoint_every_n_steps
        self._position: tuple[int, int] | None = None  # (epoch, batches done) of a checkpoint
        self._saved_step = 0
        self._batches_per_epoch: int | None = None  # of the run a checkpoint was written by

    def configure_optimizers(self):
        """AdamW with a per-step warm-up + decay schedule sized by the trainer."""
        params = [p for p in self.module.parameters() if p.requires_grad]
        optimizer = self.get_optimizer_creator()(params)
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        warmup = max(round(self.warmup_ratio * total), 1) if self.warmup_ratio > 0 else 0
        steps_per_epoch = max(total // max(int(self.trainer.max_epochs or 1), 1), 1)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lambda step: lr_multiplier(
                step,
                schedule=self.lr_schedule,
                warmup_steps=warmup,
                total_steps=total,
                min_lr_ratio=self.min_lr_ratio,
                steps_per_epoch=steps_per_epoch,
                step_gamma=self.step_gamma,
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
        if loss_output.logits is not None and loss_output.true_labels is not None:
            self._update_confusion(loss_output.logits, loss_output.true_labels, mode)
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

    # ------------------------------------------------------------------ seeding and checkpoints
    def _seed_step(self, stream: int, batch_idx: int) -> None:
        if self.seed is not None:
            key = (self.seed, stream, self.current_epoch, batch_idx, self.global_rank)
            seed_random_states(derive_seed(*key))

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        """Seed the random states of this training step."""
        self._seed_step(_TRAIN_STREAM, batch_idx)

    def on_validation_batch_start(self, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        """Seed the random states of this validation step."""
        self._seed_step(_VALIDATION_STREAM, batch_idx)

    def on_train_start(self) -> None:
        """Check that a resumed run reads the data as the run that wrote the checkpoint."""
        super().on_train_start()
        self._saved_step = self.global_step
        expected, self._batches_per_epoch = self._batches_per_epoch, None
        if expected is not None and expected != self.trainer.num_training_batches:
            raise ValueError(
                f"The checkpoint was written by a run with {expected} minibatches per epoch, "
                f"this run has {self.trainer.num_training_batches}: resume with the same data, "
                "train_size, validation_size and batch_size."
            )

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        """Write ``last.ckpt`` when ``checkpoint_every_n_steps`` steps passed since the last."""
        if self.checkpoint_dir is None:
            return
        every = self.checkpoint_every_n_steps
        due = self.global_step // every > self._saved_step // every
        # a checkpoint at the end of an epoch would skip its validation on resume
        if not due or batch_idx + 1 >= self.trainer.num_training_batches:
            return
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        path = self.checkpoint_dir / LAST_CHECKPOINT
        partial = path.with_name(LAST_CHECKPOINT + ".partial")
        self._position = (self.current_epoch, batch_idx + 1)
        self.trainer.save_checkpoint(partial, weights_only=False)  # optimiser state too
        self._position = None  # other checkpoints (e.g. callbacks') hold no position
        if self.trainer.is_global_zero:
            os.replace(partial, path)  # a kill while writing leaves the previous checkpoint
        self._saved_step = self.global_step

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Keep the seed and the position in the epoch in the checkpoint."""
        if self.seed is not None and self._position is not None:
            epoch, batches_done = self._position
            checkpoint[_RESUME_KEY] = {
                "seed": int(self.seed),
                "epoch": int(epoch),
                "batches_done": int(batches_done),
                "batches_per_epoch": int(self.trainer.num_training_batches),
            }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Restore the seed and make the data start where the checkpointed run stopped."""
        state = checkpoint.get(_RESUME_KEY)
        if state is None:
            logger.warning(
                "The checkpoint holds no training order (it was not written by train(..., "
                "checkpoint_dir=...)); the resumed run will not repeat the original one."
            )
            return
        self.seed = state["seed"]
        self._batches_per_epoch = state["batches_per_epoch"]
        datamodule = self.trainer.datamodule
        if hasattr(datamodule, "resume_at"):
            datamodule.resume_at(
                seed=state["seed"], epoch=state["epoch"], batches_done=state["batches_done"]
            )

    # ------------------------------------------------------------------ classification scores
    def _update_confusion(self, logits: torch.Tensor, labels: torch.Tensor, mode: str) -> None:
        n = logits.shape[-1]
        index = labels.reshape(-1).long() * n + logits.argmax(-1).reshape(-1)
        counts = torch.bincount(index, minlength=n * n).reshape(n, n)
        previous = self._confusion.get(mode)
        self._confusion[mode] = counts if previous is None else previous + counts

    def _log_macro_f1(self, mode: str) -> None:
        confusion = self._confusion.pop(mode, None)
        if confusion is None:
            return
        if self.trainer.world_size > 1:
            confusion = self.all_gather(confusion).reshape(-1, *confusion.shape).sum(0)
        self.log(f"macro_f1_{mode}", macro_f1(confusion).float(), sync_dist=False)

    def on_train_epoch_end(self) -> None:
        """Log the epoch's macro-F1 of the training cells (classification objectives)."""
        super().on_train_epoch_end()
        self._log_macro_f1("train")

    def on_validation_epoch_end(self) -> None:
        """Log ``macro_f1_validation`` (usable as ``early_stopping_monitor``)."""
        super().on_validation_epoch_end()
        self._log_macro_f1("validation")
