"""scGPT integration recipe: batch parts, DSBN, DAB, ECS, checkpoints, query mapping."""

from __future__ import annotations

from contextlib import contextmanager

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from official_scgpt import checkpoint_layout, official_args, with_specials, write_folder

from cellformers.model import SCGPT
from cellformers.module import SCGPTModule
from cellformers.nn import (
    AdversarialDiscriminator,
    DomainSpecificBatchNorm1d,
    elastic_cell_similarity,
    grad_reverse,
)
from cellformers.pretrained import (
    load_scgpt_state_dict,
    normalize_scgpt_state_dict,
    read_scgpt_checkpoint,
)

pytestmark = pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")

N_GENES = 97  # + <pad>, <cls>, <eoc>
N_BATCH = 3
ARGS = official_args(d_model=32, nhead=4, d_hid=48, nlayers=2)


@contextmanager
def no_mha_fastpath():
    prev = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(prev)


def _official(vocab, *, explicit_zero_prob=False, seed=0, n_batch=N_BATCH, args=ARGS):
    """The official model as the integration recipe builds it, every weight and statistic random."""
    from scgpt.model import TransformerModel

    torch.manual_seed(seed)
    model = TransformerModel(
        ntoken=len(vocab),
        d_model=args["embsize"],
        nhead=args["nheads"],
        d_hid=args["d_hid"],
        nlayers=args["nlayers"],
        nlayers_cls=3,
        n_cls=1,
        vocab=vocab,
        dropout=args["dropout"],
        pad_token="<pad>",
        pad_value=args["pad_value"],
        do_mvc=True,
        do_dab=True,
        use_batch_labels=True,
        num_batch_labels=n_batch,
        domain_spec_batchnorm=True,
        explicit_zero_prob=explicit_zero_prob,
        use_fast_transformer=False,
        ecs_threshold=0.8,
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * 0.2)
            if "norm" in name and name.endswith("weight"):
                p.add_(1.0)
        for bn in model.dsbn.bns:
            bn.running_mean.copy_(torch.randn_like(bn.running_mean) * 0.5)
            bn.running_var.copy_(torch.rand_like(bn.running_var) * 1.5 + 0.5)
            bn.num_batches_tracked.fill_(7)
    return model.eval()


@pytest.fixture(scope="module")
def vocab():
    return with_specials([f"GENE{i}" for i in range(N_GENES)])


@pytest.fixture(scope="module")
def official(official_scgpt, vocab):
    return _official(vocab)


def _ours_from(official_model, **kwargs):
    vocab = with_specials([f"GENE{i}" for i in range(N_GENES)])
    sd = official_model.state_dict()
    sd = {k: v for k, v in sd.items() if not k.startswith("cls_decoder.")}
    sd = normalize_scgpt_state_dict(sd)
    ours = SCGPTModule(
        len(vocab),
        pad_id=vocab["<pad>"],
        d_model=ARGS["embsize"],
        nhead=ARGS["nheads"],
        d_hid=ARGS["d_hid"],
        nlayers=ARGS["nlayers"],
        n_batch=N_BATCH,
        use_batch_labels=True,
        domain_spec_batchnorm=True,
        do_dab=True,
        **kwargs,
    )
    load_scgpt_state_dict(ours, sd)
    return ours.eval()


