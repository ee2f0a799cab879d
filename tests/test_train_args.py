"""train(): one signature for every model class, and a clear error for every bad argument."""

from __future__ import annotations

import inspect
import math

import pytest
import scvi
import torch
from test_resume import small_cellbench

import cellformers as cf

CLASSES = ("SCGPT", "Geneformer", "SCBERT", "SCFoundation")
STANDARD = (
    "max_epochs",
    "accelerator",
    "devices",
    "train_size",
    "validation_size",
    "shuffle_set_split",
    "batch_size",
    "early_stopping",
    "datasplitter_kwargs",
    "plan_kwargs",
    "trainer_kwargs",
    "datamodule",
)


@pytest.fixture(scope="module")
def models():
    """A tiny model of each class on 24 labelled CellBench cells (built once)."""
    adata = small_cellbench(24, 150, seed=0)
    scvi.settings.seed = 0
    built = {}
    for name, setup, kwargs in (
        ("SCGPT", {}, {"d_model": 16, "nhead": 2, "d_hid": 16, "nlayers": 1}),
        (
            "Geneformer",
            {"gene_key": "ensembl_id"},
            {
                "hidden_size": 16,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
                "intermediate_size": 16,
                "max_input_size": 64,
            },
        ),
        ("SCBERT", {}, {"dim": 16, "depth": 1, "heads": 2, "dim_head": 8}),
        (
            "SCFoundation",
            {},
            {
                "encoder_dim": 16,
                "encoder_depth": 1,
                "encoder_heads": 2,
                "encoder_d_hid": 16,
                "decoder_dim": 16,
                "decoder_depth": 1,
                "decoder_heads": 2,
                "decoder_dim_head": 8,
                "decoder_nb_features": 8,
            },
        ),
    ):
        cls = getattr(cf.model, name)
        data = adata.copy()
        cls.setup_anndata(data, labels_key="cell_line", **setup)
        built[name] = cls(data, **kwargs)
    return built


def test_every_class_has_the_same_train_signature():
    signatures = {name: inspect.signature(getattr(cf.model, name).train) for name in CLASSES}
    first = signatures["SCGPT"]
    assert all(sig == first for sig in signatures.values())
    params = first.parameters
    assert all(name in params for name in STANDARD)
    assert all(
        params[name].kind is inspect.Parameter.KEYWORD_ONLY for name in STANDARD[1:]
    )  # only max_epochs is positional, as in scvi-tools
    for name in ("mode", "freeze_layers", "class_weight", "batch_adversarial", "ckpt_path"):
        assert name in params
    for name in CLASSES:
        doc = getattr(cf.model, name).train.__doc__
        # one shared parameter section, with the class's own recipe and defaults
        assert doc.count("\nParameters\n----------\n") == 1
        assert all(f"\n{p}\n" in doc for p in STANDARD)
        assert 'ckpt_path="last"' in doc and "Defaults of this class" in doc
    assert "``'perturbation'``" in cf.model.SCFoundation.train.__doc__
    assert "``'perturbation'``" not in cf.model.SCBERT.train.__doc__


