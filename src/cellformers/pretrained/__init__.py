"""Published checkpoints: readers that convert official layouts into module state dicts."""

from ._scgpt import (
    ScGPTCheckpoint,
    load_scgpt_state_dict,
    normalize_scgpt_state_dict,
    read_scgpt_checkpoint,
)

__all__ = [
    "ScGPTCheckpoint",
    "load_scgpt_state_dict",
    "normalize_scgpt_state_dict",
    "read_scgpt_checkpoint",
]
