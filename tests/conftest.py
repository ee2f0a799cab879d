from __future__ import annotations

import importlib
import os
import sys
import warnings
from pathlib import Path

# GNU OpenMP's default spin-waiting makes every small multi-threaded torch op wait for a
# scheduler tick on machines whose vCPUs are shared; sleeping threads avoid that. It must be set
# before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest

TESTS = Path(__file__).parent
sys.path.insert(0, str(TESTS))  # shared helpers such as official_scgpt.py
SHARED_DATA = TESTS.parent.parent / "shared" / "data"

# Point the dataset registry at the shared data folder when it is there, so tests need no network.
if "CELLFORMERS_DATA" not in os.environ and SHARED_DATA.is_dir():
    os.environ["CELLFORMERS_DATA"] = str(SHARED_DATA)


@pytest.fixture(scope="session")
def official_scgpt():
    """The official scGPT package (0.2.4), importable on CPU with a stand-in torchtext."""
    if importlib.util.find_spec("scgpt") is None:
        pytest.skip("official scgpt is not installed (pip install --no-deps scgpt==0.2.4)")
    if importlib.util.find_spec("torchtext") is None:
        sys.path.insert(0, str(TESTS / "stubs"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return importlib.import_module("scgpt")


@pytest.fixture(scope="session")
def cellbench_path():
    from cellformers.data import is_available

    if not is_available("cellbench_2platform"):
        pytest.skip(
            "cellbench_2platform.h5ad not found: set CELLFORMERS_DATA to the shared data folder"
        )
    from cellformers.data import fetch_file

    return fetch_file("cellbench_2platform")


@pytest.fixture
def cellbench(cellbench_path):
    import anndata as ad

    return ad.read_h5ad(cellbench_path)


@pytest.fixture
def pbmc_counts():
    from cellformers.data import pbmc68k_reduced_counts

    return pbmc68k_reduced_counts()


@pytest.fixture(scope="module")
def merfish_cells():
    """40 MERFISH cells of the mouse motor cortex (253-gene panel, mouse symbols, obsm["spatial"])."""
    import anndata as ad

    from cellformers.data import fetch_file, is_available

    if not is_available("merfish_motor_cortex"):
        pytest.skip("merfish_motor_cortex.h5ad not found: set CELLFORMERS_DATA")
    return ad.read_h5ad(fetch_file("merfish_motor_cortex"))[:40].copy()
