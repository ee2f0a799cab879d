"""Tokenizers: turn CSR batches of cells into model input sequences (vectorised)."""

from ._binning import ScGPTTokens, bin_csr, scgpt_sequence_lengths, tokenize_scgpt

__all__ = ["ScGPTTokens", "bin_csr", "scgpt_sequence_lengths", "tokenize_scgpt"]