def _batch(vocab, lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    L = max(lengths)
    genes = torch.full((len(lengths), L), vocab["<pad>"], dtype=torch.long)
    values = torch.full((len(lengths), L), float(ARGS["pad_value"]))
    for i, n in enumerate(lengths):
        genes[i, 0] = vocab["<cls>"]
        genes[i, 1:n] = torch.randperm(N_GENES, generator=g)[: n - 1]
        values[i, 1:n] = torch.randint(1, 51, (n - 1,), generator=g).float()
    return genes, values


def _max_diff(a, b, keep=None):
    if keep is not None:
        a, b = a[keep], b[keep]
    return (a - b).abs().max().item()


# ---------------------------------------------------------------- parity with the official model
@pytest.mark.parametrize("label", range(N_BATCH))
def test_forward_parity_one_batch_label(official, vocab, label):
    ours = _ours_from(official, ecs_threshold=0.8)
    genes, values = _batch(vocab, [30, 12, 25, 30], seed=label)
    pad = genes.eq(vocab["<pad>"])
    labels = torch.full((genes.shape[0],), label)
    with torch.no_grad(), no_mha_fastpath():
        expected = official(
            genes, values, src_key_padding_mask=pad, batch_labels=labels, MVC=True, ECS=True
        )
        inf = ours.inference(genes, values, batch_labels=labels, mask=False)
        gen = ours.generative(inf["hidden"], inf["cell_emb"], inf["gene_embs"], labels)
        cls = ours.cell_embedding(genes, values, batch_labels=labels)
    assert _max_diff(gen["mlm_pred"], expected["mlm_output"], ~pad) <= 1e-5
    assert _max_diff(gen["mvc_pred"], expected["mvc_output"]) <= 1e-5
    assert _max_diff(inf["cell_emb"], expected["cell_emb"]) <= 1e-5
    assert _max_diff(cls, expected["cell_emb"]) <= 1e-5
    assert _max_diff(gen["dab_logits"], expected["dab_output"]) <= 1e-5
    ecs = elastic_cell_similarity(inf["cell_emb"], 0.8)
    assert abs(ecs.item() - expected["loss_ecs"].item()) <= 1e-6
    assert expected["cell_emb"].abs().max() > 0.1


def test_mixed_labels_equal_official_per_label(official, vocab):
    """A minibatch with several batch labels: each cell as the official model with its label."""
    ours = _ours_from(official)
    genes, values = _batch(vocab, [20, 31, 9, 31, 15, 26], seed=7)
    labels = torch.tensor([2, 0, 1, 1, 0, 2])
    with torch.no_grad(), no_mha_fastpath():
        got = ours.cell_embedding(genes, values, batch_labels=labels)
        for i in range(len(labels)):
            g, v = genes[i : i + 1], values[i : i + 1]
            exp = official(g, v, g.eq(vocab["<pad>"]), batch_labels=labels[i : i + 1])
            assert _max_diff(got[i : i + 1], exp["cell_emb"]) <= 1e-5


def test_explicit_zero_prob_parity(official_scgpt, vocab):
    from scgpt.loss import criterion_neg_log_bernoulli

    official = _official(vocab, explicit_zero_prob=True, seed=3)
    ours = _ours_from(official, explicit_zero_prob=True)
    genes, values = _batch(vocab, [22, 22, 14], seed=3)
    pad = genes.eq(vocab["<pad>"])
    labels = torch.ones(3, dtype=torch.long)
    with torch.no_grad(), no_mha_fastpath():
        expected = official(genes, values, pad, batch_labels=labels, MVC=True)
        inf = ours.inference(genes, values, batch_labels=labels, mask=False)
        gen = ours.generative(inf["hidden"], inf["cell_emb"], inf["gene_embs"], labels)
    mlm_p = torch.sigmoid(gen["mlm_zero_logits"])
    mvc_p = torch.sigmoid(gen["mvc_zero_logits"])
    assert _max_diff(mlm_p, expected["mlm_zero_probs"], ~pad) <= 1e-5
    assert _max_diff(mvc_p, expected["mvc_zero_probs"]) <= 1e-5
    # the loss's Bernoulli term against the official criterion
    target = values.clone()
    target[:, 5:9] = 0.0
    mask = torch.zeros_like(pad)
    mask[:, 1:12] = True
    from cellformers.module._scgpt import _masked_bernoulli_nll

    ours_nll, _ = _masked_bernoulli_nll(gen["mlm_zero_logits"], target, mask)
    ref = criterion_neg_log_bernoulli(expected["mlm_zero_probs"], target, mask)
    assert abs(ours_nll.item() - ref.item()) <= 1e-5


def test_checkpoint_folder_infers_integration_options(tmp_path, official, vocab):
    genes_only = {g: i for g, i in vocab.items() if not g.startswith("<")}
    state = checkpoint_layout(official.state_dict(), "flash")
    folder = write_folder(tmp_path / "integ", state, {**ARGS, "ecs_thres": 0.8}, genes_only)
    ckpt = read_scgpt_checkpoint(folder)
    assert ckpt.config["n_batch"] == N_BATCH
    assert ckpt.config["use_batch_labels"] and ckpt.config["domain_spec_batchnorm"]
    assert ckpt.config["do_dab"] and not ckpt.config["explicit_zero_prob"]
    assert ckpt.config["ecs_threshold"] == 0.8
    module = SCGPTModule(**ckpt.module_kwargs())
    load_scgpt_state_dict(module, ckpt.state_dict)  # strict
    assert module.decoder.fc[0].weight.shape == (32, 64)
    assert module.mvc_decoder.W.weight.shape == (64, 32)
    assert set(module.state_dict()) == set(ckpt.state_dict)
    # the official keys and shapes
    sd = module.state_dict()
    assert sd["batch_encoder.embedding.weight"].shape == (N_BATCH, 32)
    assert sd["batch_encoder.enc_norm.weight"].shape == (32,)
    assert {k for k in sd if k.startswith("dsbn.")} == {
        f"dsbn.bns.{k}.{n}"
        for k in range(N_BATCH)
        for n in ("running_mean", "running_var", "num_batches_tracked")
    }
    assert {k for k in sd if k.startswith("grad_reverse_discriminator.")} == {
        f"grad_reverse_discriminator.{m}.{n}"
        for m in ("_decoder.0", "_decoder.2", "_decoder.3", "_decoder.5", "out_layer")
        for n in ("weight", "bias")
    }
    assert sd["grad_reverse_discriminator.out_layer.weight"].shape == (N_BATCH, 32)


def test_loading_errors_are_explained(official, vocab):
    sd = normalize_scgpt_state_dict(
        {k: v for k, v in official.state_dict().items() if not k.startswith("cls_decoder.")}
    )
    kwargs = {"pad_id": vocab["<pad>"], "d_model": 32, "nhead": 4, "d_hid": 48, "nlayers": 2}
    plain = SCGPTModule(len(vocab), **kwargs)
    with pytest.raises(RuntimeError, match="use_batch_labels=True") as err:
        load_scgpt_state_dict(plain, sd)
    assert "domain_spec_batchnorm=True" in str(err.value) and "do_dab=True" in str(err.value)
    options = {"use_batch_labels": True, "domain_spec_batchnorm": True, "do_dab": True}
    wrong_n = SCGPTModule(len(vocab), **kwargs, n_batch=5, **options)
    with pytest.raises(RuntimeError, match="n_batch differs"):
        load_scgpt_state_dict(wrong_n, sd)


def test_integration_finetuning_starts_from_a_plain_checkpoint(official_scgpt, vocab):
    """The recipe: pretrained backbone, fresh batch parts and 2d-input decoders."""
    from official_scgpt import official_model

    plain = official_model(vocab, ARGS, randomize=True)
    sd = normalize_scgpt_state_dict(
        {k: v for k, v in plain.state_dict().items() if not k.startswith("cls_decoder.")}
    )
    kwargs = {"pad_id": vocab["<pad>"], "d_model": 32, "nhead": 4, "d_hid": 48, "nlayers": 2}
    options = {"use_batch_labels": True, "domain_spec_batchnorm": True, "do_dab": True}
    module = SCGPTModule(len(vocab), **kwargs, n_batch=2, **options)
    with pytest.raises(RuntimeError, match="init_batch_modules=True"):
        load_scgpt_state_dict(module, sd)
    load_scgpt_state_dict(module, sd, init_batch_modules=True)
    got = module.state_dict()
    for key, value in sd.items():
        if key in ("decoder.fc.0.weight", "mvc_decoder.W.weight"):
            assert got[key].shape != value.shape
        else:
            torch.testing.assert_close(got[key], value, rtol=0, atol=0)
    # everything else must still match
    bad = dict(sd)
    bad.pop("transformer_encoder.layers.0.linear1.bias")
    with pytest.raises(RuntimeError, match="missing keys"):
        load_scgpt_state_dict(module, bad, init_batch_modules=True)


# ---------------------------------------------------------------- the parts
def test_dsbn_training_matches_batchnorm_for_one_domain():
    torch.manual_seed(0)
    x = torch.randn(4, 7, 6) * 3 + 1
    dsbn = DomainSpecificBatchNorm1d(6, 3).train()
    bn = torch.nn.BatchNorm1d(6, eps=6.1e-5, affine=False).train()
    out = dsbn(x, torch.full((4,), 1))
    ref = bn(x.permute(0, 2, 1)).permute(0, 2, 1)
    assert _max_diff(out, ref) <= 1e-5
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(dsbn.bns[1], name), getattr(bn, name))
    assert dsbn.bns[0].num_batches_tracked == 0 and dsbn.bns[2].num_batches_tracked == 0
    # padding tokens do not count; frozen domains use and keep their running statistics
    mask = torch.ones(4, 7, dtype=torch.bool)
    mask[:, 5:] = False
    dsbn2 = DomainSpecificBatchNorm1d(6, 3).train()
    out2 = dsbn2(x, torch.tensor([0, 0, 2, 2]), mask)
    for k, rows in ((0, [0, 1]), (2, [2, 3])):
        ref = torch.nn.BatchNorm1d(6, eps=6.1e-5, affine=False).train()
        expected = ref(x[rows, :5].permute(0, 2, 1)).permute(0, 2, 1)
        assert _max_diff(out2[rows, :5], expected) <= 1e-5
        torch.testing.assert_close(dsbn2.bns[k].running_var, ref.running_var)
    dsbn2.freeze_domains([0])
    before = dsbn2.bns[0].running_mean.clone()
    out3 = dsbn2(x, torch.tensor([0, 0, 2, 2]), mask)
    assert torch.equal(dsbn2.bns[0].running_mean, before)
    dsbn2.eval()
    assert _max_diff(out3[:2], dsbn2(x[:2], torch.tensor([0, 0]))) == 0


