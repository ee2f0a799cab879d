"""Published checkpoints: the registry of named weights, and readers of the official layouts."""

from ._geneformer import (
    GeneformerCheckpoint,
    geneformer_hf_config,
    geneformer_module_kwargs,
    geneformer_state_dict_to_hf,
    load_geneformer_state_dict,
    read_geneformer_checkpoint,
    save_geneformer_checkpoint,
)
from ._registry import (
    PRETRAINED,
    PretrainedFile,
    PretrainedModel,
    available,
    fetch,
    is_cached,
    model_folder,
    resolve_pretrained,
)
from ._scbert import (
    ScBERTCheckpoint,
    load_scbert_state_dict,
    read_scbert_checkpoint,
    scbert_config_from_state_dict,
    scbert_module_kwargs,
)
from ._scfoundation import (
    ScFoundationCheckpoint,
    flatten_scfoundation_config,
    load_scfoundation_state_dict,
    read_scfoundation_checkpoint,
    save_scfoundation_checkpoint,
    scfoundation_config,
    scfoundation_module_kwargs,
)
from ._scgpt import (
    ScGPTCheckpoint,
    load_scgpt_state_dict,
    normalize_scgpt_state_dict,
    read_scgpt_checkpoint,
)

__all__ = [
    "PRETRAINED",
    "GeneformerCheckpoint",
    "PretrainedFile",
    "PretrainedModel",
    "ScBERTCheckpoint",
    "ScFoundationCheckpoint",
    "ScGPTCheckpoint",
    "available",
    "fetch",
    "flatten_scfoundation_config",
    "geneformer_hf_config",
    "geneformer_module_kwargs",
    "geneformer_state_dict_to_hf",
    "is_cached",
    "load_geneformer_state_dict",
    "load_scbert_state_dict",
    "load_scfoundation_state_dict",
    "load_scgpt_state_dict",
    "model_folder",
    "normalize_scgpt_state_dict",
    "read_geneformer_checkpoint",
    "read_scbert_checkpoint",
    "read_scfoundation_checkpoint",
    "read_scgpt_checkpoint",
    "resolve_pretrained",
    "save_geneformer_checkpoint",
    "save_scfoundation_checkpoint",
    "scbert_config_from_state_dict",
    "scbert_module_kwargs",
    "scfoundation_config",
    "scfoundation_module_kwargs",
]
