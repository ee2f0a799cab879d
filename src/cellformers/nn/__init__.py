"""Shared network parts: attention (softmax and Performer), transformer layers, token/value encoders and heads."""

from ._attention import MultiheadSelfAttention
from ._autobin import AutoDiscretizationEmbedding
from ._batch import (
    AdversarialDiscriminator,
    BatchLabelEncoder,
    DomainSpecificBatchNorm1d,
    GradientReversal,
    elastic_cell_similarity,
    grad_reverse,
)
from ._encoders import ContinuousValueEncoder, GeneEncoder
from ._heads import ClsDecoder, ExprDecoder, MaskedLMHead, MVCDecoder
from ._lora import (
    LORA_TARGETS,
    LoRAAdapter,
    add_lora,
    find_lora_targets,
    lora_adapters,
    lora_state_dict,
    merge_lora,
    remove_lora,
)
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
    "LORA_TARGETS",
    "AdversarialDiscriminator",
    "AutoDiscretizationEmbedding",
    "BatchLabelEncoder",
    "ClsDecoder",
    "ContinuousValueEncoder",
    "DomainSpecificBatchNorm1d",
    "ExprDecoder",
    "FastAttention",
    "GeneEncoder",
    "GradientReversal",
    "LoRAAdapter",
    "MVCDecoder",
    "MaskedLMHead",
    "MultiheadSelfAttention",
    "Performer",
    "PerformerFeedForward",
    "PerformerSelfAttention",
    "TransformerEncoder",
    "TransformerEncoderLayer",
    "add_lora",
    "elastic_cell_similarity",
    "find_lora_targets",
    "gaussian_orthogonal_random_matrix",
    "grad_reverse",
    "linear_attention",
    "lora_adapters",
    "lora_state_dict",
    "merge_lora",
    "remove_lora",
    "softmax_kernel_features",
]
