"""Resumable training: a run killed mid-epoch and resumed ends with the uninterrupted weights."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import scvi
import torch
from lightning.pytorch.callbacks import Callback

import cellformers as cf

MAX_EPOCHS = 3


class _Slow(Callback):
    """Sleep after every step, so that a test can kill the process mid-run."""

    def on_train_batch_end(self, *args):
        time.sleep(0.3)


def small_cellbench(n_cells: int, n_genes: int, *, seed: int):
    """Random CellBench cells with the genes detected in most of them."""
    adata = cf.data.cellbench_2platform()
    keep = np.sort(np.random.default_rng(seed).choice(adata.n_obs, n_cells, replace=False))
    adata = adata[keep].copy()
    detected = np.asarray((adata.X > 0).mean(0)).ravel()
    return adata[:, np.argsort(-detected, kind="stable")[:n_genes]].copy()


def train_tiny(
    name: str, checkpoint_dir, *, slow: bool = False, batch_size: int = 8, num_workers: int = 0
) -> dict[str, torch.Tensor]:
    """Train a tiny model on 48 CellBench cells, resuming from ``checkpoint_dir`` if it can."""
    adata = small_cellbench(48, 120, seed=1)
    scvi.settings.seed = 0
    if name == "SCBERT":  # fine-tuning
        cf.model.SCBERT.setup_anndata(adata, labels_key="cell_line")
        model = cf.model.SCBERT(
            adata, n_labels=3, dim=16, depth=2, heads=2, dim_head=8, classifier_hidden=(16, 16)
        )
        mode = "finetune"
    else:  # masked pretraining with dropout and a random gene subset per long cell
        cf.model.SCGPT.setup_anndata(adata)
        model = cf.model.SCGPT(
            adata, d_model=16, nhead=2, d_hid=16, nlayers=1, dropout=0.2, max_seq_len=24
        )
        mode = "pretrain"
    model.train(
        max_epochs=MAX_EPOCHS,
        mode=mode,
        batch_size=batch_size,
        train_size=0.75,
        checkpoint_dir=checkpoint_dir,
        checkpoint_every_n_steps=2,
        ckpt_path=None if checkpoint_dir is None else "last",
        datasplitter_kwargs={"num_workers": num_workers},
        enable_progress_bar=False,
        callbacks=[_Slow()] if slow else [],
    )
    return model.module.state_dict()


def _start_killable_run(tmp_path: Path, name: str) -> subprocess.Popen:
    code = f"import test_resume; test_resume.train_tiny({name!r}, {str(tmp_path)!r}, slow=True)"
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), *sys.path]),
    }
    with open(tmp_path / "killed.log", "wb") as log:
        return subprocess.Popen([sys.executable, "-c", code], env=env, stdout=log, stderr=log)


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the killed process, so that float sums agree
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("name", ["SCBERT", "SCGPT"])
def test_killed_run_resumes_to_the_uninterrupted_weights(
    tmp_path, cellbench_path, name, one_thread
):
    killed = _start_killable_run(tmp_path, name)
    last = tmp_path / cf.train.LAST_CHECKPOINT
    deadline = time.monotonic() + 240
    while not last.exists() and killed.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.4)  # a step runs past the checkpoint
    killed.send_signal(signal.SIGKILL)
    assert killed.wait() == -signal.SIGKILL, (tmp_path / "killed.log").read_text()[-3000:]
    # the checkpoint holds only tensors and plain values; it is mid-epoch, before the end
    checkpoint = torch.load(last, weights_only=True)
    state = checkpoint["cellformers_resume"]
    assert 0 < state["batches_done"] < state["batches_per_epoch"]
    assert 0 < checkpoint["global_step"] < MAX_EPOCHS * state["batches_per_epoch"]

    # the uninterrupted run (in an empty checkpoint folder, ckpt_path="last" starts afresh)
    expected = train_tiny(name, tmp_path / "reference")
    got = train_tiny(name, tmp_path)  # resumes in this process
    assert expected.keys() == got.keys()
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=0, atol=1e-6, msg=key)
    if name == "SCBERT":
        # checkpointing does not change the run
        without = train_tiny(name, None)
        assert all(torch.equal(without[key], value) for key, value in expected.items())
        # a resumed run must read the data as the run that wrote the checkpoint
        with pytest.raises(ValueError, match="minibatches per epoch, this run has"):
            train_tiny(name, tmp_path, batch_size=4)


def test_data_loader_workers_do_not_change_the_run(cellbench_path, one_thread):
    # scGPT draws a random gene subset for long cells while loading each minibatch
    expected = train_tiny("SCGPT", None)
    got = train_tiny("SCGPT", None, num_workers=2)
    assert all(torch.equal(got[key], value) for key, value in expected.items())
