"""Data loading: dataset registry and batching helpers."""

from ._datasets import (
    DATASETS,
    cellbench_2platform,
    fetch_file,
    is_available,
    papalexi_eccite_lowmoi,
    pbmc68k_reduced_counts,
)

__all__ = [
    "DATASETS",
    "cellbench_2platform",
    "fetch_file",
    "is_available",
    "papalexi_eccite_lowmoi",
    "pbmc68k_reduced_counts",
]
