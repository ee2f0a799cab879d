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
from ._sampling import (
    ResumableDataSplitter,
    SeededBatches,
    SeededBatchSampler,
    derive_seed,
    seed_random_states,
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
    "ResumableDataSplitter",
    "SeededBatchSampler",
    "SeededBatches",
    "TokenizingCollator",
    "cellbench_2platform",
    "check_expression",
    "check_obs_labels",
    "check_setup_keys",
    "check_shape",
    "check_unique",
    "derive_seed",
    "fetch_file",
    "geneformer_v1_dictionaries",
    "is_available",
    "length_bucketed_batches",
    "papalexi_eccite_lowmoi",
    "pbmc68k_reduced_counts",
    "seed_random_states",
    "to_csr",
]
