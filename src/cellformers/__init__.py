"""Single-cell transformer foundation models as scvi-tools model classes."""

from importlib.metadata import PackageNotFoundError, version

from . import data, genes, model, module, nn, pl, pretrained, tl, tokenize, train
from ._settings import settings

try:
    __version__ = version("cellformers")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0"

__all__ = [
    "data",
    "genes",
    "model",
    "module",
    "nn",
    "pl",
    "pretrained",
    "settings",
    "tl",
    "tokenize",
    "train",
]
