"""Resumable training: a run killed mid-epoch and resumed ends with the uninterrupted weights."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

# Trains a tiny model on 48 CellBench cells and saves its final weights. A third argument
# "slow" sleeps after every step, so that the test can kill the process mid-run.
SCRIPT = """
import sys, time
import numpy as np
import scvi
import torch
from lightning.pytorch.callbacks import Callback
import cellformers as cf

name, ckpt_dir, out = sys.argv[1:4]
slow = sys.argv[4:] == ["slow"]
adata = cf.data.cellbench_2platform()
keep = np.sort(np.random.default_rng(1).choice(adata.n_obs, 48, replace=False))
adata = adata[keep].copy()
detected = np.asarray((adata.X > 0).mean(0)).ravel()
adata = adata[:, np.argsort(-detected, kind="stable")[:120]].copy()
scvi.settings.seed = 0
if name == "SCBERT":
    cf.model.SCBERT.setup_anndata(adata, labels_key="cell_line")
    model = cf.model.SCBERT(
        adata, n_labels=3, dim=16, depth=2, heads=2, dim_head=8, classifier_hidden=(16, 16)
    )
    mode = "finetune"
else:
    cf.model.SCGPT.setup_anndata(adata)
    model = cf.model.SCGPT(
        adata, d_model=16, nhead=2, d_hid=16, nlayers=1, dropout=0.2, max_seq_len=24
    )
    mode = "pretrain"


class Slow(Callback):
    def on_train_batch_end(self, *args):
        time.sleep(0.3)


model.train(
    max_epochs=3,
    mode=mode,
    batch_size=8,
    train_size=0.75,
    checkpoint_dir=ckpt_dir,
    checkpoint_every_n_steps=2,
    ckpt_path="last",
    enable_progress_bar=False,
    callbacks=[Slow()] if slow else [],
)
torch.save(model.module.state_dict(), out)
"""


def _run(tmp_path, name, tag, *extra):
    script = tmp_path / "train_tiny.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    args = [sys.executable, str(script), name, str(tmp_path / f"ckpt_{tag}")]
    args += [str(tmp_path / f"{tag}.pt"), *extra]
    log = open(tmp_path / f"{tag}.log", "ab")  # noqa: SIM115 - closed with the process
    return subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT)


def _output(tmp_path, tag):
    return (tmp_path / f"{tag}.log").read_text()[-3000:]


@pytest.mark.parametrize("name", ["SCBERT", "SCGPT"])
def test_killed_run_resumes_to_the_uninterrupted_weights(tmp_path, cellbench_path, name):
    reference = _run(tmp_path, name, "reference")  # no checkpoint yet: starts afresh
    killed = _run(tmp_path, name, "resumed", "slow")
    last = tmp_path / "ckpt_resumed" / "last.ckpt"
    deadline = time.monotonic() + 120
    while not last.exists() and killed.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.4)  # one more step runs past the checkpoint
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert killed.returncode == -signal.SIGKILL, _output(tmp_path, "resumed")
    assert last.exists()
    # the checkpoint holds only tensors and plain values, mid-epoch and before the end
    checkpoint = torch.load(last, weights_only=True)
    state = checkpoint["cellformers_resume"]
    total = 3 * state["batches_per_epoch"]
    assert 0 < state["batches_done"] < state["batches_per_epoch"]
    assert 0 < checkpoint["global_step"] < total
    assert not (tmp_path / "resumed.pt").exists()

    resumed = _run(tmp_path, name, "resumed")
    for process, tag in ((reference, "reference"), (resumed, "resumed")):
        assert process.wait(timeout=300) == 0, _output(tmp_path, tag)
    expected = torch.load(tmp_path / "reference.pt", weights_only=True)
    got = torch.load(tmp_path / "resumed.pt", weights_only=True)
    assert expected.keys() == got.keys()
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=0, atol=1e-6, msg=key)
