"""cellformers.model.SCFoundation end to end on real CellBench cells, against the reference."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import scvi
import torch
from reference_scfoundation import (
    official_config,
    official_state_dict,
    reference_cell_embedding,
    reference_full_forward,
    save_models_ckpt,
)

import cellformers as cf
from cellformers.model import SCFoundation

N_LIST = 420
ENC_HEADS = 4
DEC = {"dec_dim": 24, "dec_depth": 2, "dec_heads": 2, "dim_head": 12}
TINY = {
    "encoder_dim": 32,
    "encoder_depth": 2,
    "encoder_heads": 4,
    "encoder_d_hid": 64,
    "decoder_dim": 24,
    "decoder_depth": 2,
    "decoder_heads": 2,
    "decoder_dim_head": 12,
    "decoder_nb_features": 16,
}


@pytest.fixture(scope="module")
def data():
    """40 CellBench cells, 500 of their genes; a 420-gene list (400 of them + 20 absent)."""
    adata = cf.data.cellbench_2platform()
    rng = np.random.default_rng(0)
    adata = adata[np.sort(rng.choice(adata.n_obs, 40, replace=False))].copy()
    detected = np.asarray((adata.X > 0).mean(0)).ravel()
    adata = adata[:, np.argsort(-detected, kind="stable")[:500]].copy()
    genes = list(
        rng.permutation(adata.var_names[:400].tolist() + [f"ABSENT{i}" for i in range(20)])
    )
    return adata, genes


@pytest.fixture(scope="module")
def checkpoint(data, tmp_path_factory):
    """A random-weight models.ckpt in the official layout (three different networks)."""
    _, genes = data
    folder = tmp_path_factory.mktemp("scf")
    sds = {
        v: official_state_dict(n_genes=N_LIST, nb_features=16, seed=i, **DEC)
        for i, v in enumerate(("cell", "rde", "gene"))
    }
    config = official_config(n_genes=N_LIST, enc_heads=ENC_HEADS, **DEC)
    path = save_models_ckpt(folder / "models.ckpt", sds, config)
    table = folder / "gene_index.tsv"
    table.write_text(
        "gene_name\tindex\n" + "".join(f"{g}\t{i}\n" for i, g in enumerate(genes)), encoding="utf-8"
    )
    return path, table, sds


def _full_values(adata, genes, target=("t", 4.0)):
    """get_embedding.py's per-cell input vectors [genes..., T, S] (pandas alignment, float64)."""
    df = pd.DataFrame(adata.X.toarray().astype(np.float64), columns=adata.var_names)
    aligned = df.reindex(columns=genes, fill_value=0.0).to_numpy()
    total = aligned.sum(1, keepdims=True)
    values = np.log1p(aligned / total * 1e4)
    s = np.log10(total)
    t = np.full_like(s, target[1]) if target[0] == "t" else s + np.log10(target[1])
    return torch.tensor(np.concatenate([values, t, s], axis=1)).float()


def _setup(adata, **kwargs):
    adata = adata.copy()
    SCFoundation.setup_anndata(adata, **kwargs)
    return adata


# ---------------------------------------------------------------- fidelity
@pytest.mark.parametrize("pooling", ["all", "max"])
def test_cell_embeddings_match_reference(data, checkpoint, pooling):
    adata, genes = data
    path, table, sds = checkpoint
    adata = _setup(adata)
    model = SCFoundation.from_pretrained(path, adata, gene_list=table, version="cell")
    full = _full_values(adata, genes)
    expected = torch.stack(
        [reference_cell_embedding(sds["cell"], f, ENC_HEADS, pooling) for f in full]
    ).numpy()
    got = model.get_latent_representation(pooling=pooling, batch_size=16)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
    # a cell's embedding does not depend on its batch
    np.testing.assert_allclose(model.get_latent_representation(pooling=pooling, batch_size=1), got)
    # T = S via "f1"
    full_f1 = _full_values(adata, genes, target=("f", 1.0))
    expected_f1 = reference_cell_embedding(sds["cell"], full_f1[3], ENC_HEADS, pooling).numpy()
    got_f1 = model.get_latent_representation(indices=[3], pooling=pooling, target_depth="f1")
    np.testing.assert_allclose(got_f1[0], expected_f1, atol=1e-5, rtol=0)