def test_gradient_reversal_and_discriminator():
    x = torch.randn(5, 8, requires_grad=True)
    (grad_reverse(x, 0.5) * 3).sum().backward()
    torch.testing.assert_close(x.grad, torch.full_like(x, -1.5))
    torch.manual_seed(0)
    disc = AdversarialDiscriminator(8, 4)
    plain = AdversarialDiscriminator(8, 4, reverse_grad=False)
    plain.load_state_dict(disc.state_dict())
    assert sorted(disc.state_dict()) == sorted(
        f"{m}.{n}"
        for m in ("_decoder.0", "_decoder.2", "_decoder.3", "_decoder.5", "out_layer")
        for n in ("weight", "bias")
    )
    a = x.detach().clone().requires_grad_(True)
    b = x.detach().clone().requires_grad_(True)
    target = torch.tensor([0, 1, 2, 3, 0])
    F.cross_entropy(disc(a), target).backward()
    F.cross_entropy(plain(b), target).backward()
    torch.testing.assert_close(a.grad, -b.grad)
    torch.testing.assert_close(disc.out_layer.weight.grad, plain.out_layer.weight.grad)


def test_ecs_formula():
    torch.manual_seed(0)
    emb = torch.randn(9, 16)
    # a direct transcription of the official lines
    normed = emb / emb.norm(dim=1, keepdim=True)
    cos = normed @ normed.t()
    cos = cos.masked_fill(torch.eye(9, dtype=torch.bool), 0.0).clamp_min(0.0)
    expected = (1 - (cos - 0.3) ** 2).mean()
    torch.testing.assert_close(elastic_cell_similarity(emb, 0.3), expected)


