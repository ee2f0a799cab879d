"""Tiny settings of the four model classes for fast tests built from scratch."""

from __future__ import annotations

import numpy as np

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


def cellbench_cells(n_cells: int, n_genes: int, seed: int = 0):
    """``n_cells`` random CellBench cells on their ``n_genes`` most often detected genes."""
    adata = cf.data.cellbench_2platform()
    rng = np.random.default_rng(seed)
    adata = adata[np.sort(rng.choice(adata.n_obs, n_cells, replace=False))].copy()
    detected = np.asarray((adata.X > 0).mean(0)).ravel()
    return adata[:, np.argsort(-detected, kind="stable")[:n_genes]].copy()