def test_expression_and_gene_embeddings_match_reference(data, checkpoint):
    adata, genes = data
    path, table, sds = checkpoint
    adata = _setup(adata)
    cells = [0, 7, 21]
    full = _full_values(adata, genes)[cells]
    where = {g: i for i, g in enumerate(genes)}
    in_list = [g for g in adata.var_names if g in where]
    pos = [where[g] for g in in_list]

    rde = SCFoundation.from_pretrained(path, adata, gene_list=table, version="rde")
    expr = rde.get_normalized_expression(indices=cells, batch_size=2)
    assert list(expr.columns) == in_list and list(expr.index) == list(adata.obs_names[cells])
    ref = torch.stack(
        [reference_full_forward(sds["rde"], f, enc_heads=ENC_HEADS, **_dec()) for f in full]
    )
    np.testing.assert_allclose(expr.to_numpy(), ref[:, pos].numpy(), atol=1e-5, rtol=0)
    everything = rde.get_normalized_expression(indices=cells, all_genes=True, batch_size=3)
    assert list(everything.columns) == genes
    np.testing.assert_allclose(everything.to_numpy(), ref[:, :N_LIST].numpy(), atol=1e-5, rtol=0)

    gene = SCFoundation.from_pretrained(path, adata, gene_list=table, version="gene")
    emb = gene.get_gene_embeddings(indices=cells, batch_size=2)
    states = torch.stack(
        [
            reference_full_forward(sds["gene"], f, enc_heads=ENC_HEADS, to_final=False, **_dec())
            for f in full
        ]
    ).mean(0)
    rows = np.flatnonzero(adata.var_names.isin(in_list))
    assert emb.shape == (adata.n_vars, 24)
    np.testing.assert_allclose(emb[rows], states[pos].numpy(), atol=1e-5, rtol=0)
    assert np.isnan(emb[np.setdiff1d(np.arange(adata.n_vars), rows)]).all()


def _dec():
    return {"dec_heads": DEC["dec_heads"], "dim_head": DEC["dim_head"]}


def test_query_with_other_gene_order_and_read_depth(data, checkpoint):
    adata, genes = data
    path, table, _ = checkpoint
    ref = _setup(adata)
    model = SCFoundation.from_pretrained(path, ref, gene_list=table)
    query = adata[:, ::-1].copy()
    np.testing.assert_allclose(
        model.get_latent_representation(query), model.get_latent_representation(), atol=1e-6
    )
    # "A": log-normalised values with the true totals gives the same embedding as raw counts
    normed = adata.copy()
    normed.obs["n"] = np.asarray(normed.X.sum(1)).ravel()
    df = pd.DataFrame(normed.X.toarray(), columns=normed.var_names)
    in_list = df.columns.isin(genes)
    totals = df.loc[:, in_list].sum(1).to_numpy()[:, None]
    normed.X = np.where(in_list, np.log1p(df.to_numpy() / totals * 1e4), 0.0).astype(np.float32)
    normed.obs["n"] = totals.ravel()
    SCFoundation.setup_anndata(normed, pre_normalized="A", total_counts_key="n")
    np.testing.assert_allclose(
        model.get_latent_representation(normed), model.get_latent_representation(), atol=1e-5
    )


# ---------------------------------------------------------------- training from scratch
def test_pretraining_from_scratch_and_save_load(data, tmp_path):
    adata, _ = data
    adata = _setup(adata)
    scvi.settings.seed = 0
    model = SCFoundation(adata, **TINY)
    assert len(model.gene_list) == adata.n_vars
    model.train(max_epochs=2, batch_size=8, enable_progress_bar=False)
    loss = model.history["reconstruction_loss_train"].to_numpy(dtype=float).ravel()
    assert np.isfinite(loss).all()
    z = model.get_latent_representation()
    assert z.shape == (adata.n_obs, 4 * 32) and np.isfinite(z).all()
    model.save(tmp_path / "m", overwrite=True)
    loaded = SCFoundation.load(tmp_path / "m", adata=adata)
    np.testing.assert_allclose(loaded.get_latent_representation(), z, atol=1e-6)