def test_loss_adds_ecs_and_dab(official, vocab):
    ours = _ours_from(official, ecs_threshold=0.6, ecs_weight=10.0, dab_weight=0.7)
    genes, values = _batch(vocab, [30, 14, 22, 9], seed=2)
    labels = torch.tensor([0, 2, 2, 1])
    torch.manual_seed(0)
    inf, gen, out = ours({"genes": genes, "values": values, "batch": labels[:, None]})
    m = inf["mask"]
    mlm = ((gen["mlm_pred"] - inf["target"]) * m).pow(2).sum() / m.sum()
    mvc = ((gen["mvc_pred"] - inf["target"]) * m).pow(2).sum() / m.sum()
    ecs = elastic_cell_similarity(inf["cell_emb"], 0.6)
    dab = F.cross_entropy(gen["dab_logits"], labels)
    torch.testing.assert_close(out.loss, mlm + mvc + 10 * ecs + 0.7 * dab)
    assert set(out.extra_metrics) == {"mlm_mse", "mvc_mse", "ecs", "dab_ce", "dab_accuracy"}
    with pytest.raises(ValueError, match="batch_labels"):
        ours({"genes": genes, "values": values})
    with pytest.raises(ValueError, match=r"Batch labels must be in \[0, 3\)"):
        ours({"genes": genes, "values": values, "batch": torch.tensor([0, 1, 3, 0])})


