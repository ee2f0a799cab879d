"""Lightning training plans and learning-rate schedules."""

from ._plans import (
    LAST_CHECKPOINT,
    LR_SCHEDULES,
    PretrainingPlan,
    lr_multiplier,
    macro_f1,
    warmup_cosine,
)

__all__ = [
    "LAST_CHECKPOINT",
    "LR_SCHEDULES",
    "PretrainingPlan",
    "lr_multiplier",
    "macro_f1",
    "warmup_cosine",
]
