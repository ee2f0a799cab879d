"""Tokenizers: turn CSR batches of cells into model input sequences (vectorised)."""

from ._binning import ScGPTTokens, bin_csr, scgpt_sequence_lengths, tokenize_scgpt
from ._depth import (
    SCFoundationTokens,
    scfoundation_bulk_target_sum,
    scfoundation_sequence_lengths,
    tokenize_scfoundation,
)
from ._panel import panel_columns, scbert_sequence_lengths, tokenize_scbert
from ._perturb import (
    COUNT_PERTURB_MODES,
    RankPerturbation,
    drop_last_gene,
    perturb_counts,
    perturb_rank_tokens,
)
from ._rank import GeneformerTokens, geneformer_sequence_lengths, tokenize_geneformer

__all__ = [
    "COUNT_PERTURB_MODES",
    "GeneformerTokens",
    "RankPerturbation",
    "SCFoundationTokens",
    "ScGPTTokens",
    "bin_csr",
    "drop_last_gene",
    "geneformer_sequence_lengths",
    "panel_columns",
    "perturb_counts",
    "perturb_rank_tokens",
    "scbert_sequence_lengths",
    "scfoundation_bulk_target_sum",
    "scfoundation_sequence_lengths",
    "scgpt_sequence_lengths",
    "tokenize_geneformer",
    "tokenize_scbert",
    "tokenize_scfoundation",
    "tokenize_scgpt",
]