def test_only_new_batches_train(official, vocab):
    ours = _ours_from(official)
    ours.train()
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    ours.train_only_new_batches(2)
    trainable = [n for n, p in ours.named_parameters() if p.requires_grad]
    assert trainable == [
        "batch_encoder.embedding.weight",
        "grad_reverse_discriminator.out_layer.weight",
        "grad_reverse_discriminator.out_layer.bias",
    ]
    opt = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], 1e-2, weight_decay=0)
    genes, values = _batch(vocab, [30, 14, 22, 9], seed=2)
    labels = torch.tensor([0, 2, 2, 1])
    for _ in range(3):
        _, _, out = ours({"genes": genes, "values": values, "batch": labels})
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    after = ours.state_dict()
    for key, value in before.items():
        if key.startswith("dsbn.bns.2."):
            continue
        if key in ("batch_encoder.embedding.weight", "grad_reverse_discriminator.out_layer.weight"):
            assert torch.equal(after[key][:2], value[:2]) and not torch.equal(
                after[key][2], value[2]
            )
        elif key == "grad_reverse_discriminator.out_layer.bias":
            assert torch.equal(after[key][:2], value[:2]) and after[key][2] != value[2]
        else:
            assert torch.equal(after[key], value), key
    assert after["dsbn.bns.2.num_batches_tracked"] == before["dsbn.bns.2.num_batches_tracked"] + 3


def test_batch_options_need_n_batch():
    with pytest.raises(ValueError, match="n_batch"):
        SCGPTModule(10, pad_id=0, d_model=8, nhead=2, d_hid=8, nlayers=1, use_batch_labels=True)
    np.testing.assert_equal(
        SCGPTModule(10, pad_id=0, d_model=8, nhead=2, d_hid=8, nlayers=1, n_batch=4).n_batch, 0
    )


# ---------------------------------------------------------------- the model class on CellBench
SMALL = {"d_model": 32, "nhead": 4, "d_hid": 32, "nlayers": 2, "dropout": 0.0, "max_seq_len": 64}
INTEGRATION = {"use_batch_labels": True, "domain_spec_batchnorm": True, "do_dab": True}


def _cellbench_subset(cellbench_path, n_per_platform=60, n_genes=200, seed=0):
    """Cells of both platforms (platform as batch) on the most often detected genes."""
    full = ad.read_h5ad(cellbench_path)
    rng = np.random.default_rng(seed)
    cells = np.concatenate(
        [
            rng.choice(np.flatnonzero(full.obs["platform"] == p), n_per_platform, replace=False)
            for p in ("CEL-seq2", "Drop-seq")
        ]
    )
    detected = np.asarray((full.X > 0).sum(0)).ravel()
    genes = np.sort(np.argsort(-detected, kind="stable")[:n_genes])
    sub = full[cells][:, genes].copy()
    sub.obs = sub.obs[["cell_line", "platform"]].copy()
    return sub


@pytest.fixture(scope="module")
def integrated(cellbench_path):
    adata = _cellbench_subset(cellbench_path)
    SCGPT.setup_anndata(adata, batch_key="platform", labels_key="cell_line")
    torch.manual_seed(0)
    model = SCGPT(adata, **SMALL, **INTEGRATION, ecs_threshold=0.8, explicit_zero_prob=True)
    model.train(max_epochs=3, batch_size=32, lr=1e-3)
    return model


def test_integration_training(integrated):
    hist = integrated.history
    for key in ("mlm_mse", "mvc_mse", "mlm_nll", "mvc_nll", "ecs", "dab_ce", "dab_accuracy"):
        values = hist[f"{key}_train"].to_numpy(dtype=float)
        assert values.size == 3 and np.isfinite(values).all(), key
    assert np.isfinite(hist["train_loss"].to_numpy(dtype=float)).all()
    assert integrated.batch_categories == ["CEL-seq2", "Drop-seq"]
    # the statistics of both domains were estimated
    for bn in integrated.module.dsbn.bns:
        assert bn.num_batches_tracked > 0
    assert "2 batch labels" in integrated._model_summary_string


