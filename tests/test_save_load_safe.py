"""Saving and loading models: no pickle, all-or-nothing saves, old saves refused."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from test_lora import MODELS, _model

import cellformers as cf
from cellformers._io import (
    atomic_write,
    decode_json_value,
    encode_json_value,
    file_inside,
)


@pytest.fixture(scope="module")
def cells():
    """40 CellBench cells on their 120 most detected genes."""
    adata = cf.data.cellbench_2platform()[:40].copy()
    detected = np.asarray((adata.X > 0).mean(0)).ravel()
    return adata[:, np.argsort(-detected, kind="stable")[:120]].copy()


def _state(model):
    return {k: v.detach().clone() for k, v in model.module.state_dict().items()}


def _same_state(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class _Planted:
    """Pickles into a call that writes a marker file when unpickled."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "ran"))


@pytest.mark.parametrize("name", list(MODELS))
def test_round_trip_and_no_pickle(cells, name, tmp_path):
    model = _model(cells, name)
    model.add_lora(rank=2)
    model.history_ = {"train_loss": __import__("pandas").DataFrame({"train_loss": [1.0, 0.5]})}
    z = model.get_latent_representation()
    model.save(tmp_path / "m", save_anndata=True)
    files = sorted(p.name for p in (tmp_path / "m").iterdir())
    assert files == ["adata.h5ad", "model.json", "model.safetensors"]
    meta = json.loads((tmp_path / "m" / "model.json").read_text())
    assert meta["model_class"] == type(model).__name__
    loaded = type(model).load(tmp_path / "m")
    assert _same_state(_state(loaded), _state(model))
    assert loaded.lora_ == model.lora_ and loaded.init_params_ == model.init_params_
    assert loaded.history_["train_loss"].equals(model.history_["train_loss"])
    np.testing.assert_array_equal(loaded.get_latent_representation(), z)
    # the registry (numpy arrays inside) comes back exactly
    again = type(model).load(tmp_path / "m", adata=model.adata)
    np.testing.assert_array_equal(
        again.adata_manager.registry["field_registries"]["labels"]["state_registry"][
            "categorical_mapping"
        ],
        model.adata_manager.registry["field_registries"]["labels"]["state_registry"][
            "categorical_mapping"
        ],
    )
    assert (
        type(model).load_registry(tmp_path / "m")["setup_args"]
        == (model.adata_manager.registry["setup_args"])
    )
    with pytest.raises(ValueError, match="already exists"):
        model.save(tmp_path / "m")
    # no leftovers next to the folder
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == ["m"]


@pytest.mark.parametrize("name", list(MODELS))
def test_pickled_model_pt_is_refused_and_runs_nothing(cells, name, tmp_path):
    model = _model(cells, name)
    marker = tmp_path / "marker"
    folder = tmp_path / "old"
    folder.mkdir()
    with open(folder / "model.pt", "wb") as f:
        pickle.dump({"model_state_dict": _Planted(marker)}, f)
    with pytest.raises(ValueError, match="pickle format.*refused"):
        type(model).load(folder, adata=model.adata)
    with pytest.raises(ValueError, match="pickle format.*refused"):
        type(model).load_registry(folder)
    with pytest.raises(ValueError, match="pickle format.*refused"):
        type(model).view_setup_args(folder)
    assert not marker.exists()
    # conversion needs the explicit opt-in; without it nothing is read
    with pytest.raises(ValueError, match="trust_pickle=True"):
        type(model).convert_legacy_save(folder, tmp_path / "new")
    assert not marker.exists() and not (tmp_path / "new").exists()


def test_scgpt_query_folder_uses_the_safe_reader(cells, tmp_path):
    model = _model(cells, "scgpt")
    marker = tmp_path / "marker"
    (tmp_path / "ref").mkdir()
    with open(tmp_path / "ref" / "model.pt", "wb") as f:
        pickle.dump(_Planted(marker), f)
    with pytest.raises(ValueError, match="refused"):
        cf.model.SCGPT.load_query_data(model.adata.copy(), tmp_path / "ref")
    assert not marker.exists()


def test_legacy_save_converts_with_opt_in(cells, tmp_path):
    from scvi.model.base import BaseModelClass

    model = _model(cells, "scbert")
    BaseModelClass.save(model, str(tmp_path / "old"))  # the scvi-tools pickle format
    with pytest.raises(ValueError, match="convert_legacy_save"):
        cf.model.SCBERT.load(tmp_path / "old", adata=model.adata)
    cf.model.SCBERT.convert_legacy_save(tmp_path / "old", tmp_path / "new", trust_pickle=True)
    loaded = cf.model.SCBERT.load(tmp_path / "new", adata=model.adata)
    assert _same_state(_state(loaded), _state(model))


