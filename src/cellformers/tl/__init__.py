"""Scanpy-style tools over the model API: results are written into AnnData or MuData."""

from ._annotate import annotate
from ._embed import embed
from ._integration import evaluate_integration
from ._perturbation import (
    evaluate_perturbation,
    perturbation_baseline,
    perturbation_means,
    summarize_perturbation_metrics,
)
from ._transfer import transfer_labels

__all__: list[str] = [
    "annotate",
    "embed",
    "evaluate_integration",
    "evaluate_perturbation",
    "perturbation_baseline",
    "perturbation_means",
    "summarize_perturbation_metrics",
    "transfer_labels",
]
