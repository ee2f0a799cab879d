from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

import cellformers as cf
from cellformers.genes import read_gene_dict
from cellformers.model import Geneformer

TINY = {
    "hidden_size": 32,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "intermediate_size": 64,
    "hidden_dropout_prob": 0.0,
    "attention_probs_dropout_prob": 0.0,
}


@pytest.fixture(scope="module")
def v1_dicts():
    paths = cf.data.geneformer_v1_dictionaries()
    return read_gene_dict(paths["token_dictionary"]), read_gene_dict(
        paths["gene_median_dictionary"]
    )


@pytest.fixture(scope="module")
def v2_dicts(v1_dicts):
    """A V2-layout dictionary (4 specials, then genes) over the real V1 genes and medians."""
    tokens, medians = v1_dicts
    genes = [t for t in tokens if not t.startswith("<")]
    specials = ["<pad>", "<mask>", "<cls>", "<eos>"]
    return {t: i for i, t in enumerate(specials + genes)}, medians


@pytest.fixture(scope="module")
def cells():
    """Real CellBench cells (Ensembl IDs in var), a subset small enough for quick tests."""
    adata = cf.data.cellbench_2platform()
    rng = np.random.default_rng(0)
    keep = np.sort(rng.choice(adata.n_obs, 60, replace=False))
    return adata[keep].copy()


def _hf_folder(tmp_path, vocab_size, max_pos, seed=0, name="ckpt"):
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=max_pos,
        hidden_act="relu",
        layer_norm_eps=1e-12,
        hidden_dropout_prob=0.02,
        attention_probs_dropout_prob=0.02,
        pad_token_id=0,
    )
    torch.manual_seed(seed)
    model = transformers.BertForMaskedLM(config).eval()
    folder = tmp_path / name
    model.save_pretrained(folder)
    return folder, model


def _reference_tokenize(adata, tokens, medians, *, max_len, cls_id=None, eos_id=None):
    """Rank-value encoding cell by cell (ties by token id, the package's deterministic rule)."""
    genes = adata.var["ensembl_id"].to_numpy()
    X = adata.X.toarray().astype(np.float64)
    n_counts = X.sum(1)
    known = np.array([g in tokens and g in medians for g in genes])
    inv = {v: k for k, v in tokens.items()}
    seqs = []
    for x, total in zip(X, n_counts, strict=True):
        summed: dict[int, float] = {}
        for g, c in zip(genes[known], x[known], strict=True):
            if c > 0:
                summed[tokens[g]] = summed.get(tokens[g], 0.0) + c
        ids = np.array(list(summed), dtype=np.int64)
        med = np.array([medians[inv[t]] for t in ids])
        values = np.array([summed[t] for t in ids]) / total * 10_000 / med
        order = np.lexsort((ids, -values))
        seq = list(ids[order])
        if cls_id is not None:
            seq = [cls_id, *seq[: max_len - 2], eos_id]
        else:
            seq = seq[:max_len]
        seqs.append(seq)
    lengths = np.array([len(q) for q in seqs])
    out = np.zeros((len(seqs), lengths.max()), dtype=np.int64)
    for i, q in enumerate(seqs):
        out[i, : len(q)] = q
    return out, lengths


def _reference_embedding(hf_model, input_ids, lengths, layer, pooling, specials):
    """Official EmbExtractor: right-padded batch, attention mask, hidden_states[N + layer]."""
    n_layers = hf_model.config.num_hidden_layers
    ids = torch.as_tensor(input_ids)
    mask = (torch.arange(ids.shape[1])[None, :] < torch.as_tensor(lengths)[:, None]).long()
    with torch.no_grad():
        hidden = hf_model(ids, attention_mask=mask, output_hidden_states=True).hidden_states[
            n_layers + layer
        ]
    if pooling == "cls":
        return hidden[:, 0].numpy()
    out = []
    for h, n in zip(hidden, lengths, strict=True):
        out.append(h[1 : n - 1].mean(0) if specials else h[:n].mean(0))
    return torch.stack(out).numpy()