def test_embeddings_use_batch_labels_and_are_batch_size_invariant(integrated):
    adata = integrated.adata
    z = integrated.get_latent_representation()
    assert z.shape == (adata.n_obs, 32) and np.isfinite(z).all()
    np.testing.assert_allclose(np.linalg.norm(z, axis=1), 1.0, atol=1e-5)
    for batch_size in (1, 7, 200):
        np.testing.assert_allclose(
            integrated.get_latent_representation(batch_size=batch_size), z, atol=1e-5
        )
    perm = np.random.default_rng(1).permutation(adata.n_obs)
    np.testing.assert_allclose(
        integrated.get_latent_representation(indices=perm, batch_size=13), z[perm], atol=1e-5
    )
    # the same cells labelled with the other platform embed differently (DSBN statistics)
    swapped = adata.copy()
    swapped.obs["platform"] = swapped.obs["platform"].map(
        {"CEL-seq2": "Drop-seq", "Drop-seq": "CEL-seq2"}
    )
    z_swapped = integrated.get_latent_representation(swapped)
    assert np.abs(z_swapped - z).max() > 1e-3
    # categories are matched by name, not by code: a query with one platform only
    drop = adata[adata.obs["platform"] == "Drop-seq"].copy()
    np.testing.assert_allclose(
        integrated.get_latent_representation(drop),
        z[adata.obs["platform"] == "Drop-seq"],
        atol=1e-5,
    )


def test_integration_save_load(integrated, tmp_path):
    z = integrated.get_latent_representation()
    integrated.save(tmp_path / "m")
    loaded = SCGPT.load(tmp_path / "m", adata=integrated.adata)
    assert loaded.batch_categories == integrated.batch_categories
    np.testing.assert_array_equal(loaded.get_latent_representation(), z)
    no_adata = SCGPT.load(tmp_path / "m")
    np.testing.assert_array_equal(no_adata.get_latent_representation(integrated.adata.copy()), z)


def test_batch_options_need_batch_key(cellbench_path):
    adata = _cellbench_subset(cellbench_path, n_per_platform=5)
    SCGPT.setup_anndata(adata)
    for option in INTEGRATION:
        with pytest.raises(ValueError, match="batch_key"):
            SCGPT(adata, **SMALL, **{option: True})
    with pytest.raises(ValueError, match="batch_categories applies"):
        SCGPT(adata, **SMALL, batch_categories=["a"])


def test_unknown_batches_and_missing_column(integrated):
    adata = integrated.adata
    other = adata.copy()
    other.obs["platform"] = other.obs["platform"].astype(str).replace("Drop-seq", "10x")
    with pytest.raises(ValueError, match=r"\['10x'\].*load_query_data"):
        integrated.get_latent_representation(other)
    # cells of known batches only are fine
    known = other.obs["platform"] == "CEL-seq2"
    assert integrated.get_latent_representation(other, indices=known.to_numpy()).shape[0] == 60
    no_batch = adata.copy()
    del no_batch.obs["platform"]
    with pytest.raises(ValueError, match="no batch registered"):
        integrated.get_latent_representation(no_batch)


# ---------------------------------------------------------------- query mapping
@pytest.fixture(scope="module")
def reference_and_query(cellbench_path):
    """A reference on CEL-seq2 cells split into two samples; a query with Drop-seq cells."""
    adata = _cellbench_subset(cellbench_path)
    cel = np.flatnonzero(adata.obs["platform"] == "CEL-seq2")
    sample = np.where(adata.obs["platform"] == "Drop-seq", "drop", "cel_a").astype(object)
    sample[cel[1::2]] = "cel_b"
    adata.obs["sample"] = sample
    reference_cells = adata[adata.obs["platform"] == "CEL-seq2"].copy()
    # the query: all Drop-seq cells and a few cells of the known sample cel_b
    query = adata[
        (adata.obs["platform"] == "Drop-seq") | np.isin(np.arange(adata.n_obs), cel[1:20:2])
    ].copy()
    SCGPT.setup_anndata(reference_cells, batch_key="sample")
    torch.manual_seed(0)
    reference = SCGPT(reference_cells, **SMALL, **INTEGRATION, ecs_threshold=0.8)
    reference.train(max_epochs=2, batch_size=32, lr=1e-3)
    return reference, query


