"""Tiny random-weight checkpoints in the official folder layouts, written with cellformers' own
modules (no official package needed)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from official_scgpt import official_args

from cellformers.genes import GeneVocab
from cellformers.module import SCGPTModule

TINY_SCGPT = {"d_model": 16, "nhead": 2, "d_hid": 16, "nlayers": 1}


def tiny_scgpt_folder(folder: Path, vocab: GeneVocab | Path, *, seed: int = 0) -> Path:
    """Write ``args.json``, ``vocab.json`` (``vocab``, or a copy of a ``vocab.json`` file) and a
    random ``best_model.pt`` of a one-layer, 16-wide scGPT."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    args = official_args(**TINY_SCGPT, dropout=0.0, max_seq_len=64)
    (folder / "args.json").write_text(json.dumps(args))
    if isinstance(vocab, GeneVocab):
        vocab.save(folder / "vocab.json")
    else:
        shutil.copyfile(vocab, folder / "vocab.json")
        vocab = GeneVocab.from_file(vocab)
    torch.manual_seed(seed)
    module = SCGPTModule(len(vocab), pad_id=vocab.pad_id, **TINY_SCGPT)
    torch.save(module.state_dict(), folder / "best_model.pt")
    return folder
