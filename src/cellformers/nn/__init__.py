"""Shared network parts: attention, transformer layers, token/value encoders and heads."""

from ._attention import MultiheadSelfAttention
from ._encoders import ContinuousValueEncoder, GeneEncoder
from ._heads import ExprDecoder, MaskedLMHead, MVCDecoder
from ._transformer import TransformerEncoder, TransformerEncoderLayer

__all__ = [
    "ContinuousValueEncoder",
    "ExprDecoder",
    "GeneEncoder",
    "MVCDecoder",
    "MaskedLMHead",
    "MultiheadSelfAttention",
    "TransformerEncoder",
    "TransformerEncoderLayer",
]
