"""Gene vocabularies and gene-name matching (symbols and Ensembl IDs)."""

from ._vocab import SCGPT_SPECIALS, GeneVocab

__all__ = ["SCGPT_SPECIALS", "GeneVocab"]