def test_query_mapping_trains_only_new_batches(reference_and_query):
    reference, query = reference_and_query
    query = query.copy()
    ref_state = {k: v.clone() for k, v in reference.module.state_dict().items()}
    z_ref = reference.get_latent_representation()
    model = SCGPT.load_query_data(query, reference)
    assert model.batch_categories == ["cel_a", "cel_b", "drop"]
    assert not model.is_trained_
    assert "_scvi_uuid" in query.uns  # set up with the reference's setup arguments
    trainable = [n for n, p in model.module.named_parameters() if p.requires_grad]
    assert trainable == [
        "batch_encoder.embedding.weight",
        "grad_reverse_discriminator.out_layer.weight",
        "grad_reverse_discriminator.out_layer.bias",
    ]
    start = {k: v.clone() for k, v in model.module.state_dict().items()}
    with pytest.raises(ValueError, match="weight_decay=0"):
        model.train(max_epochs=1, plan_kwargs={"weight_decay": 0.01})
    with pytest.raises(ValueError, match="mode='pretrain'"):
        model.train(max_epochs=1, mode="finetune")
    model.train(max_epochs=3, batch_size=16, lr=1e-2)
    after = model.module.state_dict()
    grown = ("batch_encoder.embedding.weight", "grad_reverse_discriminator.out_layer.weight")
    for key, value in ref_state.items():
        if key in grown or key == "grad_reverse_discriminator.out_layer.bias":
            assert torch.equal(after[key][:2], value), key
            assert not torch.equal(after[key][2:], start[key][2:]), key
        else:
            assert torch.equal(after[key], value), key  # backbone and reference domains
    assert after["dsbn.bns.2.num_batches_tracked"] > 0
    assert not torch.equal(after["dsbn.bns.2.running_mean"], start["dsbn.bns.2.running_mean"])
    # reference cells embed identically with both models (up to float rounding: CPU kernels
    # may differ for parameters that do not require gradients)
    np.testing.assert_allclose(model.get_latent_representation(reference.adata), z_ref, atol=1e-6)
    zq = model.get_latent_representation()
    assert zq.shape == (query.n_obs, 32) and np.isfinite(zq).all()
    # the reference itself does not know the new batch
    with pytest.raises(ValueError, match="load_query_data"):
        reference.get_latent_representation(query)


def test_query_mapping_from_a_saved_reference(reference_and_query, tmp_path):
    reference, query = reference_and_query
    reference.save(tmp_path / "ref")
    query = query.copy()
    SCGPT.setup_anndata(query, batch_key="sample")  # set up by the user
    model = SCGPT.load_query_data(query, str(tmp_path / "ref"), unfrozen=True)
    assert all(p.requires_grad for p in model.module.parameters())
    assert model.module.batch_encoder.embedding.weight.shape[0] == 3
    for key, value in reference.module.state_dict().items():
        got = model.module.state_dict()[key]
        assert (
            torch.equal(got[: value.shape[0]], value)
            if got.shape != value.shape
            else torch.equal(got, value)
        )
    # only known batches: the query model equals the reference
    known = query[query.obs["sample"] == "cel_b"].copy()
    same = SCGPT.load_query_data(known, reference)
    assert same.is_trained_ and same.batch_categories == ["cel_a", "cel_b"]
    np.testing.assert_allclose(
        same.get_latent_representation(), reference.get_latent_representation(known), atol=1e-6
    )


def test_query_mapping_errors(reference_and_query, integrated, tmp_path):
    reference, query = reference_and_query
    no_column = query.copy()
    del no_column.obs["sample"]
    with pytest.raises(KeyError, match="'sample'"):
        SCGPT.load_query_data(no_column, reference)
    plain_adata = query.copy()
    SCGPT.setup_anndata(plain_adata)
    torch.manual_seed(0)
    plain = SCGPT(plain_adata, **SMALL)
    with pytest.raises(ValueError, match="no batch parameters"):
        SCGPT.load_query_data(query.copy(), plain)
    with pytest.raises(TypeError, match="reference_model"):
        SCGPT.load_query_data(query.copy(), object())