def test_json_encoding_round_trips():
    import pandas as pd

    value = {
        "a": (1, "x", None),
        "b": np.array(["g1", "g2"], dtype=object),
        "c": np.arange(6, dtype=np.int64).reshape(2, 3),
        "d": {1: 2.5, "k": [True, np.float32(1.5)]},
        "e": pd.DataFrame({"loss": [0.1, np.nan]}, index=pd.Index([0, 1], name="epoch")),
    }
    back = decode_json_value(json.loads(json.dumps(encode_json_value(value))))
    assert back["a"] == (1, "x", None) and back["d"] == {1: 2.5, "k": [True, 1.5]}
    assert back["b"].dtype == object and list(back["b"]) == ["g1", "g2"]
    np.testing.assert_array_equal(back["c"], value["c"])
    assert back["c"].dtype == np.int64
    pd.testing.assert_frame_equal(back["e"], value["e"])
    with pytest.raises(TypeError, match="Cannot save"):
        encode_json_value({"f": object()})
    with pytest.raises(ValueError, match="unknown encoded type"):
        decode_json_value({"__cellformers_type__": "pickle"})


def test_file_inside_refuses_escapes(tmp_path):
    assert file_inside(tmp_path, "a.bin", source="index") == (tmp_path / "a.bin").resolve()
    for name in ("../x", "/etc/passwd", "sub/../../x", ""):
        with pytest.raises(ValueError, match="index"):
            file_inside(tmp_path, name, source="index")


def test_concurrent_writer_gets_a_clear_error(tmp_path):
    with atomic_write(tmp_path / "m") as tmp:
        (tmp / "f").write_text("1")
        with pytest.raises(RuntimeError, match="Another process is writing"):
            with atomic_write(tmp_path / "m", overwrite=True):
                pass
    assert (tmp_path / "m" / "f").read_text() == "1"


_SAVER = """
import sys, numpy as np, scvi, torch
sys.path.insert(0, {tests!r})
import anndata as ad
from test_lora import MODELS
cls, setup, arch = MODELS["scbert"]
adata = ad.read_h5ad({adata!r})
cls.setup_anndata(adata, labels_key="cell_line")
model = cls(adata, **arch)
i = 0
print("ready", flush=True)
while True:
    i += 1
    with torch.no_grad():
        for p in model.module.parameters():
            p.fill_(float(i))
    model.save({out!r}, overwrite=True, save_anndata=True)
"""


def _check_snapshot(folder):
    """The saved model in ``folder`` loads and all its weights come from one save."""
    loaded = cf.model.SCBERT.load(folder)  # also reads the saved AnnData
    values = {float(v) for p in loaded.module.parameters() for v in p.detach().unique()}
    assert len(values) == 1, values  # weights of one save only, never a mixture
    return values.pop()


def test_killed_save_leaves_old_or_new(cells, tmp_path):
    """A writer stopped at many moments leaves, on disk, the old or the new save.

    The writer saves over its previous save in a loop. It is frozen (SIGSTOP) after various
    delays and the folder and its siblings are copied: exactly what a kill at that moment
    would leave. Each copy must load (after the cleanup that load does) as one whole save.
    At the end the writer is killed for real and the folder must load too.
    """
    adata_path = tmp_path / "cells.h5ad"
    cells.write_h5ad(adata_path)
    work = tmp_path / "work"
    code = _SAVER.format(
        tests=str(Path(__file__).parent), adata=str(adata_path), out=str(work / "m")
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env
    )
    seen = []
    try:
        assert proc.stdout.readline().strip() == b"ready"
        rng = np.random.default_rng(0)
        while not (work / "m").exists():
            time.sleep(0.01)
        for i, delay in enumerate(rng.uniform(0.0, 0.2, 8)):
            time.sleep(delay)
            os.kill(proc.pid, signal.SIGSTOP)
            try:
                snapshot = tmp_path / f"snap{i}"
                shutil.copytree(work, snapshot)
            finally:
                os.kill(proc.pid, signal.SIGCONT)
            seen.append(_check_snapshot(snapshot / "m"))
            shutil.rmtree(snapshot)
    finally:
        proc.kill()
        proc.wait()
    seen.append(_check_snapshot(work / "m"))
    assert len(set(seen)) > 2  # the saves went on between the snapshots
