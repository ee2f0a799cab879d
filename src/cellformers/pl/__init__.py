"""Plotting functions (scanpy/matplotlib styling)."""

from ._perturbation import perturbation_effect

__all__: list[str] = [
    "perturbation_effect",
]
