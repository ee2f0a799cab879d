from __future__ import annotations

import numpy as np
import pytest
import torch

import cellformers as cf
from cellformers.model import SCBERT
from cellformers.module import SCBERTModule
from cellformers.tokenize import tokenize_scbert

TINY = {"dim": 16, "depth": 2, "heads": 2, "dim_head": 8, "classifier_hidden": (32, 16)}
N_PANEL = 300


@pytest.fixture(scope="module")
def data():
    """Real CellBench cells and a panel of 300 of their genes (symbols, shuffled, 10 absent)."""
    adata = cf.data.cellbench_2platform()
    rng = np.random.default_rng(0)
    keep = np.sort(rng.choice(adata.n_obs, 120, replace=False))
    adata = adata[keep].copy()
    symbols = adata.var["gene_symbol"].astype(str).to_numpy()
    detected = np.asarray((adata.X > 0).mean(0)).ravel()
    order = np.argsort(-detected, kind="stable")
    order = order[(symbols[order] != "")]
    unique = list(dict.fromkeys(symbols[order]))
    genes = unique[: N_PANEL - 10] + [f"ABSENT_{i}" for i in range(10)]
    panel = list(rng.permutation(genes))
    return adata, panel


@pytest.fixture
def adata(data):
    a = data[0].copy()
    SCBERT.setup_anndata(a, gene_key="gene_symbol", labels_key="cell_line")
    return a


def _panel_ids(adata, panel):
    where = {g: i for i, g in enumerate(panel)}
    return np.array([where.get(g, -1) for g in adata.var["gene_symbol"].astype(str)])


# ---------------------------------------------------------------- setup and construction
def test_setup_validation(data):
    a = data[0].copy()
    a.X = a.X.astype(np.float32) * 0.5
    with pytest.raises(ValueError, match="non-integer"):
        SCBERT.setup_anndata(a, gene_key="gene_symbol")
    a = data[0].copy()
    with pytest.raises(KeyError, match="nope"):
        SCBERT.setup_anndata(a, labels_key="nope")
    with pytest.raises(KeyError, match="nope"):
        SCBERT.setup_anndata(a, gene_key="nope")
    a.X = a.X.copy()
    a.X.data[0] = -1
    with pytest.raises(ValueError, match="negative"):
        SCBERT.setup_anndata(a)


def test_construction_checks(adata, data, tmp_path):
    _, panel = data
    with pytest.raises(ValueError, match="panel genes"):
        SCBERT(adata, gene_panel=[f"NOT_A_GENE_{i}" for i in range(50)], **TINY)
    with pytest.raises(ValueError, match="min_coverage"):
        SCBERT(adata, gene_panel=[*panel, *[f"X{i}" for i in range(400)]], **TINY)
    with pytest.raises(ValueError, match="duplicate"):
        SCBERT(adata, gene_panel=[*panel, panel[0]], **TINY)
    with pytest.raises(ValueError, match="gene2vec"):
        SCBERT(adata, gene_panel=panel, gene2vec=np.zeros((N_PANEL, 5)), **TINY)
    file = tmp_path / "panel.txt"
    file.write_text("\n".join(panel) + "\n")
    model = SCBERT(adata, gene_panel=file, **TINY)
    assert model.gene_panel == panel and model.module.pos_emb.emb.weight.requires_grad  # learned
    with pytest.raises(FileNotFoundError):
        SCBERT(adata, gene_panel=tmp_path / "missing.txt", **TINY)
    # default panel: the registered genes (unique, non-empty symbols)
    default = SCBERT(adata, **TINY)
    symbols = adata.var["gene_symbol"].astype(str)
    assert default.module.n_genes == symbols[symbols != ""].nunique()
    g2v = np.random.default_rng(0).normal(size=(N_PANEL, TINY["dim"]))
    with_g2v = SCBERT(adata, gene_panel=panel, gene2vec=g2v, **TINY)
    table = with_g2v.module.pos_emb.emb.weight
    assert table.dtype == torch.float64 and table.shape == (N_PANEL + 1, TINY["dim"])


