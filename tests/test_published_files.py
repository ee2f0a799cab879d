"""Loaders on the real published files: every Geneformer ``config.json`` (sizes checked against the
published checkpoints' byte counts), the V2 dictionaries, scGPT's whole-human ``args.json`` and
``vocab.json``, scFoundation's gene index and scBERT's gene2vec table and panel, each with
random-weight networks on real CellBench cells."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from cellformers.genes import GeneVocab, match_genes, read_gene_dict, read_gene_list
from cellformers.model import SCBERT, SCGPT, Geneformer
from cellformers.module import GeneformerModule, SCBERTModule, SCGPTModule
from cellformers.pretrained import (
    PRETRAINED,
    geneformer_module_kwargs,
    save_geneformer_checkpoint,
)
from cellformers.tokenize import tokenize_scbert

PUBLISHED = Path(__file__).parents[2] / "shared" / "data" / "published"
CONFIGS = PUBLISHED / "geneformer_configs"
pytestmark = pytest.mark.skipif(not PUBLISHED.is_dir(), reason="published files not found")


def _config(name: str) -> dict:
    return json.loads((CONFIGS / f"{name}.config.json").read_text())


def _published_sizes() -> dict[str, int]:
    with (PUBLISHED / "published_checkpoints.tsv").open() as f:
        return {r["file"]: int(r["bytes"]) for r in csv.DictReader(f, delimiter="\t")}


# ------------------------------------------------------------------------ Geneformer
@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.config.json")), ids=lambda p: p.stem)
def test_every_geneformer_config_builds_the_published_network(path):
    """A meta-device network from each real config has exactly the tensors of the published
    ``model.safetensors`` (4 bytes per value plus a small JSON header)."""
    kwargs = geneformer_module_kwargs(json.loads(path.read_text()))
    with torch.device("meta"):
        module = GeneformerModule(**kwargs)
    n_values = sum(p.numel() for p in module.parameters())
    name = path.name.removesuffix(".config.json")
    safetensors = _published_sizes().get(f"{name}/model.safetensors")
    if safetensors is not None:
        assert 0 < safetensors - 4 * n_values < 100_000, name
    if "CellClassifier_cardiomyopathies" in name:
        assert kwargs["n_labels"] == 3 and not kwargs["mlm_head"]
    else:
        assert kwargs["mlm_head"] and kwargs["n_labels"] == 0


def _random_folder(tmp_path, config_name: str, **extra_files) -> Path:
    """A random network built from a real ``config.json``, saved with that config."""
    config = _config(config_name)
    torch.manual_seed(0)
    module = GeneformerModule(**geneformer_module_kwargs(config))
    folder = save_geneformer_checkpoint(module, tmp_path / config_name)
    shutil.copyfile(CONFIGS / f"{config_name}.config.json", folder / "config.json")
    for fname, src in extra_files.items():
        shutil.copyfile(src, folder / fname)
    return folder


def test_v1_10m_from_real_config_embeds_real_cells(tmp_path, cellbench):
    adata = cellbench[:3].copy()
    Geneformer.setup_anndata(adata, gene_key="ensembl_id")
    model = Geneformer.from_pretrained(_random_folder(tmp_path, "Geneformer-V1-10M"), adata)
    assert len(model.vocab) == 25426 and model.module.hidden_size == 256
    emb = model.get_latent_representation()
    assert emb.shape == (3, 256) and np.isfinite(emb).all()
    assert np.abs(emb[0] - emb[1]).max() > 1e-3  # different cells, different embeddings


def test_cardiomyopathy_classifier_config_predicts_its_three_classes(tmp_path, cellbench):
    adata = cellbench[:2].copy()
    Geneformer.setup_anndata(adata, gene_key="ensembl_id")
    folder = _random_folder(tmp_path, "V1-10M_CellClassifier_cardiomyopathies_220224")
    model = Geneformer.from_pretrained(folder, adata)
    probs = model.predict_celltype(soft=True)
    labels = _config("V1-10M_CellClassifier_cardiomyopathies_220224")["id2label"]
    assert probs.shape == (2, 3) and len(labels) == 3
    np.testing.assert_allclose(probs.to_numpy().sum(1), 1.0, atol=1e-5)


def test_v2_dictionaries_tokenize_real_cells(tmp_path, cellbench):
    v2 = PUBLISHED / "geneformer_v2"
    tokens = read_gene_dict(v2 / "token_dictionary_gc104M.pkl")
    assert len(tokens) == _config("Geneformer-V2-104M")["vocab_size"] == 20275
    assert [tokens[t] for t in ("<pad>", "<mask>", "<cls>", "<eos>")] == [0, 1, 2, 3]
    config = {**_config("Geneformer-V2-104M"), "hidden_size": 32, "num_hidden_layers": 1}
    config |= {"num_attention_heads": 2, "intermediate_size": 32}
    torch.manual_seed(0)
    module = GeneformerModule(**geneformer_module_kwargs(config))
    folder = save_geneformer_checkpoint(module, tmp_path / "v2")
    for name in ("token_dictionary_gc104M.pkl", "gene_median_dictionary_gc104M.pkl"):
        shutil.copyfile(v2 / name, folder / name)
    adata = cellbench[:5].copy()
    Geneformer.setup_anndata(adata, gene_key="ensembl_id")
    model = Geneformer.from_pretrained(folder, adata)
    batch = next(iter(model._iter_token_batches(adata, np.arange(5), 5)))[1]
    ids = batch["input_ids"]
    assert (ids[:, 0] == 2).all()  # V2 cells start with <cls>
    assert model.get_latent_representation().shape == (5, 32)


# ------------------------------------------------------------------------ scGPT
def test_scgpt_whole_human_args_and_vocab_embed_real_cells(tmp_path, cellbench):
    """The real ``args.json`` and ``vocab.json`` with a random network of the published size."""
    src = PUBLISHED / "scgpt_human"
    args = json.loads((src / "args.json").read_text())
    vocab = GeneVocab.from_file(src / "vocab.json")
    assert len(vocab) == 60697 and vocab.pad_id == 60694 and vocab["<cls>"] == 60695
    folder = tmp_path / "scGPT_human"
    folder.mkdir()
    for name in ("args.json", "vocab.json"):
        shutil.copyfile(src / name, folder / name)
    torch.manual_seed(0)
    module = SCGPTModule(len(vocab), pad_id=vocab.pad_id)  # the defaults are the published sizes
    assert module.d_model == args["embsize"] and len(module.transformer_encoder.layers) == 12
    torch.save(module.state_dict(), folder / "best_model.pt")
    adata = cellbench[:2].copy()
    SCGPT.setup_anndata(adata)
    model = SCGPT.from_pretrained(folder, adata)
    assert model._token_kwargs["max_seq_len"] == args["max_seq_len"] == 1200
    emb = model.get_latent_representation()
    assert emb.shape == (2, 512) and np.isfinite(emb).all()
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    coverage = match_genes(adata.var_names, vocab, min_coverage=0.0)
    assert coverage.fraction > 0.8


# ------------------------------------------------------------------------ scFoundation
def test_scfoundation_gene_index_covers_real_cells(cellbench):
    genes = read_gene_list(PUBLISHED / "scfoundation" / "OS_scRNA_gene_index.19264.tsv")
    assert len(genes) == 19264 and genes[:2] == ["A1BG", "A1CF"]
    vocab = GeneVocab.from_tokens(genes, specials=(), pad_token=None, cls_token=None)
    # 11,408 of CellBench's 15,073 genes (the rest are mostly pseudogenes and lncRNAs)
    assert match_genes(cellbench.var_names, vocab, min_coverage=0.0).n_matched == 11408
    entry = PRETRAINED["scfoundation"]
    assert entry.arguments["gene_list"] == "OS_scRNA_gene_index.19264.tsv"


# ------------------------------------------------------------------------ scBERT
def test_scbert_real_gene2vec_tells_genes_apart(tmp_path, cellbench):
    src = PUBLISHED / "scbert"
    table = np.load(src / "gene2vec_16906.npy")
    panel = read_gene_list(src / "panglao_gene_order_16906.h5ad")
    assert table.shape == (16906, 200) and len(panel) == 16906
    torch.manual_seed(0)
    module = SCBERTModule(16906, gene2vec=torch.as_tensor(table), depth=1, heads=2, dim_head=8)
    torch.save({"model_state_dict": module.state_dict()}, tmp_path / "panglao_pretrain.pth")

    # one real cell in which two panel genes carry the same count
    adata = cellbench[:1].copy()
    in_panel = set(panel)
    zero = np.asarray(adata.X.toarray()[0] == 0)
    a, b = [g for g, z in zip(adata.var_names, zero, strict=True) if z and g in in_panel][:2]
    X = adata.X.tolil()
    X[0, adata.var_names.get_loc(a)] = 5
    X[0, adata.var_names.get_loc(b)] = 5
    adata.X = X.tocsr()
    SCBERT.setup_anndata(adata)
    model = SCBERT.from_pretrained(
        tmp_path / "panglao_pretrain.pth",
        adata,
        gene_panel=src / "panglao_gene_order_16906.h5ad",
        gene2vec=src / "gene2vec_16906.npy",  # checked against the checkpoint's table
    )
    assert model.get_latent_representation().shape == (1, 200)
    tokens = torch.as_tensor(tokenize_scbert(adata.X, model._gene_panel_ids(adata), n_genes=16906))
    pa, pb = panel.index(a), panel.index(b)
    assert tokens[0, pa] == tokens[0, pb] > 0  # same expression bin
    with torch.no_grad():
        states = model.module.encode(tokens)[0]
        assert (states[pa] - states[pb]).abs().max() > 1e-2  # gene2vec tells them apart
        # without gene identity (every row of the table the same) the two are the same
        model.module.pos_emb.emb.weight[:] = model.module.pos_emb.emb.weight[0]
        states = model.module.encode(tokens)[0]
        assert (states[pa] - states[pb]).abs().max() < 1e-5
    with pytest.raises(ValueError, match="position table"):  # a shuffled panel is caught
        SCBERT.from_pretrained(
            tmp_path / "panglao_pretrain.pth",
            adata,
            gene_panel=panel,
            gene2vec=table[::-1].copy(),
        )
