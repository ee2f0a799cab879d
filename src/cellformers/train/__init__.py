"""Lightning training plans and learning-rate schedules."""

from ._plans import LR_SCHEDULES, PretrainingPlan, lr_multiplier, macro_f1, warmup_cosine

__all__ = ["LR_SCHEDULES", "PretrainingPlan", "lr_multiplier", "macro_f1", "warmup_cosine"]
