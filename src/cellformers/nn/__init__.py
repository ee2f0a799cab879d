"""Shared network parts: attention (softmax and Performer), transformer layers, token/value encoders and heads."""

from ._attention import MultiheadSelfAttention
from ._autobin import AutoDiscretizationEmbedding
from ._encoders import ContinuousValueEncoder, GeneEncoder
from ._heads import ClsDecoder, ExprDecoder, MaskedLMHead, MVCDecoder
from ._performer import (
    FastAttention,
    Performer,
    PerformerFeedForward,
    PerformerSelfAttention,
    gaussian_orthogonal_random_matrix,
    linear_attention,
    softmax_kernel_features,
)
from ._transformer import TransformerEncoder, TransformerEncoderLayer

__all__ = [
    "AutoDiscretizationEmbedding",
    "ClsDecoder",
    "ContinuousValueEncoder",
    "ExprDecoder",
    "FastAttention",
    "GeneEncoder",
    "MVCDecoder",
    "MaskedLMHead",
    "MultiheadSelfAttention",
    "Performer",
    "PerformerFeedForward",
    "PerformerSelfAttention",
    "TransformerEncoder",
    "TransformerEncoderLayer",
    "gaussian_orthogonal_random_matrix",
    "linear_attention",
    "softmax_kernel_features",
]
