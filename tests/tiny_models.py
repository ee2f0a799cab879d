"""Tiny settings of the four model classes for fast tests built from scratch."""

from __future__ import annotations

import numpy as np
import scvi

import cellformers as cf
from cellformers.model import SCBERT, SCGPT, Geneformer, SCFoundation

TINY = {
    SCGPT: {"d_model": 16, "nhead": 2, "d_hid": 16, "nlayers": 1, "dropout": 0.0},
    Geneformer: {
        "hidden_size": 16,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "intermediate_size": 32,
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
    },
    SCBERT: {"dim": 16, "depth": 1, "heads": 2, "dim_head": 8},
    SCFoundation: {
        "encoder_dim": 16,
        "encoder_depth": 1,
        "encoder_heads": 2,
        "encoder_d_hid": 32,
        "decoder_dim": 16,
        "decoder_depth": 1,
        "decoder_heads": 2,
        "decoder_dim_head": 8,
        "decoder_nb_features": 8,
    },
}
# shorter sequences keep the tests that run every class on real cells fast
SHORT = {SCGPT: {"max_seq_len": 64}, Geneformer: {"max_input_size": 64}}
CLASSES = list(TINY)
FIT = {"max_epochs": 1, "batch_size": 20, "enable_progress_bar": False}


def class_id(cls) -> str:
    return cls.__name__


def tiny_kwargs(cls) -> dict:
    """Constructor arguments of a tiny, fast ``cls`` model."""
    return {**TINY[cls], **SHORT.get(cls, {})}


def setup(cls, adata, **kwargs):
    """Register ``adata`` (CellBench cells) for ``cls``; Geneformer reads the Ensembl IDs."""
    if cls is Geneformer:
        kwargs.setdefault("gene_key", "ensembl_id")
    cls.setup_anndata(adata, **kwargs)
    return adata


def build(cls, adata, **setup_kwargs):
    """Register ``adata`` and build a tiny ``cls`` model on it (seeded)."""
    setup(cls, adata, **setup_kwargs)
    scvi.settings.seed = 0
    return cls(adata, **tiny_kwargs(cls))


def cellbench_cells(n_cells: int = 40, n_genes: int = 200, seed: int = 0):
    """A few real CellBench cells (both platforms) and their most detected genes."""
    adata = cf.data.cellbench_2platform()
    rng = np.random.default_rng(seed)
    adata = adata[np.sort(rng.choice(adata.n_obs, n_cells, replace=False))]
    detected = np.asarray((adata.X > 0).mean(0)).ravel()
    adata = adata[:, np.argsort(-detected, kind="stable")[:n_genes]].copy()
    adata.obs["cell_line"] = adata.obs["cell_line"].cat.remove_unused_categories()
    return adata