BAD = [
    ({"batch_size": 0}, ValueError, "batch_size must be an integer >= 1, got 0"),
    ({"batch_size": -4}, ValueError, "batch_size must be an integer >= 1, got -4"),
    ({"batch_size": 2.5}, TypeError, "batch_size must be an integer, got 2.5"),
    ({"batch_size": True}, TypeError, "batch_size must be an integer, got True"),
    ({"max_epochs": -1}, ValueError, "max_epochs must be an integer >= 1, got -1"),
    ({"max_epochs": 0}, ValueError, "max_epochs must be an integer >= 1, got 0"),
    ({"max_epochs": "3"}, TypeError, "max_epochs must be an integer, got '3'"),
    ({"lr": "fast"}, TypeError, r"lr must be a number in \(0, inf\), got 'fast'"),
    ({"lr": 0}, ValueError, r"lr must be a finite number in \(0, inf\), got 0"),
    ({"lr": -1e-3}, ValueError, r"lr must be a finite number in \(0, inf\), got -0.001"),
    ({"lr": math.nan}, ValueError, r"lr must be a finite number in \(0, inf\), got nan"),
    ({"lr": math.inf}, ValueError, r"lr must be a finite number in \(0, inf\), got inf"),
    ({"plan_kwargs": {"lr": -1}}, ValueError, r"lr must be a finite number in \(0, inf\)"),
    ({"weight_decay": -0.1}, ValueError, r"weight_decay must be a finite number in \[0, inf\)"),
    ({"warmup_ratio": 1.0}, ValueError, r"warmup_ratio must be a finite number in \[0, 1\)"),
    ({"warmup_ratio": "x"}, TypeError, r"warmup_ratio must be a number in \[0, 1\), got 'x'"),
    ({"train_size": 0}, ValueError, r"train_size must be a finite number in \(0, 1\], got 0"),
    ({"train_size": 1.5}, ValueError, r"train_size must be a finite number in \(0, 1\], got 1.5"),
    ({"train_size": "all"}, TypeError, r"train_size must be a number in \(0, 1\]"),
    ({"validation_size": 1.0}, ValueError, r"validation_size must be a finite number in \[0, 1\)"),
    ({"validation_size": -0.1}, ValueError, r"validation_size must be a finite number in \[0, 1"),
    (
        {"train_size": 0.8, "validation_size": 0.3},
        ValueError,
        r"train_size \(0.8\) \+ validation_size \(0.3\) must be at most 1",
    ),
    (
        {"validation_size": 0.2},
        ValueError,
        r"train_size \(0.9 by default\) \+ validation_size \(0.2\) must be at most 1",
    ),
    ({"mode": "bogus"}, ValueError, "mode must be one of .*, got 'bogus'"),
    ({"early_stopping": "yes"}, TypeError, "early_stopping must be True or False, got 'yes'"),
    ({"shuffle_set_split": 1}, TypeError, "shuffle_set_split must be True or False, got 1"),
    ({"batch_adversarial": -1.0}, ValueError, r"batch_adversarial must be a finite number"),
    ({"checkpoint_every_n_steps": 0}, ValueError, "checkpoint_every_n_steps must be an integer"),
    ({"ckpt_path": "last"}, ValueError, 'ckpt_path="last" resumes from the checkpoints of'),
    ({"ckpt_path": 3}, TypeError, 'ckpt_path must be None, "last" or a file path, got 3'),
    ({"ckpt_path": "missing.ckpt"}, FileNotFoundError, "'missing.ckpt' is not a checkpoint"),
    ({"checkpoint_dir": 7}, TypeError, "checkpoint_dir must be a folder path, got 7"),
    ({"plan_kwargs": [("lr", 1)]}, TypeError, "plan_kwargs must be a dict of keyword arguments"),
    ({"datasplitter_kwargs": "x"}, TypeError, "datasplitter_kwargs must be a dict of keyword"),
    ({"trainer_kwargs": 1}, TypeError, "trainer_kwargs must be a dict of keyword arguments"),
    (
        {"trainer_kwargs": {"max_time": 5}, "max_time": 5},
        ValueError,
        r"\['max_time'\] given both in trainer_kwargs and as keyword arguments",
    ),
    ({"trainer_kwargs": {"batch_size": 4}}, ValueError, r"\['batch_size'\] are not Trainer"),
    ({"datamodule": object()}, NotImplementedError, "does not take a `datamodule` yet"),
]


@pytest.mark.parametrize("name", CLASSES)
def test_bad_arguments_raise_before_any_work(models, name):
    model = models[name]
    before = {k: v.clone() for k, v in model.module.state_dict().items()}
    for kwargs, error, message in BAD:
        with pytest.raises(error, match=message):
            model.train(**kwargs)
    assert model.history_ is None and not model.is_trained_  # nothing ran
    after = model.module.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("name", ["SCBERT", "SCFoundation"])
def test_checkpoint_files_are_checked(models, name, tmp_path):
    model = models[name]
    folder = tmp_path / "a_file"
    folder.write_text("not a folder")
    with pytest.raises(ValueError, match="is not a folder"):
        model.train(checkpoint_dir=folder)
    pickled = tmp_path / "code.ckpt"
    torch.save({"state_dict": {}, "hook": inspect.signature}, pickled)
    with pytest.raises(ValueError, match=r"loads safely with torch.load\(weights_only=True\)"):
        model.train(ckpt_path=pickled)