# ---------------------------------------------------------------- official integration checkpoints
def _distinct_counts(adata, seed=0):
    """Distinct counts inside each cell, so that binning has no ties (no random tie-breaking)."""
    rng = np.random.default_rng(seed)
    X = adata.X.toarray()
    for i in range(adata.n_obs):
        nz = np.flatnonzero(X[i])
        X[i] = 0
        X[i, nz] = rng.permutation(len(nz)) + 1
    out = adata.copy()
    out.X = sp.csr_matrix(X)
    return out


class _WithBatchLabel:
    """The official model with one batch label for every cell (official DSBN semantics).

    scGPT 0.2.4's ``get_batch_cell_embeddings(use_batch_labels=True)`` fails because its
    collator drops the labels; this wrapper passes them to ``_encode`` instead.
    """

    def __init__(self, model, label):
        self.model, self.label = model, label

    def parameters(self):
        return self.model.parameters()

    def _encode(self, src, values, src_key_padding_mask, batch_labels=None):
        labels = torch.full((src.shape[0],), self.label, dtype=torch.long)
        return self.model._encode(src, values, src_key_padding_mask, batch_labels=labels)


def test_from_pretrained_integration_checkpoint_matches_official(
    official_scgpt, cellbench_path, tmp_path
):
    from scgpt.tasks.cell_emb import get_batch_cell_embeddings

    adata = _distinct_counts(_cellbench_subset(cellbench_path, n_per_platform=15, n_genes=150))
    args = official_args(d_model=32, nhead=4, d_hid=32, nlayers=2)
    vocab = with_specials(list(adata.var_names[::2]))
    official = _official(vocab, n_batch=2, args=args, seed=5)
    genes_only = {g: i for g, i in vocab.items() if not g.startswith("<")}
    folder = write_folder(
        tmp_path / "integ", checkpoint_layout(official.state_dict(), "flash"), args, genes_only
    )
    SCGPT.setup_anndata(adata, batch_key="platform")
    model = SCGPT.from_pretrained(folder, adata)
    assert model.batch_categories == ["CEL-seq2", "Drop-seq"]
    ours = model.get_latent_representation(batch_size=7)
    matched = adata[:, adata.var_names.isin(vocab)].copy()
    for code, platform in enumerate(model.batch_categories):
        cells = (matched.obs["platform"] == platform).to_numpy()
        part = matched[cells].copy()
        expected = get_batch_cell_embeddings(
            part,
            cell_embedding_mode="cls",
            model=_WithBatchLabel(official, code),
            vocab=vocab,
            max_length=1200,
            batch_size=8,
            model_configs={"pad_token": "<pad>", "pad_value": -2, "embsize": 32},
            gene_ids=np.array([vocab[g] for g in part.var_names]),
        )
        assert np.abs(ours[cells] - expected).max() <= 1e-5
    # the checkpoint's rows must be named when the AnnData registers another number of batches
    one = adata[adata.obs["platform"] == "CEL-seq2"].copy()
    SCGPT.setup_anndata(one, batch_key="platform")
    with pytest.raises(ValueError, match="batch_categories"):
        SCGPT.from_pretrained(folder, one)
    named = SCGPT.from_pretrained(folder, one, batch_categories=["CEL-seq2", "Drop-seq"])
    np.testing.assert_allclose(named.get_latent_representation(), ours[: one.n_obs], atol=1e-5)


def test_from_pretrained_starts_integration_finetuning(official_scgpt, cellbench_path, tmp_path):
    from official_scgpt import official_folder

    adata = _cellbench_subset(cellbench_path, n_per_platform=10, n_genes=100)
    folder, official, _ = official_folder(tmp_path / "plain", list(adata.var_names))
    SCGPT.setup_anndata(adata, batch_key="platform")
    model = SCGPT.from_pretrained(folder, adata, **INTEGRATION, max_seq_len=64)
    sd = model.module.state_dict()
    for key, value in official.state_dict().items():
        key = key.replace("self_attn.Wqkv.", "self_attn.in_proj_")
        if key.startswith(("cls_decoder.", "decoder.fc.0.weight", "mvc_decoder.W.")):
            continue
        assert torch.equal(sd[key], value), key
    assert sd["decoder.fc.0.weight"].shape == (32, 64)
    model.train(max_epochs=1, batch_size=10)
    assert np.isfinite(model.history["dab_ce_train"].to_numpy(dtype=float)).all()
