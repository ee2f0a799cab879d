from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from official_scgpt import official_folder

import cellformers as cf
from cellformers.model import SCGPT

SMALL = {"d_model": 32, "nhead": 4, "d_hid": 32, "nlayers": 2, "dropout": 0.0, "max_seq_len": 128}


@pytest.fixture
def pbmc(pbmc_counts):
    SCGPT.setup_anndata(pbmc_counts, layer="counts", labels_key="bulk_labels")
    return pbmc_counts


@pytest.fixture(scope="module")
def trained():
    adata = cf.data.pbmc68k_reduced_counts()
    SCGPT.setup_anndata(adata, layer="counts", labels_key="bulk_labels")
    torch.manual_seed(0)
    model = SCGPT(adata, **SMALL)
    model.train(max_epochs=2, batch_size=64, lr=1e-3, train_size=0.9, check_val_every_n_epoch=1)
    return model


# ---------------------------------------------------------------- input validation
def _counts(n_cells=20, n_genes=30, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.poisson(1.0, size=(n_cells, n_genes)).astype(np.float32)
    obs = pd.DataFrame(
        {"ct": rng.choice(["a", "b"], n_cells)}, index=[f"c{i}" for i in range(n_cells)]
    )
    return ad.AnnData(
        sp.csr_matrix(X), obs=obs, var=pd.DataFrame(index=[f"G{i}" for i in range(n_genes)])
    )


@pytest.mark.parametrize(
    ("value", "message"),
    [(-1.0, "negative"), (np.nan, "non-finite"), (np.inf, "non-finite"), (0.5, "non-integer")],
)
def test_setup_rejects_bad_values(value, message):
    adata = _counts()
    X = adata.X.toarray()
    X[3, 4] = value
    adata.X = sp.csr_matrix(X)
    with pytest.raises(ValueError, match=message):
        SCGPT.setup_anndata(adata)


def test_setup_rejects_bad_values_in_layer():
    adata = _counts()
    adata.layers["counts"] = adata.X.copy()
    adata.layers["counts"].data[0] = -3
    with pytest.raises(ValueError, match=r"adata.layers\['counts'\].*negative"):
        SCGPT.setup_anndata(adata, layer="counts")


def test_setup_accepts_normalised_values_when_asked():
    adata = _counts()
    adata.X = adata.X * 0.37
    SCGPT.setup_anndata(adata, is_count_data=False)


def test_setup_rejects_duplicated_genes_and_missing_keys():
    adata = _counts()
    adata.var_names = ["G0"] * 2 + list(adata.var_names[2:])
    with pytest.raises(ValueError, match="not unique"):
        SCGPT.setup_anndata(adata)
    adata = _counts()
    with pytest.raises(KeyError, match="Layer 'counts' not found"):
        SCGPT.setup_anndata(adata, layer="counts")
    with pytest.raises(KeyError, match="'cell_type' not found in adata.obs"):
        SCGPT.setup_anndata(adata, labels_key="cell_type")
    with pytest.raises(KeyError, match="'gene_symbols' not found in adata.var"):
        SCGPT.setup_anndata(adata, gene_key="gene_symbols")


def test_low_vocabulary_coverage_is_an_error():
    adata = _counts()
    SCGPT.setup_anndata(adata)
    vocab = cf.genes.GeneVocab.from_tokens(["G0", "G1", "OTHER1", "OTHER2"])
    with pytest.raises(ValueError, match="G2"):
        SCGPT(adata, vocab=vocab, **SMALL)


def test_setup_does_not_change_user_data():
    adata = _counts()
    before = adata.X.toarray().copy()
    obs_cols = list(adata.obs.columns)
    SCGPT.setup_anndata(adata, labels_key="ct")
    np.testing.assert_array_equal(adata.X.toarray(), before)
    assert [c for c in adata.obs.columns if not c.startswith("_scvi")] == obs_cols


# ---------------------------------------------------------------- training and embeddings
def test_train_and_embed(trained, pbmc):
    hist = trained.history
    assert "train_loss" in hist and "validation_loss" in hist and "mvc_mse_train" in hist
    assert trained.is_trained
    z = trained.get_latent_representation()
    assert z.shape == (pbmc.n_obs, SMALL["d_model"]) and z.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(z, axis=1), 1.0, atol=1e-5)
    z_mean = trained.get_latent_representation(pooling="mean")
    assert z_mean.shape == z.shape and not np.allclose(z_mean, z)
    with pytest.raises(ValueError, match="pooling"):
        trained.get_latent_representation(pooling="max")


