"""Scanpy-style tools over the model API: results are written into AnnData."""

from ._annotate import annotate
from ._perturbation import (
    evaluate_perturbation,
    perturbation_baseline,
    perturbation_means,
    summarize_perturbation_metrics,
)

__all__: list[str] = [
    "annotate",
    "evaluate_perturbation",
    "perturbation_baseline",
    "perturbation_means",
    "summarize_perturbation_metrics",
]