# ---------------------------------------------------------------- setup and construction
def test_setup_rejects_non_counts(cells):
    adata = cells.copy()
    adata.X = adata.X.astype(np.float32) * 0.5
    with pytest.raises(ValueError, match="non-integer"):
        Geneformer.setup_anndata(adata, gene_key="ensembl_id")


def test_setup_rejects_bad_n_counts(cells):
    adata = cells.copy()
    adata.obs["n_counts"] = -1.0
    with pytest.raises(ValueError, match="non-negative"):
        Geneformer.setup_anndata(adata, gene_key="ensembl_id", n_counts_key="n_counts")
    with pytest.raises(KeyError, match="nope"):
        Geneformer.setup_anndata(adata, gene_key="ensembl_id", n_counts_key="nope")


def test_low_coverage_is_an_error(cells, v1_dicts):
    adata = cells.copy()
    adata.var_names = [f"NOT_A_GENE_{i}" for i in range(adata.n_vars)]
    Geneformer.setup_anndata(adata)
    with pytest.raises(ValueError, match="coverage|Matched"):
        Geneformer(adata, token_dictionary=v1_dicts[0], gene_medians=v1_dicts[1], **TINY)


def test_setting_up_a_copy_keeps_the_original_registered(cells):
    original = cells.copy()
    Geneformer.setup_anndata(original, gene_key="ensembl_id")
    copy = original.copy()  # carries the original's registration id
    Geneformer.setup_anndata(copy, gene_key="ensembl_id", labels_key="cell_line")
    assert copy.uns["_scvi_uuid"] != original.uns["_scvi_uuid"]
    assert Geneformer(original, max_input_size=32, **TINY).module.n_labels == 0
    assert Geneformer(copy, max_input_size=32, **TINY).module.n_labels == 3


def test_new_model_builds_its_dictionaries(cells):
    adata = cells.copy()
    Geneformer.setup_anndata(adata, gene_key="ensembl_id")
    model = Geneformer(adata, special_tokens=True, max_input_size=64, **TINY)
    vocab = model.vocab
    assert [vocab.tokens[i] for i in range(4)] == ["<pad>", "<mask>", "<cls>", "<eos>"]
    # medians computed from the data: the non-zero median of counts / total * 1e4
    X = adata.X.toarray().astype(np.float64)
    norm = X / X.sum(1, keepdims=True) * 1e4
    j = int(np.argmax((X > 0).sum(0)))
    gene = adata.var["ensembl_id"].iloc[j]
    expected = np.median(norm[:, j][X[:, j] > 0])
    assert model._medians[vocab[gene]] == pytest.approx(expected, rel=1e-12)
    with pytest.raises(RuntimeError, match="untrained"):
        model.get_latent_representation()


# ---------------------------------------------------------------- fidelity
@pytest.mark.parametrize("layer", [-1, 0, -3])
def test_v1_checkpoint_matches_transformers(tmp_path, cells, v1_dicts, layer):
    tokens, medians = v1_dicts
    folder, hf = _hf_folder(tmp_path, len(tokens), 256)
    adata = cells.copy()
    Geneformer.setup_anndata(adata, gene_key="ensembl_id")
    model = Geneformer.from_pretrained(folder, adata, max_input_size=256)  # V1 dicts from registry
    ours = model.get_latent_representation(layer=layer, batch_size=7)
    ids, lengths = _reference_tokenize(adata, tokens, medians, max_len=256)
    ref = _reference_embedding(hf, ids, lengths, layer, "mean", specials=False)
    np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_v2_checkpoint_matches_transformers(tmp_path, cells, v2_dicts, pooling):
    tokens, medians = v2_dicts
    folder, hf = _hf_folder(tmp_path, len(tokens), 300, seed=1)
    adata = cells.copy()
    Geneformer.setup_anndata(adata, gene_key="ensembl_id")
    model = Geneformer.from_pretrained(
        folder, adata, token_dictionary=tokens, gene_medians=medians, max_input_size=300
    )
    ours = model.get_latent_representation(pooling=pooling, layer=0, batch_size=16)
    ids, lengths = _reference_tokenize(adata, tokens, medians, max_len=300, cls_id=2, eos_id=3)
    ref = _reference_embedding(hf, ids, lengths, 0, pooling, specials=True)
    np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=0)