def test_embedding_invariant_to_batch_size_and_order(trained, pbmc):
    z = trained.get_latent_representation(batch_size=64)
    for batch_size in (1, 7, 700):
        np.testing.assert_allclose(
            trained.get_latent_representation(batch_size=batch_size), z, atol=1e-5
        )
    perm = np.random.default_rng(1).permutation(pbmc.n_obs)
    np.testing.assert_allclose(
        trained.get_latent_representation(indices=perm, batch_size=13), z[perm], atol=1e-5
    )
    mask = np.zeros(pbmc.n_obs, dtype=bool)
    mask[::3] = True
    np.testing.assert_allclose(trained.get_latent_representation(indices=mask), z[mask], atol=1e-5)


def test_truncated_cells_are_batch_invariant(pbmc):
    torch.manual_seed(0)
    model = SCGPT(pbmc, **{**SMALL, "max_seq_len": 16})  # every cell is truncated
    model.is_trained_ = True
    z = model.get_latent_representation(batch_size=50)
    np.testing.assert_allclose(
        model.get_latent_representation(indices=[5], batch_size=1)[0], z[5], atol=1e-5
    )
    np.testing.assert_allclose(
        model.get_latent_representation(indices=np.arange(700)[::-1], batch_size=9),
        z[::-1],
        atol=1e-5,
    )


def test_untrained_model_refuses_to_embed(pbmc):
    model = SCGPT(pbmc, **SMALL)
    with pytest.raises(RuntimeError, match="train"):
        model.get_latent_representation()


def test_save_load_round_trip(trained, pbmc, tmp_path):
    z = trained.get_latent_representation()
    trained.save(tmp_path / "m", overwrite=True)
    loaded = SCGPT.load(tmp_path / "m", adata=pbmc)
    np.testing.assert_array_equal(loaded.get_latent_representation(), z)
    assert loaded.vocab == trained.vocab
    # genes in another order: the column -> token map is rebuilt for the query data
    perm = np.random.default_rng(0).permutation(pbmc.n_vars)
    shuffled = pbmc[:, perm].copy()
    np.testing.assert_allclose(loaded.get_latent_representation(shuffled), z, atol=1e-5)


def _with_genes(adata, X, var_names):
    query = ad.AnnData(
        sp.csr_matrix(X, dtype=np.float32),
        obs=adata.obs[["bulk_labels"]].copy(),
        var=pd.DataFrame(index=var_names),
    )
    query.layers["counts"] = query.X.copy()
    return query


def test_query_with_other_genes(trained, pbmc):
    z = trained.get_latent_representation()
    counts = pbmc.layers["counts"].toarray()
    # a query with a subset of the genes plus unknown ones embeds without any setup call
    query = _with_genes(
        pbmc,
        np.hstack([counts[:, :600], np.ones((pbmc.n_obs, 5))]),
        list(pbmc.var_names[:600]) + [f"NEW{i}" for i in range(5)],
    )
    zq = trained.get_latent_representation(query, batch_size=32)
    assert zq.shape == z.shape and np.isfinite(zq).all()
    # unknown genes and gene order change nothing
    rev = np.arange(pbmc.n_vars)[::-1]
    same = _with_genes(
        pbmc,
        np.hstack([counts[:, rev], np.full((pbmc.n_obs, 2), 7.0)]),
        list(pbmc.var_names[rev]) + ["UNKNOWN1", "UNKNOWN2"],
    )
    np.testing.assert_allclose(trained.get_latent_representation(same), z, atol=1e-5)
    assert "_scvi_uuid" in same.uns  # registered with the model's setup arguments


def test_tokens_identical_for_counts_and_lognormalised(pbmc):
    """Per-cell quantile binning depends only on each cell's ranking of genes.

    (Without truncation: the random gene subset of a cell longer than max_seq_len is seeded by
    the cell's values, so it differs between counts and normalised values.)
    """
    torch.manual_seed(0)
    model = SCGPT(pbmc, **{**SMALL, "max_seq_len": 1200})
    model.is_trained_ = True
    z = model.get_latent_representation()
    logn = pbmc.copy()
    X = logn.layers["counts"].multiply(1e4 / logn.layers["counts"].sum(1)).tocsr()
    X.data = np.log1p(X.data)
    logn.layers["logn"] = X.astype(np.float32)
    SCGPT.setup_anndata(logn, layer="logn", is_count_data=False)
    np.testing.assert_allclose(model.get_latent_representation(logn), z, atol=1e-5)


