"""Readers of HEST-1k, her2st, Visium and SpatialData."""

from ._her2st import read_her2st
from ._hest import read_hest, read_hest_metadata, read_hest_patches, select_hest_samples
from ._spatialdata import to_anndata, to_spatialdata
from ._visium import read_visium

__all__ = [
    "read_her2st",
    "read_hest",
    "read_hest_metadata",
    "read_hest_patches",
    "read_visium",
    "select_hest_samples",
    "to_anndata",
    "to_spatialdata",
]