def test_v2_default_pooling_is_cls(tmp_path, cells, v2_dicts):
    tokens, medians = v2_dicts
    folder, _ = _hf_folder(tmp_path, len(tokens), 128)
    adata = cells.copy()
    Geneformer.setup_anndata(adata, gene_key="ensembl_id")
    model = Geneformer.from_pretrained(folder, adata, token_dictionary=tokens, gene_medians=medians)
    np.testing.assert_array_equal(
        model.get_latent_representation(), model.get_latent_representation(pooling="cls")
    )


def test_from_pretrained_rejects_mismatched_dictionary(tmp_path, cells, v2_dicts):
    tokens, medians = v2_dicts
    folder, _ = _hf_folder(tmp_path, len(tokens) + 5, 64)
    adata = cells.copy()
    Geneformer.setup_anndata(adata, gene_key="ensembl_id")
    with pytest.raises(ValueError, match="do not belong together"):
        Geneformer.from_pretrained(folder, adata, token_dictionary=tokens, gene_medians=medians)
    with pytest.raises(ValueError, match="token_dictionary"):
        Geneformer.from_pretrained(folder, adata)  # not a V1 vocabulary: dictionaries needed


# ---------------------------------------------------------------- invariance, I/O
@pytest.fixture(scope="module")
def v1_model(tmp_path_factory, cells):
    folder, _ = _hf_folder(tmp_path_factory.mktemp("v1"), 25_426, 256)
    adata = cells.copy()
    Geneformer.setup_anndata(adata, gene_key="ensembl_id", labels_key="cell_line")
    return Geneformer.from_pretrained(folder, adata, max_input_size=256)


def test_embeddings_do_not_depend_on_batching_or_gene_order(v1_model):
    adata = v1_model.adata
    full = v1_model.get_latent_representation(batch_size=64)
    for bs in (1, 5):
        np.testing.assert_allclose(
            v1_model.get_latent_representation(batch_size=bs), full, atol=1e-5
        )
    subset = v1_model.get_latent_representation(indices=[7, 3, 50])
    np.testing.assert_allclose(subset, full[[7, 3, 50]], atol=1e-5)
    perm = np.random.default_rng(1).permutation(adata.n_vars)
    query = adata[:, perm].copy()
    np.testing.assert_allclose(v1_model.get_latent_representation(query), full, atol=1e-5)


def test_n_counts_key_is_used(v1_model):
    adata = v1_model.adata
    full = v1_model.get_latent_representation()
    # drop half the genes: with the true totals the ranks of the kept genes are unchanged
    sub = adata[:, ::2].copy()
    sub.obs["n_counts"] = np.asarray(adata.X.sum(1)).ravel()
    Geneformer.setup_anndata(sub, gene_key="ensembl_id", n_counts_key="n_counts")
    sub_emb = v1_model.get_latent_representation(sub)
    assert np.isfinite(sub_emb).all()
    assert not np.allclose(sub_emb, full, atol=1e-3)  # fewer genes, other sequences


def test_empty_cells_are_reported(v1_model):
    adata = v1_model.adata.copy()
    X = adata.X.toarray()
    X[5] = 0
    adata.X = sp.csr_matrix(X)
    with pytest.raises(ValueError, match="1 cell.*no counts in the genes Geneformer reads"):
        v1_model.get_latent_representation(adata)
    emb = v1_model.get_latent_representation(adata, indices=np.arange(adata.n_obs) != 5)
    assert emb.shape[0] == adata.n_obs - 1


def test_save_load_round_trip(tmp_path, v1_model):
    expected = v1_model.get_latent_representation()
    v1_model.save(tmp_path / "model", overwrite=True)
    loaded = Geneformer.load(tmp_path / "model", adata=v1_model.adata)
    np.testing.assert_array_equal(loaded.get_latent_representation(), expected)
    assert loaded.vocab == v1_model.vocab
    # without AnnData, applied to a query with its own setup
    query = v1_model.adata[:10].copy()
    loaded = Geneformer.load(tmp_path / "model", adata=query)
    np.testing.assert_allclose(loaded.get_latent_representation(query), expected[:10], atol=1e-6)


