"""scFoundation checkpoints: models.ckpt with three independent networks read per version, strict
loading with explained errors, safe unpickling, config flattening, and the writer's official
layout (read back by the reader and by the plain reference)."""

from __future__ import annotations

import collections

import pytest
import torch
from reference_scfoundation import (
    official_config,
    official_state_dict,
    random_full_values,
    reference_cell_embedding,
    reference_full_forward,
    save_models_ckpt,
)

from cellformers.module import SCFoundationModule, gather_scfoundation_tokens
from cellformers.pretrained import (
    ScFoundationCheckpoint,
    flatten_scfoundation_config,
    load_scfoundation_state_dict,
    read_scfoundation_checkpoint,
    save_scfoundation_checkpoint,
    scfoundation_config,
    scfoundation_module_kwargs,
)

N_GENES = 300
TOL = 1e-5
KW = {"enc_heads": 4, "dec_heads": 2, "dim_head": 12}
SEEDS = {"cell": 0, "rde": 1, "gene": 2}


@pytest.fixture(scope="module")
def sds():
    return {v: official_state_dict(n_genes=N_GENES, seed=s) for v, s in SEEDS.items()}


@pytest.fixture
def models_ckpt(tmp_path, sds):
    return save_models_ckpt(tmp_path / "models.ckpt", sds, official_config(n_genes=N_GENES))


@pytest.fixture(scope="module")
def full():
    return random_full_values(3, N_GENES, seed=3)


def _loaded(ckpt: ScFoundationCheckpoint, **overrides) -> SCFoundationModule:
    module = SCFoundationModule(**ckpt.module_kwargs(**overrides))
    return load_scfoundation_state_dict(module, ckpt.state_dict).eval()


def _tokens(full):
    return gather_scfoundation_tokens(full[:, :N_GENES], full[:, N_GENES], full[:, N_GENES + 1])


# ------------------------------------------------------------------------------ reading
def test_each_version_reads_and_matches_its_reference(models_ckpt, sds, full):
    outputs = {}
    for version in ("cell", "rde", "gene"):
        ckpt = read_scfoundation_checkpoint(models_ckpt, version)
        assert ckpt.version == version
        assert set(ckpt.state_dict) == set(sds[version])
        assert all(torch.equal(ckpt.state_dict[k], v) for k, v in sds[version].items())
        module = _loaded(ckpt)
        ours = module.state_dict()
        assert torch.equal(
            ours["encoder.layers.1.linear1.weight"],
            sds[version]["encoder.transformer_encoder.1.linear1.weight"],
        )
        assert int(ours["decoder.performer.calls_since_last_redraw"]) == 123
        values, positions, lengths = _tokens(full)
        with torch.no_grad():
            cells = module.embed_cells(values, positions, lengths)
            expression = module.predict_expression(values, positions, lengths)
        for i, row in enumerate(full):
            ref_cell = reference_cell_embedding(sds[version], row, KW["enc_heads"])
            ref_expr = reference_full_forward(sds[version], row, **KW)[:N_GENES]
            torch.testing.assert_close(cells[i], ref_cell, atol=TOL, rtol=0)
            torch.testing.assert_close(expression[i], ref_expr, atol=TOL, rtol=0)
        outputs[version] = cells
    # three independent networks
    assert (outputs["cell"] - outputs["gene"]).abs().max() > 0.1
    assert (outputs["cell"] - outputs["rde"]).abs().max() > 0.1
    assert read_scfoundation_checkpoint(models_ckpt, "ce").version == "cell"


