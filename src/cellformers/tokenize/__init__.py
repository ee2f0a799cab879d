"""Tokenizers: turn CSR batches of cells into model input sequences (vectorised)."""

from ._binning import ScGPTTokens, bin_csr, scgpt_sequence_lengths, tokenize_scgpt
from ._rank import GeneformerTokens, geneformer_sequence_lengths, tokenize_geneformer

__all__ = [
    "GeneformerTokens",
    "ScGPTTokens",
    "bin_csr",
    "geneformer_sequence_lengths",
    "scgpt_sequence_lengths",
    "tokenize_geneformer",
    "tokenize_scgpt",
]
