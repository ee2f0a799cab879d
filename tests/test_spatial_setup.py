"""Registration of spatial coordinates (``spatial_key``) for every model class."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from cellformers.model import SCBERT, SCGPT, Geneformer, SCFoundation

md = pytest.importorskip("mudata")

CLASSES = [SCGPT, Geneformer, SCBERT, SCFoundation]


@pytest.fixture
def merfish(merfish_cells):
    return merfish_cells.copy()


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_spatial_key_is_registered(merfish, cls):
    before = merfish.obsm["spatial"].copy()
    cls.setup_anndata(merfish, spatial_key="spatial")
    manager = cls._get_most_recent_anndata_manager(merfish, required=True)
    assert manager.registry["setup_args"]["spatial_key"] == "spatial"
    np.testing.assert_array_equal(np.asarray(manager.get_from_registry("spatial")), before)
    np.testing.assert_array_equal(merfish.obsm["spatial"], before)  # untouched


def test_spatial_key_in_setup_mudata(merfish):
    mdata = md.MuData({"rna": merfish})
    with pytest.raises(KeyError, match="spatial_key 'spatial' not found in mdata.obsm"):
        SCGPT.setup_mudata(mdata, spatial_key="spatial")
    SCGPT.setup_mudata(mdata, spatial_key="spatial", modalities={"spatial_key": "rna"})
    manager = SCGPT._get_most_recent_anndata_manager(mdata, required=True)
    np.testing.assert_array_equal(
        np.asarray(manager.get_from_registry("spatial")), merfish.obsm["spatial"]
    )
    mdata.obsm["xy"] = merfish.obsm["spatial_rotated"]  # global coordinates
    Geneformer.setup_mudata(mdata, spatial_key="xy")
    manager = Geneformer._get_most_recent_anndata_manager(mdata, required=True)
    np.testing.assert_array_equal(
        np.asarray(manager.get_from_registry("spatial")), merfish.obsm["spatial_rotated"]
    )


def test_3d_and_dataframe_coordinates_are_accepted(merfish):
    xyz = np.c_[merfish.obsm["spatial"], np.arange(merfish.n_obs)]
    merfish.obsm["xyz"] = pd.DataFrame(xyz, index=merfish.obs_names, columns=["x", "y", "z"])
    SCBERT.setup_anndata(merfish, spatial_key="xyz")


@pytest.mark.parametrize(
    "coords, match",
    [
        (lambda a: a.obsm["spatial"][:, :1], r"shape \(n_cells, 2\) or \(n_cells, 3\).*\(40, 1\)"),
        (lambda a: np.c_[a.obsm["spatial"], a.obsm["spatial"]], r"got shape \(40, 4\)"),
        (
            lambda a: np.where(np.arange(40)[:, None] == 3, np.nan, a.obsm["spatial"]),
            "NaN.*1 cells",
        ),
        (lambda a: np.full((40, 2), "a"), "must hold numbers"),
    ],
    ids=["one column", "four columns", "NaN", "strings"],
)
def test_bad_coordinates_are_refused(merfish, coords, match):
    merfish.obsm["bad"] = coords(merfish)
    with pytest.raises(ValueError, match=match):
        SCFoundation.setup_anndata(merfish, spatial_key="bad")
    with pytest.raises(ValueError, match=match):
        SCGPT.setup_mudata(
            md.MuData({"rna": merfish}), spatial_key="bad", modalities={"spatial_key": "rna"}
        )


def test_missing_spatial_key_is_refused(merfish):
    with pytest.raises(KeyError, match=r"'coords' not found in adata.obsm.*'spatial'"):
        SCGPT.setup_anndata(merfish, spatial_key="coords")