def test_save_pretrained_round_trip(tmp_path, v1_model):
    transformers = pytest.importorskip("transformers")
    folder = v1_model.save_pretrained(tmp_path / "export")
    expected = v1_model.get_latent_representation()
    reloaded = Geneformer.from_pretrained(folder, v1_model.adata, max_input_size=256)
    np.testing.assert_array_equal(reloaded.get_latent_representation(), expected)
    hf = transformers.BertForSequenceClassification.from_pretrained(folder).eval()
    assert hf.config.id2label[0] == v1_model.adata.obs["cell_line"].cat.categories[0]
    ids, lengths = _reference_tokenize(
        v1_model.adata,
        *(
            read_gene_dict(folder / f)
            for f in ("token_dictionary.json", "gene_median_dictionary.json")
        ),
        max_len=256,
    )
    np.testing.assert_allclose(
        _reference_embedding(hf, ids, lengths, -1, "mean", specials=False), expected, atol=1e-5
    )


def test_bad_arguments(v1_model):
    with pytest.raises(ValueError, match="layer"):
        v1_model.get_latent_representation(layer=1)
    with pytest.raises(ValueError, match="<cls>"):
        v1_model.get_latent_representation(pooling="cls")
    with pytest.raises(ValueError, match="mode"):
        v1_model.train(mode="supervised")
    with pytest.raises(ValueError, match="freeze_layers"):
        v1_model.train(mode="finetune", freeze_layers=9)
    with pytest.raises(ValueError, match="token dictionary"):
        v1_model.perturb(genes=["NOT_A_GENE"])
    with pytest.raises(ValueError, match="mode"):
        v1_model.perturb(genes=["ENSG00000075624"], mode="explode")


# ---------------------------------------------------------------- training
def test_pretrain_and_finetune(cells):
    adata = cells.copy()
    Geneformer.setup_anndata(adata, gene_key="ensembl_id", labels_key="cell_line")
    torch.manual_seed(0)
    model = Geneformer(adata, max_input_size=64, **TINY)
    model.train(max_epochs=2, batch_size=16, check_val_every_n_epoch=1)
    assert np.isfinite(model.history["train_loss"].to_numpy(dtype=float)).all()
    assert "mlm_accuracy_train" in model.history
    before = {k: v.clone() for k, v in model.module.state_dict().items()}
    frozen = "encoder.layers.0."
    model.train(mode="finetune", max_epochs=2, batch_size=16, freeze_layers=1, lr=1e-3)
    after = model.module.state_dict()
    changed = [k for k in after if not torch.equal(after[k], before[k])]
    assert not [k for k in changed if k.startswith(frozen)]
    assert [k for k in changed if k.startswith("encoder.layers.2.")]
    assert all(p.requires_grad for p in model.module.parameters())  # freezing is undone
    pred = model.predict_celltype()
    assert set(pred) <= set(adata.obs["cell_line"].cat.categories)
    soft = model.predict_celltype(soft=True, batch_size=5)
    np.testing.assert_allclose(soft.to_numpy().sum(1), 1.0, atol=1e-5)
    assert list(soft.columns) == list(adata.obs["cell_line"].cat.categories)
    np.testing.assert_array_equal(
        soft.to_numpy().argmax(1), pd.Categorical(pred, categories=soft.columns).codes
    )


def test_finetune_needs_labels(cells):
    adata = cells.copy()
    Geneformer.setup_anndata(adata, gene_key="ensembl_id")
    model = Geneformer(adata, max_input_size=32, **TINY)
    with pytest.raises(ValueError, match="labels_key"):
        model.train(mode="finetune", max_epochs=1)
    with pytest.raises(ValueError, match="no classification head"):
        model.predict_celltype()


# ---------------------------------------------------------------- perturbation
@pytest.fixture(scope="module")
def pretrained_small(cells):
    """A small Geneformer pretrained from scratch on real cells (masked-gene objective)."""
    adata = cells.copy()
    Geneformer.setup_anndata(adata, gene_key="ensembl_id", labels_key="cell_line")
    torch.manual_seed(0)
    model = Geneformer(adata, max_input_size=128, **TINY)
    model.train(max_epochs=3, batch_size=12)
    return model


