"""Plotting functions (scanpy/matplotlib styling)."""

from ._integration import integration_scores
from ._perturbation import perturbation_effect

__all__: list[str] = [
    "integration_scores",
    "perturbation_effect",
]
