"""Data loading: dataset registry, input validation and batching helpers."""

from ._batching import TokenizingCollator, length_bucketed_batches, to_csr
from ._datasets import (
    DATASETS,
    cellbench_2platform,
    fetch_file,
    geneformer_v1_dictionaries,
    is_available,
    papalexi_eccite_lowmoi,
    pbmc68k_reduced_counts,
)
from ._validation import (
    check_expression,
    check_obs_labels,
    check_setup_keys,
    check_shape,
    check_unique,
)

__all__ = [
    "DATASETS",
    "TokenizingCollator",
    "cellbench_2platform",
    "check_expression",
    "check_obs_labels",
    "check_setup_keys",
    "check_shape",
    "check_unique",
    "fetch_file",
    "geneformer_v1_dictionaries",
    "is_available",
    "length_bucketed_batches",
    "papalexi_eccite_lowmoi",
    "pbmc68k_reduced_counts",
    "to_csr",
]