def test_tokens_follow_the_panel(adata, data):
    _, panel = data
    model = SCBERT(adata, gene_panel=panel, **TINY)
    tokens = model._tokenizer(adata)(adata.X)["input_ids"]
    expected = tokenize_scbert(adata.X, _panel_ids(adata, panel), n_genes=N_PANEL)
    np.testing.assert_array_equal(tokens, expected)
    assert tokens.shape == (adata.n_obs, N_PANEL + 1) and (tokens[:, -1] == 0).all()
    assert (tokens > 0).mean() > 0.2  # real expression on the chosen panel


# ---------------------------------------------------------------- embeddings
def test_embeddings_invariant_to_batch_and_order(adata, data):
    _, panel = data
    model = SCBERT(adata, gene_panel=panel, **TINY)
    model.is_trained_ = True  # random weights are enough for invariance
    ref = model.get_latent_representation(batch_size=64)
    assert ref.shape == (adata.n_obs, TINY["dim"]) and ref.dtype == np.float32
    for bs in (1, 7):
        np.testing.assert_array_equal(model.get_latent_representation(batch_size=bs), ref)
    perm = np.random.default_rng(1).permutation(adata.n_obs)
    np.testing.assert_array_equal(model.get_latent_representation(indices=perm), ref[perm])
    # a query AnnData with the genes in another order gives the same embeddings
    query = adata[:, ::-1].copy()
    np.testing.assert_allclose(model.get_latent_representation(query), ref, rtol=0, atol=1e-6)
    for pooling in ("expressed", "last"):
        emb = model.get_latent_representation(pooling=pooling, indices=np.arange(5))
        assert emb.shape == (5, TINY["dim"]) and np.isfinite(emb).all()
    with pytest.raises(ValueError, match="pooling"):
        model.get_latent_representation(pooling="cls")


# ---------------------------------------------------------------- official checkpoints
def test_from_pretrained_official_layout(adata, data, tmp_path):
    _, panel = data
    torch.manual_seed(0)
    g2v = torch.randn(N_PANEL, TINY["dim"], dtype=torch.float64)
    kwargs = {k: v for k, v in TINY.items() if k != "classifier_hidden"}
    module = SCBERTModule(N_PANEL, gene2vec=g2v, **kwargs).eval()
    path = tmp_path / "panglao_pretrain.pth"
    torch.save({"epoch": 3, "model_state_dict": module.state_dict()}, path)

    model = SCBERT.from_pretrained(path, adata, gene_panel=panel, gene2vec=g2v.numpy())
    tokens = torch.as_tensor(tokenize_scbert(adata.X, _panel_ids(adata, panel), n_genes=N_PANEL))
    with torch.no_grad():
        expected = module.encode(tokens)[:, :-1].mean(1).numpy()
    np.testing.assert_allclose(model.get_latent_representation(), expected, rtol=0, atol=1e-5)
    assert model.module.n_labels == 0 and not model.finetuned_

    with pytest.raises(ValueError, match="position table"):
        SCBERT.from_pretrained(path, adata, gene_panel=panel, gene2vec=g2v.numpy()[::-1].copy())
    with pytest.raises(ValueError, match="gene_panel has"):
        SCBERT.from_pretrained(path, adata, gene_panel=panel[:-1])

    # a fine-tuned checkpoint (classifier head over the 3 cell lines) predicts as the module
    clf = SCBERTModule(N_PANEL, gene2vec=g2v, n_labels=3, **TINY).eval()
    path = tmp_path / "finetuned_best.pth"
    torch.save({"model_state_dict": clf.state_dict()}, path)
    model = SCBERT.from_pretrained(path, adata, gene_panel=panel)
    probs = model.predict_celltype(soft=True)
    with torch.no_grad():
        expected = torch.softmax(clf.classify(tokens), -1).numpy()
    np.testing.assert_allclose(probs.to_numpy(), expected, rtol=0, atol=1e-5)
    assert list(probs.columns) == sorted(adata.obs["cell_line"].unique())


