"""Model classes: one scvi-tools model per foundation-model family."""

from ._base import FoundationModelBase
from ._geneformer import Geneformer
from ._scbert import SCBERT
from ._scfoundation import SCFoundation
from ._scgpt import SCGPT

__all__ = ["SCBERT", "SCGPT", "FoundationModelBase", "Geneformer", "SCFoundation"]
