"""MuData (multi-omics) input for every model class: setup_mudata and the verbs on a MuData."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import scvi
from tiny_models import TINY

import cellformers as cf
from cellformers.model import SCBERT, SCGPT, Geneformer, SCFoundation

md = pytest.importorskip("mudata")

CLASSES = list(TINY)


@pytest.fixture(scope="module")
def citeseq():
    """32 CITE-seq cells of both batches: RNA (the 200 most detected genes) and 14 ADTs."""
    from cellformers.data import fetch_file, is_available

    if not is_available("pbmc_citeseq_2batch"):
        pytest.skip("pbmc_citeseq_2batch.h5mu not found: set CELLFORMERS_DATA")
    full = md.read_h5mu(fetch_file("pbmc_citeseq_2batch"))
    cells = np.r_[0:16, 200:216]
    rna = full["rna"][cells]
    detected = np.asarray((rna.X > 0).mean(0)).ravel()
    rna = rna[:, np.sort(np.argsort(-detected, kind="stable")[:200])].copy()
    mdata = md.MuData({"rna": rna, "prot": full["prot"][cells].copy()})
    mdata.obs["batch"] = rna.obs["batch"].to_numpy()
    return mdata


@pytest.fixture
def mdata(citeseq):
    return citeseq.copy()


def _snapshot(mdata) -> dict:
    """What the user owns in ``mdata`` (registry entries excluded)."""
    user = lambda keys: sorted(k for k in keys if not str(k).startswith("_scvi"))  # noqa: E731
    snap = {"obs": mdata.obs[user(mdata.obs)].copy(), "uns": user(mdata.uns)}
    snap["obsm"] = user(mdata.obsm)
    for name, mod in mdata.mod.items():
        snap[name] = (
            mod.X.copy(),
            mod.obs[user(mod.obs)].copy(),
            mod.var.copy(),
            user(mod.uns),
            sorted(mod.obsm),
            sorted(mod.layers),
        )
    return snap


def _assert_unchanged(before: dict, mdata, *, added=()) -> None:
    after = _snapshot(mdata)
    pd.testing.assert_frame_equal(before["obs"], after["obs"])
    assert after["uns"] == sorted([*before["uns"], *added])
    assert after["obsm"] == sorted([*before["obsm"], *added])
    for name in mdata.mod:
        (X0, obs0, var0, *rest0), (X1, obs1, var1, *rest1) = before[name], after[name]
        assert (sp.csr_matrix(X0) != sp.csr_matrix(X1)).nnz == 0
        pd.testing.assert_frame_equal(obs0, obs1)
        pd.testing.assert_frame_equal(var0, var1)
        assert rest0 == rest1


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_rna_only_mudata_embeds_like_the_rna_modality(mdata, cls):
    before = _snapshot(mdata)
    cls.setup_mudata(mdata, batch_key="batch", modalities={"protein_layer": "prot"})
    scvi.settings.seed = 0
    model = cls(mdata, **TINY[cls])
    model.train(max_epochs=1, batch_size=16, enable_progress_bar=False)
    emb = model.get_latent_representation(batch_size=5)

    rna = mdata["rna"].copy()
    cls.setup_anndata(rna, batch_key="batch")
    single = cls(rna, **TINY[cls])
    single.module.load_state_dict(model.module.state_dict())
    single.is_trained_ = True
    np.testing.assert_array_equal(emb, single.get_latent_representation(batch_size=5))

    cf.tl.embed(mdata, model, batch_size=5)
    key = f"X_{cls.__name__.lower()}"
    np.testing.assert_array_equal(mdata.obsm[key], emb)
    assert mdata.uns[key]["model"] == cls.__name__ and mdata.uns[key]["n_dims"] == emb.shape[1]
    _assert_unchanged(before, mdata, added=[key])

    gene = mdata["rna"].var_names[0]
    out = model.perturb(mdata, genes=[gene], batch_size=4)
    ref = single.perturb(rna, genes=[gene], batch_size=4)
    assert list(out.obs_names) == list(mdata.obs_names)
    np.testing.assert_array_equal(out.X, ref.X)


def test_finetune_predict_and_annotate_on_mudata(mdata):
    # the CITE-seq file has no cell types: the batch stands in for a label here
    SCGPT.setup_mudata(mdata, labels_key="batch", modalities={"protein_layer": "prot"})
    scvi.settings.seed = 0
    model = SCGPT(mdata, **TINY[SCGPT])
    model.train(max_epochs=1, mode="finetune", batch_size=16, enable_progress_bar=False)
    predicted = model.predict_celltype(mdata)
    assert predicted.shape == (mdata.n_obs,)
    assert set(predicted) <= set(mdata.obs["batch"])
    cf.tl.annotate(mdata, model, store_probabilities=True)
    np.testing.assert_array_equal(mdata.obs["cf_celltype"].astype(str), predicted.astype(str))
    assert mdata.obsm["cf_celltype_probabilities"].shape == (mdata.n_obs, 2)


def test_mudata_model_saves_and_loads(mdata, tmp_path):
    SCBERT.setup_mudata(mdata, batch_key="batch", modalities={"protein_layer": "prot"})
    model = SCBERT(mdata, **TINY[SCBERT])
    model.train(max_epochs=1, batch_size=16, enable_progress_bar=False)
    emb = model.get_latent_representation()
    model.save(tmp_path / "model", save_anndata=True)
    loaded = SCBERT.load(tmp_path / "model")
    assert isinstance(loaded.adata, md.MuData)
    assert loaded.registry_["setup_method_name"] == "setup_mudata"
    assert loaded.registry_["setup_args"]["modalities"] == {"protein_layer": "prot"}
    np.testing.assert_array_equal(loaded.get_latent_representation(), emb)
    fresh = mdata.copy()
    again = SCBERT.load(tmp_path / "model", adata=fresh)
    np.testing.assert_array_equal(again.get_latent_representation(fresh), emb)


def test_query_mudata_with_other_genes_is_set_up_with_the_model_arguments(mdata):
    SCGPT.setup_mudata(mdata, batch_key="batch")
    model = SCGPT(mdata, **TINY[SCGPT])
    model.is_trained_ = True
    emb = model.get_latent_representation()
    query = md.MuData({"rna": mdata["rna"][:, ::-1].copy(), "prot": mdata["prot"].copy()})
    query.obs["batch"] = mdata.obs["batch"].to_numpy()
    np.testing.assert_allclose(model.get_latent_representation(query), emb, atol=1e-6)
    with pytest.raises(TypeError, match="set this AnnData up first with `SCGPT.setup_anndata"):
        model.get_latent_representation(mdata["rna"].copy())
    rna = mdata["rna"].copy()
    SCGPT.setup_anndata(rna)
    np.testing.assert_allclose(model.get_latent_representation(rna), emb, atol=1e-6)
    # a model set up with an AnnData reads a MuData once the user has set it up
    rna_model = SCGPT(rna, **TINY[SCGPT])
    rna_model.module.load_state_dict(model.module.state_dict())
    rna_model.is_trained_ = True
    fresh = mdata.copy()
    with pytest.raises(TypeError, match="set this MuData up first with `SCGPT.setup_mudata"):
        rna_model.get_latent_representation(fresh)
    SCGPT.setup_mudata(fresh)
    np.testing.assert_allclose(rna_model.get_latent_representation(fresh), emb, atol=1e-6)


def test_protein_counts_are_registered(mdata):
    Geneformer.setup_mudata(mdata, modalities={"protein_layer": "prot"})
    model = Geneformer(mdata, **TINY[Geneformer])
    proteins = model.adata_manager.get_from_registry("proteins")
    np.testing.assert_array_equal(np.asarray(proteins), np.asarray(mdata["prot"].X))
    assert model.adata_manager.get_from_registry("X").shape == mdata["rna"].shape


def test_setup_mudata_errors(mdata):
    with pytest.raises(
        KeyError, match=r"Modality 'gex' \(for rna_layer\) not found.*'rna', 'prot'"
    ):
        SCGPT.setup_mudata(mdata, modalities={"rna_layer": "gex"})
    with pytest.raises(KeyError, match="Modality 'adt'"):
        SCGPT.setup_mudata(mdata, modalities={"protein_layer": "adt"})
    with pytest.raises(ValueError, match="unknown setup arguments"):
        SCGPT.setup_mudata(mdata, modalities={"protein": "prot"})
    with pytest.raises(ValueError, match="protein_layer='counts' needs its modality"):
        SCGPT.setup_mudata(mdata, protein_layer="counts")
    with pytest.raises(KeyError, match=r"Layer 'counts' not found in mdata.mod\['rna'\]"):
        SCGPT.setup_mudata(mdata, rna_layer="counts")
    with pytest.raises(KeyError, match="'cell_type' not found in mdata.obs"):
        SCGPT.setup_mudata(mdata, labels_key="cell_type")
    with pytest.raises(KeyError, match="'nope' not found in mdata.mod"):
        SCGPT.setup_mudata(mdata, gene_key="nope")
    with pytest.raises(TypeError, match="MuData.*setup_mudata"):
        SCGPT.setup_anndata(mdata)
    with pytest.raises(TypeError, match="Expected a MuData.*setup_anndata"):
        SCGPT.setup_mudata(mdata["rna"])

    scaled = mdata.copy()
    scaled.mod["prot"].X = np.log1p(scaled["prot"].X)
    with pytest.raises(ValueError, match=r"mdata.mod\['prot'\].*non-integer"):
        SCBERT.setup_mudata(scaled, modalities={"protein_layer": "prot"})


def test_misaligned_modalities_are_refused(citeseq):
    rna, prot = citeseq["rna"].copy(), citeseq["prot"].copy()
    shuffled = md.MuData({"rna": rna, "prot": prot[::-1].copy()})
    with pytest.raises(ValueError, match="modality 'prot' are not aligned.*another order"):
        SCFoundation.setup_mudata(shuffled, modalities={"protein_layer": "prot"})
    partial = md.MuData({"rna": rna, "prot": prot[:20].copy()})
    with pytest.raises(ValueError, match="modality 'prot' are not aligned.*12 of the MuData"):
        SCFoundation.setup_mudata(partial, modalities={"protein_layer": "prot"})
    # the RNA modality alone is fine when proteins are not registered... unless it is partial
    partial_rna = md.MuData({"rna": rna[:20].copy(), "prot": prot})
    with pytest.raises(ValueError, match="modality 'rna' are not aligned"):
        SCFoundation.setup_mudata(partial_rna)


def test_embed_copy_key_and_errors(mdata):
    SCGPT.setup_mudata(mdata)
    model = SCGPT(mdata, **TINY[SCGPT])
    model.is_trained_ = True
    before = _snapshot(mdata)
    out = cf.tl.embed(mdata, model, key_added="X_mine", pooling="mean", copy=True)
    _assert_unchanged(before, mdata)  # copy=True leaves the input alone
    np.testing.assert_array_equal(
        out.obsm["X_mine"], model.get_latent_representation(mdata, pooling="mean")
    )
    assert out.uns["X_mine"] == {"model": "SCGPT", "n_dims": 16, "pooling": "mean"}
    with pytest.raises(TypeError, match="AnnData or MuData"):
        cf.tl.embed(mdata["rna"].X, model)
    with pytest.raises(TypeError, match="no get_latent_representation"):
        cf.tl.embed(mdata, object())
    with pytest.raises(ValueError, match="key_added"):
        cf.tl.embed(mdata, model, key_added="")


def test_transfer_labels_between_mudata(mdata):
    SCGPT.setup_mudata(mdata)
    model = SCGPT(mdata, **TINY[SCGPT])
    model.is_trained_ = True
    reference, query = mdata[::2].copy(), mdata[1::2].copy()
    cf.tl.transfer_labels(query, reference, label_key="batch", use_rep="X_scgpt", model=model, k=3)
    np.testing.assert_allclose(
        query.obsm["X_scgpt"], model.get_latent_representation(mdata)[1::2], atol=1e-6
    )
    assert "X_scgpt" in reference.obsm
    assert set(query.obs["transferred_label"]) <= set(mdata.obs["batch"])


def test_evaluate_integration_reads_the_mudata_obsm():
    benchmark = pytest.importorskip("scib_metrics.benchmark")
    from cellformers.data import fetch_file, is_available

    if not is_available("pbmc_citeseq_2batch"):
        pytest.skip("pbmc_citeseq_2batch.h5mu not found: set CELLFORMERS_DATA")
    mdata = md.read_h5mu(fetch_file("pbmc_citeseq_2batch"))  # 400 cells, 2 batches
    prot = np.log1p(np.asarray(mdata["prot"].X))
    mdata.obsm["X_prot"] = prot
    mdata.obsm["X_random"] = np.random.default_rng(0).normal(size=prot.shape)
    cd14 = prot[:, list(mdata["prot"].var_names).index("CD14")]
    mdata.obs["cd14"] = np.where(cd14 > np.median(cd14), "CD14 high", "CD14 low")
    kw = {"batch_key": "batch", "label_key": "cd14", "neighbors": "exact"}
    bio = benchmark.BioConservation(
        isolated_labels=False, nmi_ari_cluster_labels_kmeans=False, clisi_knn=False
    )
    df = cf.tl.evaluate_integration(
        mdata, ["X_prot", "X_random"], bio_conservation=bio, batch_correction=False, **kw
    )
    score = df.set_index(["embedding", "metric"])["value"]
    assert score["X_prot", "Silhouette label"] > score["X_random", "Silhouette label"]
    with pytest.raises(ValueError, match="for a MuData, e.g. a PCA of the RNA modality"):
        cf.tl.evaluate_integration(mdata, "X_prot", bio_conservation=False, **kw)