def test_config_is_flattened_like_convertconfig(models_ckpt):
    ckpt = read_scfoundation_checkpoint(models_ckpt, "gene")
    nested = official_config(n_genes=N_GENES)
    expected = {
        **nested["model_config"]["mae_autobin"],
        **nested["dataset_config"]["rnaseq"],
        "model": "mae_autobin",
        "model_type": "mae_autobin",
    }
    assert ckpt.config == expected
    assert flatten_scfoundation_config(nested) == expected
    assert flatten_scfoundation_config(expected) == expected  # already flat
    kwargs = ckpt.module_kwargs()
    assert kwargs == {
        "n_genes": N_GENES,
        "bin_num": 10,
        "bin_alpha": 1.0,
        "encoder_dim": 32,
        "encoder_depth": 2,
        "encoder_heads": 4,
        "encoder_d_hid": 128,
        "encoder_dropout": 0.1,
        "encoder_activation": "relu",
        "encoder_norm_first": False,
        "layer_norm_eps": 1e-5,
        "decoder_dim": 24,
        "decoder_depth": 2,
        "decoder_heads": 2,
        "decoder_dim_head": 12,
        "decoder_ff_mult": 4,
        "decoder_nb_features": 16,  # not in the official config: from projection_matrix
        "decoder_qkv_bias": True,
        "decoder_ff_dropout": 0.0,
        "decoder_attn_dropout": 0.0,
        "value_mask_prob": 0.3,
        "zero_mask_prob": 0.03,
        "max_encoder_len": 15000,
    }
    assert ckpt.module_kwargs(stabilizer="batch")["stabilizer"] == "batch"


def test_published_config_gives_the_published_sizes():
    nested = official_config(
        n_genes=19264, bin_num=100, enc_dim=768, enc_depth=12, enc_heads=12, dec_dim=512,
        dec_depth=6, dec_heads=8, dim_head=64,
    )  # fmt: skip
    kwargs = scfoundation_module_kwargs(nested)
    assert kwargs["n_genes"] == 19264
    assert (kwargs["encoder_dim"], kwargs["encoder_depth"], kwargs["encoder_heads"]) == (
        768,
        12,
        12,
    )
    assert kwargs["encoder_d_hid"] == 3072 and kwargs["decoder_nb_features"] is None
    assert (kwargs["decoder_dim"], kwargs["decoder_depth"], kwargs["decoder_heads"]) == (512, 6, 8)
    assert kwargs["decoder_dim_head"] == 64 and kwargs["decoder_qkv_bias"] is True
    with torch.device("meta"):
        module = SCFoundationModule(**kwargs)
    shapes = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    assert shapes["pos_emb.weight"] == (19267, 768)
    assert shapes["token_emb.emb.weight"] == (100, 768)
    assert shapes["encoder.layers.11.self_attn.in_proj_weight"] == (2304, 768)
    assert shapes["decoder.performer.net.layers.5.0.fn.fast_attention.projection_matrix"] == (
        266,
        64,
    )
    assert shapes["decoder.performer.net.layers.5.1.fn.fn.w1.weight"] == (2048, 512)
    assert shapes["to_final.weight"] == (1, 512)
    n_params = sum(v.numel() for k, v in module.state_dict().items() if "calls_since" not in k)
    assert abs(n_params - 119.35e6) < 0.01e6  # spec: about 119.35M with the buffers


def test_single_network_file_and_bare_state_dict(tmp_path, sds, full):
    sd = sds["rde"]
    config = official_config(n_genes=N_GENES)
    single = tmp_path / "rde.ckpt"
    torch.save({"config": config, "state_dict": {"model." + k: v for k, v in sd.items()}}, single)
    ckpt = read_scfoundation_checkpoint(single, "gene")
    assert ckpt.version == "gene" and set(ckpt.state_dict) == set(sd)
    module = _loaded(ckpt)

    bare = tmp_path / "bare.pt"
    torch.save(sd, bare)
    ckpt = read_scfoundation_checkpoint(bare)
    assert ckpt.config["encoder"]["heads"] is None
    assert ckpt.config["seq_len"] == N_GENES + 2
    with pytest.raises(ValueError, match="pass encoder_heads="):
        ckpt.module_kwargs()
    from_bare = _loaded(ckpt, encoder_heads=4)
    values, positions, lengths = _tokens(full)
    with torch.no_grad():
        torch.testing.assert_close(
            from_bare.gene_embeddings(values, positions, lengths),
            module.gene_embeddings(values, positions, lengths),
            atol=0,
            rtol=0,
        )


