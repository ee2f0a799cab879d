"""Networks (scvi-tools modules), one file per model family."""

from ._scgpt import SCGPTModule

__all__ = ["SCGPTModule"]
