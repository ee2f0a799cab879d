"""Lightning training plans and learning-rate schedules."""

from ._plans import PretrainingPlan, warmup_cosine

__all__ = ["PretrainingPlan", "warmup_cosine"]
