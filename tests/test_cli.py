"""The ``cellformers`` command line on real cells (CellBench) with a tiny saved scGPT model."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pytest

from cellformers.cli import main

SRC = Path(__file__).parents[1] / "src"
N_CELLS = 40
N_GENES = 3000


def _run(*args, timeout=600):
    """Run the command in a fresh interpreter, as a user would."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
    }
    return subprocess.run(
        [sys.executable, "-m", "cellformers.cli", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def small_h5ad(tmp_path_factory, cellbench_path):
    """40 CellBench cells (both platforms) and 3,000 genes, EGFR and KRAS among them, as a file."""
    adata = ad.read_h5ad(cellbench_path)
    cells = np.r_[0:20, adata.n_obs - 20 : adata.n_obs]
    genes = np.union1d(np.arange(N_GENES - 2), adata.var_names.get_indexer(["EGFR", "KRAS"]))
    path = tmp_path_factory.mktemp("cli") / "cells.h5ad"
    adata[cells, genes].copy().write_h5ad(path)
    return path


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory, small_h5ad):
    """A tiny scGPT with a 3-class head, saved with ``model.save``."""
    import scvi

    from cellformers.model import SCGPT

    scvi.settings.seed = 0
    adata = ad.read_h5ad(small_h5ad)
    SCGPT.setup_anndata(adata, labels_key="cell_line")
    model = SCGPT(adata, d_model=16, nhead=2, d_hid=16, nlayers=1, max_seq_len=64, n_labels=3)
    model.is_trained_ = True
    model.finetuned_ = True  # a random head stands in for a fine-tuned one
    path = tmp_path_factory.mktemp("cli") / "tiny_scgpt"
    model.save(path)
    return path, model.get_latent_representation(), model.predict_celltype()


# ---------------------------------------------------------------------------------- help
def test_cli_module_help_is_fast_and_does_not_import_torch():
    """``cli.py`` alone parses and prints help without torch (imports are inside commands)."""
    code = (
        "import importlib.util, sys, time\n"
        f"spec = importlib.util.spec_from_file_location('cli', {str(SRC / 'cellformers' / 'cli.py')!r})\n"
        "cli = importlib.util.module_from_spec(spec); t = time.perf_counter()\n"
        "spec.loader.exec_module(cli)\n"
        "for argv in (['--help'], ['embed', '--help']):\n"
        "    try: cli.main(argv)\n"
        "    except SystemExit as e: assert e.code == 0\n"
        "assert cli.main(['--version']) == 0\n"
        "print('TIME', time.perf_counter() - t, 'torch' in sys.modules, 'anndata' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    line = next(x for x in out.stdout.splitlines() if x.startswith("TIME"))
    _, seconds, torch_loaded, anndata_loaded = line.split()
    assert torch_loaded == "False" and anndata_loaded == "False"
    assert float(seconds) < 2.0
    assert "embed" in out.stdout and "--key-added" in out.stdout


def test_help_command_under_two_seconds():
    """``cellformers --help`` end to end (needs the package ``__init__`` to import lazily)."""
    probe = subprocess.run(
        [sys.executable, "-c", "import sys, cellformers; print('torch' in sys.modules)"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(SRC)},
        timeout=300,
    )
    if probe.stdout.strip() == "True":
        pytest.xfail("cellformers/__init__.py imports its subpackages (and torch) eagerly")
    start = time.perf_counter()
    out = _run("--help", timeout=60)
    assert out.returncode == 0 and "embed" in out.stdout
    assert time.perf_counter() - start < 2.0


# ---------------------------------------------------------------------------------- embed
def test_embed_subprocess_writes_obsm_and_keeps_the_rest(tmp_path, small_h5ad, saved_model):
    folder, expected, _ = saved_model
    out = tmp_path / "out.h5ad"
    res = _run("embed", small_h5ad, "--model", folder, "-o", out, "--batch-size", "7", "-q")
    assert res.returncode == 0, res.stderr
    written = ad.read_h5ad(out)
    original = ad.read_h5ad(small_h5ad)
    np.testing.assert_allclose(written.obsm["X_scgpt"], expected, rtol=0, atol=1e-5)
    assert (written.X != original.X).nnz == 0
    assert list(written.obs.columns) == list(original.obs.columns)
    assert "_scvi_uuid" not in written.uns and "_scvi_manager_uuid" not in written.uns


def test_embed_backed_subprocess(tmp_path, small_h5ad, saved_model):
    folder, expected, _ = saved_model
    out = tmp_path / "out.h5ad"
    res = _run("embed", small_h5ad, "-m", folder, "-o", out, "--backed", "--key-added", "emb", "-q")
    assert res.returncode == 0, res.stderr
    np.testing.assert_allclose(ad.read_h5ad(out).obsm["emb"], expected, rtol=0, atol=1e-5)


def test_user_errors_are_one_line_with_non_zero_exit(tmp_path, small_h5ad):
    res = _run("embed", small_h5ad, "--model", "no-such-model", "-o", tmp_path / "o.h5ad")
    assert res.returncode == 1
    assert res.stderr.strip().startswith("cellformers: error:")
    assert len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.stderr
    assert not (tmp_path / "o.h5ad").exists()


def test_errors_in_process(tmp_path, small_h5ad, saved_model, capsys):
    folder, _, _ = saved_model
    missing = tmp_path / "missing.h5ad"
    assert main(["embed", str(missing), "-m", str(folder), "-o", str(tmp_path / "o.h5ad")]) == 1
    assert "does not exist" in capsys.readouterr().err
    out = tmp_path / "exists.h5ad"
    out.write_bytes(b"")
    assert main(["embed", str(small_h5ad), "-m", str(folder), "-o", str(out)]) == 1
    assert "--overwrite" in capsys.readouterr().err
    argv = ["embed", str(small_h5ad), "-m", str(folder), "-o", str(tmp_path / "x.h5ad")]
    assert main([*argv, "--layer", "no_such_layer"]) == 1
    assert "no_such_layer" in capsys.readouterr().err
    assert main([*argv, "--batch-size", "0"]) == 1
    assert main(["embed", str(small_h5ad), "-m", "scbert", "-o", str(tmp_path / "y.h5ad")]) == 1
    with pytest.raises(SystemExit) as e:
        main(["embed", str(small_h5ad)])  # --model and -o are required
    assert e.value.code == 2


def test_embed_query_with_other_genes_and_no_labels(tmp_path, small_h5ad, saved_model):
    """A saved model reads any cells: here fewer genes, in another order, without labels."""
    from cellformers.model import SCGPT

    folder, _, _ = saved_model
    query = ad.read_h5ad(small_h5ad)[:, ::-2].copy()
    del query.obs["cell_line"]
    path, out = tmp_path / "query.h5ad", tmp_path / "query_emb.h5ad"
    query.write_h5ad(path)
    assert main(["embed", str(path), "-m", str(folder), "-o", str(out), "-q"]) == 0
    expected = SCGPT.load(folder, adata=ad.read_h5ad(small_h5ad)).get_latent_representation(query)
    np.testing.assert_allclose(ad.read_h5ad(out).obsm["X_scgpt"], expected, atol=1e-6)


# ---------------------------------------------------------------------------------- others
def test_annotate_writes_labels(tmp_path, small_h5ad, saved_model, capsys):
    folder, _, predicted = saved_model
    out = tmp_path / "annotated.h5ad"
    assert main(["annotate", str(small_h5ad), "-m", str(folder), "-o", str(out), "-q"]) == 0
    written = ad.read_h5ad(out)
    assert list(written.obs["cf_celltype"].astype(str)) == list(predicted)
    assert written.obs["cf_celltype_probability"].between(0, 1).all()
    assert "cell_line" in written.obs and "Wrote obs['cf_celltype']" in capsys.readouterr().out


def test_perturb_writes_cells_by_perturbations(tmp_path, small_h5ad, saved_model):
    folder, _, _ = saved_model
    out = tmp_path / "perturbed.h5ad"
    argv = ["perturb", str(small_h5ad), "-m", str(folder), "-o", str(out), "--genes", "EGFR"]
    assert main([*argv, "--mode", "knockdown", "--factor", "0.1", "-q"]) == 0
    result = ad.read_h5ad(out)
    assert result.shape == (N_CELLS, 1) and list(result.var_names) == ["EGFR"]
    assert result.uns["perturb"]["mode"] == "knockdown"
    assert main([*argv, "NOT_A_GENE", "--overwrite"]) == 1


def test_convert_and_info_of_an_official_folder(tmp_path, small_h5ad, capsys):
    """An official scGPT folder (real vocabulary layout) converts to a saved model and is described."""
    import torch
    from tiny_checkpoints import tiny_scgpt_folder

    from cellformers.genes import GeneVocab

    genes = list(ad.read_h5ad(small_h5ad, backed="r").var_names)
    folder = tiny_scgpt_folder(tmp_path / "scGPT_tiny", GeneVocab.from_tokens(genes))
    state = torch.load(folder / "best_model.pt", weights_only=True)

    assert main(["info", str(folder), "--data", str(small_h5ad)]) == 0
    text = capsys.readouterr().out
    n = len(genes)
    assert "scGPT (official folder" in text and f"vocabulary:  {n:,} genes" in text
    assert f"Matched {n:,} of {n:,} genes" in text
    n_values = sum(v.numel() for v in state.values())
    assert f"parameters:  {n_values:,} values" in text

    saved = tmp_path / "converted"
    assert main(["convert", str(folder), "-o", str(saved), "--data", str(small_h5ad)]) == 0
    assert main(["info", str(saved)]) == 0
    assert "SCGPT (saved cellformers model)" in capsys.readouterr().out
    out = tmp_path / "emb.h5ad"
    assert main(["embed", str(small_h5ad), "-m", str(saved), "-o", str(out), "-q"]) == 0
    direct = tmp_path / "direct.h5ad"
    assert main(["embed", str(small_h5ad), "-m", str(folder), "-o", str(direct), "-q"]) == 0
    np.testing.assert_allclose(
        ad.read_h5ad(out).obsm["X_scgpt"], ad.read_h5ad(direct).obsm["X_scgpt"], atol=1e-6
    )


def test_list_and_info_of_registered_names(capsys):
    assert main(["list"]) == 0
    text = capsys.readouterr().out
    assert "geneformer-v2-104m" in text and "scbert" in text
    assert main(["info", "geneformer-v1-10m"]) == 0  # V1 dictionaries come from the data folder
    text = capsys.readouterr().out
    assert "Geneformer (cellformers.model.Geneformer)" in text
    assert "a5e33a757431643b3697de7ef6127950cdc49e06e58d4266b3a3ab191b683f14" in text
    assert "vocabulary:  25,424 genes" in text


def test_demo_minutes_is_a_cap(tmp_path):
    import re

    minutes = 1.0
    res = _run("demo", "--minutes", minutes, "--outdir", tmp_path, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    assert (tmp_path / "umap_scgpt_pbmc68k.png").is_file()
    assert (tmp_path / "umap_pca_pbmc68k.png").is_file()
    assert "kNN label transfer" in res.stdout
    epochs = int(re.search(r"Pretrained (\d+) epochs", res.stdout).group(1))
    total = float(re.search(r"Finished in ([\d.]+) s", res.stdout).group(1))
    assert epochs >= 1
    assert total <= minutes * 60 + 5  # everything after the imports, within the budget