# ---------------------------------------------------------------- training and prediction
def test_pretrain_finetune_predict_save_load(adata, data, tmp_path):
    _, panel = data
    torch.manual_seed(0)
    model = SCBERT(adata, gene_panel=panel, **TINY)
    with pytest.raises(ValueError, match="no classification head"):
        model.predict_celltype()
    model.train(max_epochs=1, batch_size=16, train_size=0.9)
    assert np.isfinite(model.history["train_loss"].to_numpy(dtype=float)).all()
    before = {k: v.clone() for k, v in model.module.state_dict().items()}
    model.train(mode="finetune", max_epochs=2, batch_size=16, freeze_layers="official", lr=1e-3)
    assert model.module.n_labels == 3 and model.finetuned_
    # "official" trains only the second-to-last layer (here the first), the final norm and the
    # head (new); the embeddings and the last layer stay as pretrained
    after = model.module.state_dict()
    changed = {k for k in before if k in after and not torch.equal(before[k], after[k])}
    assert "performer.net.layers.0.0.fn.to_q.weight" in changed and "norm.weight" in changed
    assert not {k for k in changed if k.startswith(("token_emb", "performer.net.layers.1."))}
    assert all(p.requires_grad for p in model.module.parameters() if p.dtype != torch.float64)

    hard = model.predict_celltype(batch_size=7)
    soft = model.predict_celltype(soft=True)
    assert set(hard) <= set(adata.obs["cell_line"].unique())
    np.testing.assert_array_equal(hard, soft.columns.to_numpy()[soft.to_numpy().argmax(1)])
    np.testing.assert_allclose(soft.sum(1), 1.0, rtol=1e-5)
    unassigned = model.predict_celltype(unknown_threshold=1.0)
    assert (unassigned == "Unassigned").all()
    np.testing.assert_array_equal(model.predict_celltype(unknown_threshold=0.0), hard)
    low = soft.max(1).to_numpy() < 0.5
    mixed = model.predict_celltype(unknown_threshold=0.5)
    np.testing.assert_array_equal(mixed == "Unassigned", low)
    with pytest.raises(ValueError, match="hard predictions"):
        model.predict_celltype(soft=True, unknown_threshold=0.5)
    with pytest.raises(ValueError, match="masked-expression head"):
        model.train(max_epochs=1)
    with pytest.raises(ValueError, match="freeze_layers"):
        model.train(mode="finetune", max_epochs=1, freeze_layers=5)

    emb = model.get_latent_representation()
    model.save(tmp_path / "model", save_anndata=False)
    loaded = SCBERT.load(tmp_path / "model", adata=adata)
    assert loaded.module.n_labels == 3 and loaded.finetuned_
    np.testing.assert_array_equal(loaded.get_latent_representation(), emb)
    np.testing.assert_array_equal(loaded.predict_celltype(soft=True).to_numpy(), soft.to_numpy())


def test_finetune_needs_labels(data):
    a = data[0].copy()
    SCBERT.setup_anndata(a, gene_key="gene_symbol")
    model = SCBERT(a, gene_panel=data[1], **TINY)
    with pytest.raises(ValueError, match="labels"):
        model.train(mode="finetune", max_epochs=1)


def test_learned_position_table_trains_and_round_trips(data, tmp_path):
    adata = data[0].copy()
    SCBERT.setup_anndata(adata, gene_key="gene_symbol")
    torch.manual_seed(0)
    model = SCBERT(adata, gene_panel=data[1], position_embedding="learned", **TINY)
    table = model.module.pos_emb.emb.weight
    assert table.requires_grad and table.dtype == torch.float32
    before = table.detach().clone()
    model.train(max_epochs=1, batch_size=16, enable_progress_bar=False)
    after = model.module.pos_emb.emb.weight.detach()
    assert not torch.equal(before, after)
    z = model.get_latent_representation()
    model.save(tmp_path / "m", overwrite=True)
    loaded = SCBERT.load(tmp_path / "m", adata=adata)
    np.testing.assert_allclose(loaded.get_latent_representation(), z, atol=1e-6)
    with pytest.raises(ValueError, match="position_embedding"):
        SCBERTModule(n_genes=10, position_embedding="sinusoidal", **TINY)
