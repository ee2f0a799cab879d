"""Two-process data-parallel training on CPU goes through Lightning unchanged."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

SCRIPT = textwrap.dedent(
    """
    import sys

    import numpy as np
    import torch

    import cellformers as cf
    from cellformers.model import SCGPT

    if __name__ == "__main__":
        out = sys.argv[1]
        adata = cf.data.pbmc68k_reduced_counts()[:256].copy()
        SCGPT.setup_anndata(adata, layer="counts")
        torch.manual_seed(0)
        model = SCGPT(adata, d_model=16, nhead=2, d_hid=16, nlayers=1, max_seq_len=64, dropout=0.0)
        model.train(
            max_epochs=2, batch_size=32, lr=1e-3, accelerator="cpu", devices=2, strategy="ddp",
            train_size=0.9, check_val_every_n_epoch=1, enable_progress_bar=False,
        )
        rank = model.trainer.global_rank
        weights = torch.cat([p.detach().flatten() for p in model.module.parameters()]).numpy()
        np.save(f"{out}/weights_rank{rank}.npy", weights)
        if model.trainer.is_global_zero:
            np.save(f"{out}/history.npy", model.history["validation_loss"].to_numpy(dtype=float))
    """
)


GENEFORMER_SCRIPT = textwrap.dedent(
    """
    import sys

    import numpy as np
    import torch

    import cellformers as cf
    from cellformers.model import Geneformer

    if __name__ == "__main__":
        out = sys.argv[1]
        adata = cf.data.cellbench_2platform()[:128].copy()
        Geneformer.setup_anndata(adata, gene_key="ensembl_id", labels_key="cell_line")
        torch.manual_seed(0)
        model = Geneformer(
            adata, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=16, max_input_size=64,
        )
        common = dict(
            max_epochs=1, batch_size=16, accelerator="cpu", devices=2, strategy="ddp",
            train_size=0.9, check_val_every_n_epoch=1, enable_progress_bar=False,
        )
        model.train(**common)  # the classifier idles: DDP must be told
        model.train(mode="finetune", freeze_layers=1, **common)  # the masked-LM head idles
        rank = model.trainer.global_rank
        weights = torch.cat([p.detach().flatten() for p in model.module.parameters()]).numpy()
        np.save(f"{out}/weights_rank{rank}.npy", weights)
        if model.trainer.is_global_zero:
            np.save(f"{out}/history.npy", model.history["validation_loss"].to_numpy(dtype=float))
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("script_text", [SCRIPT, GENEFORMER_SCRIPT], ids=["scgpt", "geneformer"])
def test_two_process_ddp_on_cpu(tmp_path, script_text):
    script = tmp_path / "train_ddp.py"
    script.write_text(script_text)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, str(script), str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    w0 = np.load(tmp_path / "weights_rank0.npy")
    w1 = np.load(tmp_path / "weights_rank1.npy")
    np.testing.assert_array_equal(w0, w1)  # gradients were synchronised
    history = np.load(tmp_path / "history.npy")
    assert history.shape[0] >= 1 and np.isfinite(history).all()
