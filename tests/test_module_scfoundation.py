"""scFoundation: parity of the network with a plain reference of the official forward (cell
embeddings, expression, gene embeddings), batch invariance, the padded token layout, and
read-depth-aware masked pretraining on real counts."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from reference_scfoundation import (
    official_state_dict,
    random_full_values,
    reference_cell_embedding,
    reference_encode,
    reference_full_forward,
    token_embedding,
)
from scvi.module.base import LossOutput

from cellformers.module import SCFoundationModule, gather_scfoundation_tokens
from cellformers.nn import AutoDiscretizationEmbedding
from cellformers.pretrained import load_scfoundation_state_dict

N_GENES = 300
ENC_HEADS, DEC_HEADS, DIM_HEAD = 4, 2, 12
SIZES = {
    "bin_num": 10,
    "encoder_dim": 32,
    "encoder_depth": 2,
    "encoder_heads": ENC_HEADS,
    "encoder_d_hid": 128,
    "decoder_dim": 24,
    "decoder_depth": 2,
    "decoder_heads": DEC_HEADS,
    "decoder_dim_head": DIM_HEAD,
    "decoder_nb_features": 16,
}
TOL = 1e-5


@pytest.fixture(scope="module")
def sd():
    return official_state_dict(n_genes=N_GENES, seed=0)


@pytest.fixture(scope="module")
def full():
    return random_full_values(4, N_GENES, seed=1)


def _module(sd, **kwargs):
    module = SCFoundationModule(N_GENES, **{**SIZES, **kwargs})
    return load_scfoundation_state_dict(module, sd).eval()


def _tokens(full):
    return gather_scfoundation_tokens(full[:, :N_GENES], full[:, N_GENES], full[:, N_GENES + 1])


def _one(tokens, i):
    values, positions, lengths = tokens
    n = int(lengths[i])
    return values[i : i + 1, :n], positions[i : i + 1, :n], lengths[i : i + 1]


# ------------------------------------------------------------------------------ value embedding
def test_autobin_embedding_matches_official_with_explicit_masks(sd):
    emb = AutoDiscretizationEmbedding(32, bin_num=10)
    emb.load_state_dict(
        {k[len("token_emb.") :]: v for k, v in sd.items() if k.startswith("token_emb.")}
    )
    assert set(emb.state_dict()) == {
        "mlp.weight",
        "mlp.bias",
        "mlp2.weight",
        "mlp2.bias",
        "emb.weight",
        "emb_mask.weight",
        "emb_pad.weight",
    }
    values = torch.tensor([0.0, 0.5, 2.7, 102.0, 103.0, 4.0, 8.25])
    ref = token_embedding(sd, values)
    with torch.no_grad():
        ours = emb(values[None], mask=(values == 102.0)[None], padding=(values == 103.0)[None])[0]
        plain = emb(values[None])[0]
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=0)
    # without explicit masks 102 and 103 are ordinary values (the official code replaces them)
    assert (plain[3] - ref[3]).abs().max() > 1e-2 and (plain[4] - ref[4]).abs().max() > 1e-2
    torch.testing.assert_close(plain[[0, 1, 2, 5, 6]], ref[[0, 1, 2, 5, 6]], atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="mask must be a bool tensor"):
        emb(values[None], mask=torch.zeros(1, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="padding must be a bool tensor"):
        emb(values[None], padding=torch.zeros(1, 7))


# ------------------------------------------------------------------------------ token layout
def test_gather_tokens_layout(full):
    values, positions, lengths = _tokens(full)
    assert values.dtype == torch.float32 and positions.dtype == torch.long
    assert values.shape == positions.shape == (4, int(lengths.max()))
    for i, row in enumerate(full):
        genes = torch.nonzero(row[:N_GENES] > 0).flatten()
        n = len(genes)
        assert int(lengths[i]) == n + 2
        assert torch.equal(positions[i, :n], genes)
        assert torch.equal(values[i, :n], row[genes])
        assert positions[i, n].item() == N_GENES and positions[i, n + 1].item() == N_GENES + 1
        assert values[i, n].item() == row[N_GENES].item()
        assert values[i, n + 1].item() == row[N_GENES + 1].item()
        assert (positions[i, n + 2 :] == N_GENES + 2).all() and (values[i, n + 2 :] == 0).all()
    keep = full[:, :N_GENES] > 1.0
    v2, p2, l2 = gather_scfoundation_tokens(
        full[:, :N_GENES], full[:, N_GENES], full[:, -1], keep=keep
    )
    assert torch.equal(l2, keep.sum(1) + 2)
    assert (v2[p2 < N_GENES] > 1.0).all()
    with pytest.raises(ValueError, match="keep must be a bool tensor"):
        gather_scfoundation_tokens(
            full[:, :N_GENES], full[:, N_GENES], full[:, -1], keep=keep.float()
        )
    with pytest.raises(ValueError, match="one value per cell"):
        gather_scfoundation_tokens(full[:, :N_GENES], full[:2, N_GENES], full[:, -1])


# ------------------------------------------------------------------------------ parity
def test_single_cells_match_reference(sd, full):
    module = _module(sd)
    tokens = _tokens(full)
    for i, row in enumerate(full):
        one = _one(tokens, i)
        with torch.no_grad():
            hidden = module.encode(*one)
            cell_all = module.pool(hidden, one[2], "all")[0]
            cell_max = module.pool(hidden, one[2], "max")[0]
            cell_mean = module.embed_cells(*one, pooling="mean")[0]
            expression = module.predict_expression(*one)[0]
            genes = module.gene_embeddings(*one)[0]
        ref_hidden = reference_encode(sd, row, ENC_HEADS)
        assert cell_all.shape == (4 * 32,) and cell_max.shape == (32,)
        torch.testing.assert_close(hidden[0], ref_hidden, atol=TOL, rtol=0)
        torch.testing.assert_close(
            cell_all, reference_cell_embedding(sd, row, ENC_HEADS, "all"), atol=TOL, rtol=0
        )
        torch.testing.assert_close(
            cell_max, reference_cell_embedding(sd, row, ENC_HEADS, "max"), atol=TOL, rtol=0
        )
        torch.testing.assert_close(cell_mean, ref_hidden[:-2].mean(0), atol=TOL, rtol=0)
        kw = {"enc_heads": ENC_HEADS, "dec_heads": DEC_HEADS, "dim_head": DIM_HEAD}
        ref_expr = reference_full_forward(sd, row, **kw)
        ref_genes = reference_full_forward(sd, row, to_final=False, **kw)
        assert expression.shape == (N_GENES,) and genes.shape == (N_GENES, 24)
        torch.testing.assert_close(expression, ref_expr[:N_GENES], atol=TOL, rtol=0)
        torch.testing.assert_close(genes, ref_genes[:N_GENES], atol=TOL, rtol=0)
    # the outputs are not trivially equal across cells
    assert (
        reference_cell_embedding(sd, full[0], 4) - reference_cell_embedding(sd, full[3], 4)
    ).abs().max() > 0.1


def test_masked_decoding_matches_reference(sd, full):
    module = _module(sd)
    row = full[1]
    g = torch.Generator().manual_seed(5)
    masked = torch.rand(N_GENES + 2, generator=g) < 0.3
    masked[N_GENES:] = False
    keep = (row[:N_GENES] > 0) & ~masked[:N_GENES]
    tokens = gather_scfoundation_tokens(
        row[None, :N_GENES], row[None, N_GENES], row[None, -1], keep=keep[None]
    )
    with torch.no_grad():
        hidden = module.encode(*tokens)
        y = module.decode(hidden, tokens[1], tokens[2], masked=masked[None])
        pred = module.to_final(y).squeeze(-1)[0]
    ref = reference_full_forward(
        sd, row, enc_heads=ENC_HEADS, dec_heads=DEC_HEADS, dim_head=DIM_HEAD, masked=masked
    )
    torch.testing.assert_close(pred, ref, atol=TOL, rtol=0)
    with pytest.raises(ValueError, match=r"masked must be a bool tensor of shape \(1, 302\)"):
        module.decode(hidden, tokens[1], tokens[2], masked=masked[None, :N_GENES])


def test_padded_batch_equals_single_cells(sd, full):
    module = _module(sd)
    tokens = _tokens(full)
    values, positions, lengths = tokens
    assert len(set(lengths.tolist())) == 4  # real padding
    with torch.no_grad():
        hidden = module.encode(*tokens)
        batch = {p: module.pool(hidden, lengths, p) for p in ("all", "max", "mean")}
        expression = module.predict_expression(*tokens)
        genes = module.gene_embeddings(*tokens)
        assert (hidden[torch.arange(hidden.shape[1]) >= lengths[:, None]] == 0).all()
        for i in range(4):
            one = _one(tokens, i)
            single = module.encode(*one)
            torch.testing.assert_close(single[0], hidden[i, : int(lengths[i])], atol=1e-6, rtol=0)
            # the same cell padded alone to the batch length equals its batch row; BLAS may
            # round a row differently by where it falls in a matrix tile, so not always bitwise
            alone = module.encode(values[i : i + 1], positions[i : i + 1], lengths[i : i + 1])
            torch.testing.assert_close(alone[0], hidden[i], atol=1e-6, rtol=0)
            for p, out in batch.items():
                torch.testing.assert_close(
                    module.pool(single, one[2], p)[0], out[i], atol=1e-6, rtol=0
                )
            torch.testing.assert_close(
                module.predict_expression(*one)[0], expression[i], atol=TOL, rtol=0
            )
            torch.testing.assert_close(module.gene_embeddings(*one)[0], genes[i], atol=TOL, rtol=0)
        # cell order does not matter either
        order = torch.tensor([2, 0, 3, 1])
        shuffled = module.predict_expression(values[order], positions[order], lengths[order])
        torch.testing.assert_close(shuffled, expression[order], atol=TOL, rtol=0)


def test_batch_stabilizer_is_official(sd, full):
    module = _module(sd, stabilizer="batch")
    assert module.stabilizer == "batch"
    tokens = _tokens(full)
    kw = {"enc_heads": ENC_HEADS, "dec_heads": DEC_HEADS, "dim_head": DIM_HEAD}
    with torch.no_grad():
        one = module.predict_expression(*_one(tokens, 3))[0]
        batched = module.predict_expression(*tokens)[3]
        module.stabilizer = "cell"
        per_cell = module.predict_expression(*tokens)[3]
    torch.testing.assert_close(
        one, reference_full_forward(sd, full[3], **kw)[:N_GENES], atol=TOL, rtol=0
    )
    # the official batch-wide key maximum makes a cell's output depend on its batch
    assert (batched - one).abs().max() > 1e-4
    torch.testing.assert_close(per_cell, one, atol=TOL, rtol=0)
    with pytest.raises(ValueError, match="stabilizer must be one of"):
        module.stabilizer = "global"


# ------------------------------------------------------------------------------ input checks
def test_token_checks_and_errors(sd, full):
    module = _module(sd)
    values, positions, lengths = _tokens(full)
    with pytest.raises(ValueError, match=r"lengths must be in \[2, "):
        module.encode(values, positions, lengths.clamp_max(1))
    with pytest.raises(ValueError, match="lengths must hold one number per cell"):
        module.encode(values, positions, lengths[:2])
    with pytest.raises(ValueError, match="positions of real tokens must be in"):
        module.encode(values, positions.masked_fill(positions == N_GENES + 1, N_GENES + 2), lengths)
    with pytest.raises(ValueError, match="positions must have shape"):
        module.encode(values, positions[:, :-1], lengths)
    with pytest.raises(TypeError, match="positions must be an integer tensor"):
        module.encode(values, positions.float(), lengths)
    with pytest.raises(ValueError, match="pooling must be one of"):
        module.embed_cells(values, positions, lengths, pooling="cls")
    # padded slots may hold any position: they are ignored
    garbage = positions.masked_fill(positions == N_GENES + 2, 7)
    with torch.no_grad():
        assert torch.equal(
            module.encode(values, garbage, lengths), module.encode(values, positions, lengths)
        )
    head_less = SCFoundationModule(N_GENES, **SIZES, expression_head=False)
    assert head_less.to_final is None and not head_less.expression_head
    with pytest.raises(RuntimeError, match="expression_head=True"):
        head_less.predict_expression(values, positions, lengths)
    with pytest.raises(ValueError, match="value_mask_prob must be in"):
        SCFoundationModule(N_GENES, **SIZES, value_mask_prob=1.5)
    with pytest.raises(ValueError, match="max_encoder_len must be >= 3"):
        SCFoundationModule(N_GENES, **SIZES, max_encoder_len=2)


def test_cell_without_expressed_genes(sd):
    module = _module(sd)
    values = torch.tensor([[4.0, 3.0]])
    positions = torch.tensor([[N_GENES, N_GENES + 1]])
    with torch.no_grad():
        out = module.embed_cells(values, positions, torch.tensor([2]))
        hidden = module.encode(values, positions, torch.tensor([2]))
    assert torch.isfinite(out).all()
    assert torch.equal(out[0, :64], torch.cat([hidden[0, 1], hidden[0, 0]]))
    assert (out[0, 64:] == 0).all()


# ------------------------------------------------------------------------------ pretraining
@pytest.fixture(scope="module")
def counts(cellbench_path):
    import anndata as ad

    adata = ad.read_h5ad(cellbench_path)
    X = sp.csr_matrix(adata.X)
    genes = np.argsort(-np.asarray(X.sum(axis=0)).ravel(), kind="stable")[:N_GENES]
    rows = np.random.default_rng(0).choice(adata.n_obs, 32, replace=False)
    dense = X[rows][:, np.sort(genes)].toarray().astype(np.float32)
    return torch.from_numpy(dense)


def _pretrain_module(**kwargs):
    torch.manual_seed(0)
    return SCFoundationModule(N_GENES, **{**SIZES, **kwargs})


def test_corruption_follows_the_rda_scheme(counts):
    module = _pretrain_module(downsample_prob=0.0)
    torch.manual_seed(1)
    out = module.corrupt(counts)
    total = counts.sum(1)
    target = torch.log1p(counts / total[:, None] * 1e4)
    torch.testing.assert_close(out["target"], target)
    values, positions, lengths = out["values"], out["positions"], out["lengths"]
    cells = torch.arange(len(counts))
    t, s = values[cells, lengths - 2], values[cells, lengths - 1]
    torch.testing.assert_close(t, torch.log10(total))
    torch.testing.assert_close(s, t)  # no down-sampling
    masked = out["masked"]
    assert masked.shape == (32, N_GENES + 2) and not masked[:, N_GENES:].any()
    expressed = counts > 0
    in_encoder = torch.zeros_like(expressed)
    real = torch.arange(values.shape[1]) < (lengths - 2)[:, None]
    in_encoder[real.nonzero()[:, 0], positions[real]] = True
    # the encoder sees exactly the unmasked expressed genes, with their normalised values
    assert torch.equal(in_encoder, expressed & ~masked[:, :N_GENES])
    torch.testing.assert_close(values[real], target[in_encoder])
    # masking rates on a sparser profile (top genes of CellBench have few zeros)
    g = torch.Generator().manual_seed(0)
    sparse = torch.poisson(torch.rand(64, N_GENES, generator=g) * 1.5, generator=g)
    masked = module.corrupt(sparse)["masked"][:, :N_GENES]
    expressed = sparse > 0
    frac_value = (masked & expressed).sum() / expressed.sum()
    frac_zero = (masked & ~expressed).sum() / (~expressed).sum()
    assert abs(frac_value.item() - 0.3) < 0.02 and abs(frac_zero.item() - 0.03) < 0.008

    module = _pretrain_module(downsample_prob=1.0, min_depth_fraction=0.2, max_encoder_len=40)
    torch.manual_seed(2)
    out = module.corrupt(counts)
    lengths = out["lengths"]
    t = out["values"][cells, lengths - 2]
    s = out["values"][cells, lengths - 1]
    torch.testing.assert_close(t, torch.log10(total))
    assert (s < t).all() and (s >= torch.log10(0.1 * total)).all()
    assert int(lengths.max()) <= 40
    # genes cut by the encoder cap are masked (predicted) too
    expressed = counts > 0
    n_enc = lengths - 2
    assert ((out["masked"][:, :N_GENES].sum(1) + n_enc) >= 0.5 * expressed.sum(1)).all()


def test_rda_loss_finite_deterministic_and_decreasing(counts):
    module = _pretrain_module(encoder_dropout=0.0)  # dropout forces the slow attention path
    tensors = {"counts": counts}

    def eval_loss(seed):
        module.eval()
        torch.manual_seed(seed)
        with torch.no_grad():
            _, _, out = module(tensors)
        return out

    first = eval_loss(0)
    assert isinstance(first, LossOutput)
    assert torch.isfinite(first.loss) and first.reconstruction_loss[
        "reconstruction_loss"
    ].shape == (32,)
    assert torch.equal(eval_loss(0).loss, first.loss)
    assert not torch.equal(eval_loss(1).loss, first.loss)
    optimizer = torch.optim.Adam(module.parameters(), lr=3e-3)
    module.train()
    for step in range(15):
        torch.manual_seed(100 + step)
        _, _, out = module(tensors)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
    last = eval_loss(0)
    assert last.loss < 0.6 * first.loss, (first.loss, last.loss)


def test_zero_count_cells_are_skipped(counts):
    module = _pretrain_module(downsample_prob=1.0).train()
    batch = counts[:6].clone()
    batch[[1, 4]] = 0
    torch.manual_seed(0)
    inference, _, out = module({"counts": batch})
    per_cell = out.reconstruction_loss["reconstruction_loss"]
    assert torch.isfinite(out.loss) and torch.isfinite(per_cell).all()
    assert per_cell[1] == 0 and per_cell[4] == 0 and (per_cell[[0, 2, 3, 5]] > 0).all()
    assert not inference["valid"][[1, 4]].any() and not inference["masked"][[1, 4]].any()
    torch.testing.assert_close(out.loss, per_cell[[0, 2, 3, 5]].mean())
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in module.parameters() if p.grad is not None)
    torch.manual_seed(0)
    _, _, empty = module({"counts": torch.zeros(3, N_GENES)})
    assert empty.loss == 0 and torch.isfinite(empty.loss)


def test_pretraining_input_errors():
    module = _pretrain_module()
    with pytest.raises(KeyError, match="'counts'"):
        module({"X": torch.zeros(2, N_GENES)})
    with pytest.raises(ValueError, match=r"counts must be a \[batch, n_genes=300\]"):
        module({"counts": torch.zeros(2, N_GENES + 1)})
    with pytest.raises(ValueError, match="non-negative raw counts"):
        module({"counts": -torch.ones(2, N_GENES)})
    head_less = SCFoundationModule(N_GENES, **SIZES, expression_head=False)
    with pytest.raises(RuntimeError, match="no expression head"):
        head_less({"counts": torch.ones(2, N_GENES)})
    with pytest.raises(NotImplementedError):
        module.sample()


# ------------------------------------------------------------------------------ full length
def test_full_size_decoder_length_runs_on_cpu():
    n_genes = 19264
    torch.manual_seed(0)
    module = SCFoundationModule(
        n_genes,
        bin_num=4,
        encoder_dim=8,
        encoder_depth=1,
        encoder_heads=2,
        encoder_d_hid=16,
        decoder_dim=8,
        decoder_depth=1,
        decoder_heads=1,
        decoder_dim_head=8,
        decoder_nb_features=4,
    ).eval()
    assert module.pos_emb.weight.shape == (19267, 8)
    g = torch.Generator().manual_seed(0)
    counts = torch.poisson(torch.rand(1, n_genes, generator=g) * 0.3, generator=g)
    x = torch.log1p(counts / counts.sum() * 1e4)
    tokens = gather_scfoundation_tokens(x, torch.tensor([4.0]), torch.log10(counts.sum(1)))
    with torch.no_grad():
        expression = module.predict_expression(*tokens)
        cell = module.embed_cells(*tokens)
    assert expression.shape == (1, n_genes) and torch.isfinite(expression).all()
    assert cell.shape == (1, 32) and torch.isfinite(cell).all()