# ---------------------------------------------------------------- official checkpoints
def _distinct_counts(cellbench, n_cells=40, max_genes=300, seed=0):
    """Real cellbench genes, with distinct counts inside each cell so that binning has no ties."""
    rng = np.random.default_rng(seed)
    sub = cellbench[:n_cells].copy()
    X = sub.X.toarray()
    for i in range(n_cells):
        nz = np.flatnonzero(X[i])
        keep = rng.choice(nz, size=min(len(nz), int(rng.integers(20, max_genes))), replace=False)
        X[i] = 0
        X[i, keep] = rng.permutation(len(keep)) + 1
    sub.X = sp.csr_matrix(X)
    return sub


def test_from_pretrained_matches_official_embeddings(official_scgpt, cellbench, tmp_path):
    from scgpt.tasks.cell_emb import get_batch_cell_embeddings

    adata = _distinct_counts(cellbench)
    folder, official, vocab = official_folder(tmp_path / "scGPT_test", list(adata.var_names[::2]))
    # the official pipeline embeds only the genes in the vocabulary
    matched = adata[:, adata.var_names.isin(vocab)].copy()
    expected = get_batch_cell_embeddings(
        matched,
        cell_embedding_mode="cls",
        model=official,
        vocab=vocab,
        max_length=1200,
        batch_size=16,
        model_configs={"pad_token": "<pad>", "pad_value": -2, "embsize": 32},
        gene_ids=np.array([vocab[g] for g in matched.var_names]),
    )
    SCGPT.setup_anndata(adata)
    model = SCGPT.from_pretrained(folder, adata)
    ours = model.get_latent_representation(batch_size=7)
    assert np.abs(ours - expected).max() <= 1e-5


def test_from_pretrained_requires_matching_genes(official_scgpt, cellbench, tmp_path):
    folder, _, _ = official_folder(tmp_path / "scGPT_test", [f"NOTAGENE{i}" for i in range(50)])
    adata = cellbench[:10].copy()
    SCGPT.setup_anndata(adata)
    with pytest.raises(ValueError, match="coverage|matched"):
        SCGPT.from_pretrained(folder, adata)


def test_from_pretrained_save_load(official_scgpt, cellbench, tmp_path):
    adata = cellbench[:30].copy()
    folder, _, _ = official_folder(tmp_path / "scGPT_test", list(adata.var_names))
    SCGPT.setup_anndata(adata)
    model = SCGPT.from_pretrained(folder, adata)
    z = model.get_latent_representation()
    model.save(tmp_path / "saved")
    loaded = SCGPT.load(tmp_path / "saved", adata=adata)
    np.testing.assert_array_equal(loaded.get_latent_representation(), z)


def test_loaded_without_adata_embeds_any_genes(trained, tmp_path):
    adata = trained.adata
    z = trained.get_latent_representation()
    trained.save(tmp_path / "m", overwrite=True)
    loaded = SCGPT.load(tmp_path / "m")  # no AnnData: registry only
    np.testing.assert_array_equal(loaded.get_latent_representation(adata.copy()), z)
    # a copy with fewer genes carries the original's registration id in .uns: set up afresh
    subset = adata[:, adata.var_names[:700]].copy()
    assert loaded.get_latent_representation(subset).shape == z.shape
    assert subset.uns["_scvi_uuid"] != adata.uns["_scvi_uuid"]


def test_backed_anndata_streams_to_the_same_embeddings(cellbench_path, tmp_path):
    import shutil

    path = tmp_path / "cellbench.h5ad"
    shutil.copy(cellbench_path, path)
    in_memory = ad.read_h5ad(path)
    SCGPT.setup_anndata(in_memory)
    torch.manual_seed(0)
    model = SCGPT(in_memory, **{**SMALL, "max_seq_len": 256})
    model.is_trained_ = True
    z = model.get_latent_representation(batch_size=50)
    backed = ad.read_h5ad(path, backed="r")
    SCGPT.setup_anndata(backed)
    np.testing.assert_allclose(model.get_latent_representation(backed, batch_size=33), z, atol=1e-5)
    backed.file.close()