def test_bad_input(data, checkpoint):
    adata, genes = data
    path, table, _ = checkpoint
    with pytest.raises(ValueError, match="pre_normalized"):
        _setup(adata, pre_normalized="X")
    with pytest.raises(ValueError, match="total_counts_key"):
        _setup(adata, pre_normalized="A")
    with pytest.raises(KeyError, match="nope"):
        _setup(adata, pre_normalized="A", total_counts_key="nope")
    a = adata.copy()
    a.X = a.X * 0.5
    with pytest.raises(ValueError, match="non-integer"):
        _setup(a)
    ok = _setup(adata)
    with pytest.raises(ValueError, match="19,264|genes but gene_list"):
        SCFoundation.from_pretrained(path, ok, gene_list=genes[:-1])
    with pytest.raises(ValueError, match="target_depth"):
        SCFoundation(ok, target_depth="x4", **TINY)
    model = SCFoundation.from_pretrained(path, ok, gene_list=table)
    with pytest.raises(ValueError, match="pooling"):
        model.get_latent_representation(pooling="cls")
    empty = adata.copy()
    X = empty.X.toarray()
    X[2] = 0
    empty.X = sp.csr_matrix(X)
    SCFoundation.setup_anndata(empty)
    with pytest.raises(
        ValueError, match=f"no counts in the genes SCFoundation reads \\({empty.obs_names[2]}\\)"
    ):
        model.get_latent_representation(empty)


def test_finetune_head_on_pretrained_checkpoint(data, checkpoint, tmp_path):
    adata, _ = data
    path, table, _ = checkpoint
    adata = _setup(adata, labels_key="cell_line")
    model = SCFoundation.from_pretrained(path, adata, gene_list=table)
    before = {k: v.clone() for k, v in model.module.state_dict().items()}
    scvi.settings.seed = 0
    model.train(
        max_epochs=3, batch_size=8, mode="finetune", freeze_layers="official", lr=1e-3,
        enable_progress_bar=False,
    )  # fmt: skip
    after = model.module.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith(("encoder.layers.0.", "classifier.")) for k in changed), (
        sorted(changed)[:5]
    )  # 2 layers: the second-to-last is layer 0
    assert "classifier.fc1.0.weight" in after and "classifier.norm.running_mean" in after
    probs = model.predict_celltype(soft=True, batch_size=5)
    np.testing.assert_allclose(model.predict_celltype(soft=True, batch_size=40), probs, atol=1e-6)
    assert list(probs.columns) == ["H1975", "H2228", "HCC827"]
    model.save(tmp_path / "ft", overwrite=True)
    loaded = SCFoundation.load(tmp_path / "ft", adata=adata)
    np.testing.assert_allclose(loaded.predict_celltype(soft=True), probs, atol=1e-6)
    # read-depth-aware pretraining needs raw counts
    normed = data[0].copy()
    normed.X = normed.X.log1p()
    normed = _setup(normed, pre_normalized="T")
    with pytest.raises(ValueError, match="raw single-cell counts"):
        SCFoundation(normed, **TINY).train(max_epochs=1)


def test_batch_adversarial_pretraining(data):
    adata, _ = data
    adata = _setup(adata, batch_key="batch")
    scvi.settings.seed = 0
    model = SCFoundation(adata, **TINY)
    model.train(max_epochs=1, batch_size=8, batch_adversarial=0.5, enable_progress_bar=False)
    ce = model.history["batch_adversary_ce_train"].to_numpy(dtype=float).ravel()
    assert np.isfinite(ce).all()
    assert type(model.module).__name__ == "SCFoundationModule"