def test_reader_errors(tmp_path, models_ckpt, sds):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_scfoundation_checkpoint(tmp_path / "nope.ckpt")
    with pytest.raises(ValueError, match="version must be one of"):
        read_scfoundation_checkpoint(models_ckpt, "encoder")
    partial = save_models_ckpt(
        tmp_path / "two.ckpt", {"cell": sds["cell"]}, official_config(n_genes=N_GENES)
    )
    with pytest.raises(KeyError, match="has no 'gene' checkpoint; it holds 'cell'"):
        read_scfoundation_checkpoint(partial, "gene")
    other = tmp_path / "other.ckpt"
    torch.save({"weights": [1, 2]}, other)
    with pytest.raises(ValueError, match="not an scFoundation checkpoint"):
        read_scfoundation_checkpoint(other)
    config = official_config(n_genes=N_GENES)
    config["model"] = "performer_gau"
    config["model_config"]["performer_gau"] = config["model_config"].pop("mae_autobin")
    with pytest.raises(ValueError, match="only 'mae_autobin'"):
        scfoundation_module_kwargs(config)


class _Payload:
    """A pickled object that weights_only loading must refuse."""

    def __reduce__(self):
        return (print, ("this must never run",))


def test_pickled_objects_are_refused(tmp_path, sds, capsys):
    path = tmp_path / "evil.ckpt"
    torch.save({"cell": {"config": _Payload(), "state_dict": sds["cell"]}}, path)
    with pytest.raises(
        RuntimeError,
        match=r"refuses to unpickle \(Unsupported global: GLOBAL print .*\)\. cellformers never",
    ):
        read_scfoundation_checkpoint(path)
    assert "this must never run" not in capsys.readouterr().out


# ------------------------------------------------------------------------------ strict loading
def _module(**kwargs):
    sizes = {
        "bin_num": 10, "encoder_dim": 32, "encoder_depth": 2, "encoder_heads": 4,
        "decoder_dim": 24, "decoder_depth": 2, "decoder_heads": 2, "decoder_dim_head": 12,
        "decoder_nb_features": 16,
    }  # fmt: skip
    return SCFoundationModule(kwargs.pop("n_genes", N_GENES), **{**sizes, **kwargs})


def test_strict_loading_explains_mismatches(sds):
    sd = sds["cell"]
    load_scfoundation_state_dict(_module(), {"model." + k: v for k, v in sd.items()})  # prefix ok

    missing = {k: v for k, v in sd.items() if not k.endswith("projection_matrix")}
    with pytest.raises(RuntimeError, match=r"missing keys \(2\): decoder\.performer"):
        load_scfoundation_state_dict(_module(), missing)

    extra = {**sd, "encoder.transformer_encoder.2.norm1.weight": torch.ones(32)}
    with pytest.raises(RuntimeError, match=r"encoder layers \[2\] are unexpected: encoder_depth"):
        load_scfoundation_state_dict(_module(), extra)

    with pytest.raises(
        RuntimeError, match=r"decoder layers \[1\] are unexpected: decoder_depth"
    ) as info:
        load_scfoundation_state_dict(_module(decoder_depth=1), sd)
    assert "qkv_bias" not in str(info.value)  # whole layers, not a bias setting

    with pytest.raises(
        RuntimeError, match=r"pos_emb\.weight: checkpoint \(303, 32\) vs module \(403, 32\)"
    ):
        load_scfoundation_state_dict(_module(n_genes=400), sd)
    with pytest.raises(RuntimeError, match="the gene list differs: the module has n_genes=400"):
        load_scfoundation_state_dict(_module(n_genes=400), sd)

    with pytest.raises(RuntimeError, match="decoder_dim_head or decoder_nb_features differs"):
        load_scfoundation_state_dict(_module(decoder_nb_features=8), sd)

    with pytest.raises(RuntimeError, match="build the module with expression_head=True"):
        load_scfoundation_state_dict(_module(expression_head=False), sd)
    no_head = {k: v for k, v in sd.items() if not k.startswith("to_final.")}
    with pytest.raises(RuntimeError, match="build the module with expression_head=False"):
        load_scfoundation_state_dict(_module(), no_head)
    load_scfoundation_state_dict(_module(expression_head=False), no_head)

    with pytest.raises(RuntimeError, match="decoder_qkv_bias=True"):
        load_scfoundation_state_dict(_module(decoder_qkv_bias=False), sd)
    with pytest.raises(RuntimeError, match="encoder_d_hid differs"):
        load_scfoundation_state_dict(_module(encoder_d_hid=64), sd)
    with pytest.raises(TypeError, match="Expected a state dict"):
        load_scfoundation_state_dict(_module(), [1, 2])


