"""Networks (scvi-tools modules), one file per model family."""

from ._adversarial import BatchAdversarialModule
from ._geneformer import GeneformerModule
from ._scbert import SCBERTModule
from ._scfoundation import SCFoundationModule, gather_scfoundation_tokens
from ._scgpt import SCGPTModule

__all__ = [
    "BatchAdversarialModule",
    "GeneformerModule",
    "SCBERTModule",
    "SCFoundationModule",
    "SCGPTModule",
    "gather_scfoundation_tokens",
]
