"""Gene vocabularies and gene-name matching (symbols, Ensembl IDs, human orthologs)."""

from ._io import check_gene_dict, read_gene_dict, read_gene_index, read_gene_list
from ._match import GeneMatch, match_genes
from ._orthologs import guess_species, map_orthologs
from ._table import ensembl_to_symbol, gene_table, strip_ensembl_version, symbol_to_ensembl
from ._vocab import SCGPT_SPECIALS, GeneVocab

__all__ = [
    "SCGPT_SPECIALS",
    "GeneMatch",
    "GeneVocab",
    "check_gene_dict",
    "ensembl_to_symbol",
    "gene_table",
    "guess_species",
    "map_orthologs",
    "match_genes",
    "read_gene_dict",
    "read_gene_index",
    "read_gene_list",
    "strip_ensembl_version",
    "symbol_to_ensembl",
]