# ------------------------------------------------------------------------------ writing
def test_writer_round_trip_in_the_official_layout(tmp_path, sds, full):
    modules = {}
    for version in ("cell", "rde", "gene"):
        modules[version] = load_scfoundation_state_dict(_module(max_encoder_len=500), sds[version])
    path = save_scfoundation_checkpoint(modules, tmp_path / "export" / "models.ckpt")
    raw = torch.load(path, weights_only=True)
    assert set(raw) == {"cell", "rde", "gene"}
    for version, entry in raw.items():
        assert set(entry) == {"config", "state_dict"}
        assert isinstance(entry["state_dict"], collections.OrderedDict)
        assert all(k.startswith("model.") for k in entry["state_dict"])
        assert {k[len("model.") :] for k in entry["state_dict"]} == set(sds[version])
        config = entry["config"]
        assert config["model"] == "mae_autobin"
        net = config["model_config"]["mae_autobin"]
        data = config["dataset_config"]["rnaseq"]
        assert (
            net["encoder"]["module_type"] == "transformer"
            and net["decoder"]["module_type"] == "performer"
        )
        assert (net["encoder"]["hidden_dim"], net["decoder"]["hidden_dim"]) == (32, 24)
        assert data["seq_len"] == N_GENES + 2 and data["mae_encoder_max_seq_len"] == 500
        ckpt = read_scfoundation_checkpoint(path, version)
        assert all(torch.equal(ckpt.state_dict[k], v) for k, v in sds[version].items())
        module = _loaded(ckpt)
        assert module.max_encoder_len == 500
        # the exported weights run in the plain official re-statement
        values, positions, lengths = _tokens(full[:1])
        with torch.no_grad():
            genes = module.gene_embeddings(values, positions, lengths)[0]
        ref = reference_full_forward(ckpt.state_dict, full[0], to_final=False, **KW)
        torch.testing.assert_close(genes, ref[:N_GENES], atol=TOL, rtol=0)

    # one module for all three versions: tensors stored once
    one = _module(encoder_d_hid=48, decoder_ff_mult=2, encoder_dropout=0.0)
    single = save_scfoundation_checkpoint(one, tmp_path / "one.ckpt", config={"target_sum": 5e3})
    many = save_scfoundation_checkpoint({"cell": one}, tmp_path / "cell_only.ckpt")
    assert single.stat().st_size < 1.2 * many.stat().st_size
    for version in ("cell", "rde", "gene"):
        ckpt = read_scfoundation_checkpoint(single, version)
        rebuilt = _loaded(ckpt)
        assert rebuilt.encoder_d_hid == 48 and rebuilt.decoder_ff_mult == 2
        assert rebuilt.encoder_dropout == 0.0 and rebuilt.target_sum == 5e3
        assert all(torch.equal(rebuilt.state_dict()[k], v) for k, v in one.state_dict().items())
    assert scfoundation_config(one)["encoder"]["dim_feedforward"] == 48
    with pytest.raises(ValueError, match="Unknown versions"):
        save_scfoundation_checkpoint({"ce": one}, tmp_path / "bad.ckpt")