def _top_and_bottom_genes(model, adata, cell):
    tok = model._tokenizer(adata)(sp.csr_matrix(adata.X[cell]))
    ids = tok["input_ids"][0, : tok["lengths"][0]]
    return [model.vocab.tokens[i] for i in ids]


def _with_counts(adata, X, totals):
    out = adata.copy()
    out.obs["n_counts"] = totals
    out.X = sp.csr_matrix(X)
    Geneformer.setup_anndata(out, gene_key="ensembl_id", n_counts_key="n_counts")
    return out


def test_perturb_delete_matches_editing_the_counts(pretrained_small):
    model = pretrained_small
    adata = model.adata
    ranked = _top_and_bottom_genes(model, adata, 0)
    # the cell reduced to the genes it is tokenized with, so that removing counts removes tokens
    in_seq = adata.var["ensembl_id"].isin(ranked).to_numpy()
    totals = np.asarray(adata[[0]].X.sum(1)).ravel()  # the cell's true total counts
    base = _with_counts(adata[[0]], adata[[0]].X.toarray() * in_seq, totals)
    np.testing.assert_allclose(
        model.get_latent_representation(base),
        model.get_latent_representation(indices=[0]),
        atol=1e-5,
    )
    genes = [ranked[0], ranked[len(ranked) // 2], ranked[-1]]
    absent = next(g for g in model.vocab.tokens[2:5000] if g not in set(ranked))
    out = model.perturb(base, genes=[*genes, absent], mode="delete")
    assert out.shape == (1, 4)
    assert out.layers["expressed"][0, :3].all() and not out.layers["expressed"][0, 3]
    assert out.X[0, 3] == 0  # deleting a gene the cell lacks changes nothing
    a = model.get_latent_representation(base)[0]
    for j, gene in enumerate(genes):
        X = base.X.toarray()
        X[:, (base.var["ensembl_id"] == gene).to_numpy()] = 0
        b = model.get_latent_representation(_with_counts(base, X, totals))[0]
        shift = 1 - a @ b / np.linalg.norm(a) / np.linalg.norm(b)
        assert out.X[0, j] == pytest.approx(shift, abs=1e-5)


def test_deleting_top_genes_moves_cells_more(pretrained_small):
    model = pretrained_small
    adata = model.adata
    top, bottom = [], []
    for cell in range(adata.n_obs):
        ranked = _top_and_bottom_genes(model, adata, cell)
        out = model.perturb(genes=[ranked[0], ranked[-1]], indices=[cell], batch_size=4)
        top.append(out.X[0, 0])
        bottom.append(out.X[0, 1])
    assert np.mean(top) > np.mean(bottom)


def test_perturb_modes_and_states(pretrained_small):
    model = pretrained_small
    adata = model.adata
    genes = list(adata.var["ensembl_id"][np.asarray((adata.X > 0).sum(0)).ravel().argsort()[-3:]])
    for mode in ("overexpress", "activate", "inhibit"):
        out = model.perturb(genes=genes, mode=mode, indices=np.arange(8))
        assert out.shape == (8, 3)
        assert np.isfinite(out.X).all() and (out.X >= -1e-6).all()
        assert out.uns["perturb"]["mode"] == mode
    states = {"state_key": "cell_line", "start_state": "H1975", "goal_state": "H2228"}
    out = model.perturb(genes=genes, cell_states=states, batch_size=4)
    assert (out.obs["cell_line"] == "H1975").all()
    assert out.n_obs == int((adata.obs["cell_line"] == "H1975").sum())
    assert "shift_to_H2228" in out.layers and "mean_shift_to_goal" in out.var
    # batch size does not change the result
    again = model.perturb(genes=genes, cell_states=states, batch_size=32)
    np.testing.assert_allclose(
        again.layers["shift_to_H2228"], out.layers["shift_to_H2228"], atol=1e-5
    )
    with pytest.raises(ValueError, match="No cells of state"):
        model.perturb(genes=genes, cell_states={**states, "goal_state": "nope"})
