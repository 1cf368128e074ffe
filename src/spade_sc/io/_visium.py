"""10x Genomics Visium (Space Ranger output) via squidpy's reader, with the pixel size recorded."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from .. import _keys

__all__ = ["VISIUM_SPOT_UM", "read_visium"]

VISIUM_SPOT_UM = 55.0  # Visium spot diameter


def read_visium(
    path,
    *,
    counts_file: str = "filtered_feature_bc_matrix.h5",
    library_id: str | None = None,
    source_image_path=None,
    load_images: bool = True,
    as_spatialdata: bool = False,
):
    """Read a Space Ranger output directory (counts, ``spatial/`` positions, scale factors, images).

    Uses :func:`squidpy.read.visium`, then records the full-resolution pixel size
    (``microns_per_pixel = 55 µm / spot_diameter_fullres``) so that :func:`spade_sc.pp.extract_features` can
    crop patches of a fixed physical size.

    Parameters
    ----------
    path
        Space Ranger ``outs/`` directory.
    counts_file
        ``filtered_feature_bc_matrix.h5`` (default) or ``raw_feature_bc_matrix.h5``.
    library_id
        Library name (default: from the counts file).
    source_image_path
        The full-resolution H&E given to Space Ranger (TIFF/JPEG); referenced in
        ``uns['spatial'][library]['metadata']['source_image_path']`` and read lazily for patches.
    load_images
        Load ``tissue_hires_image.png`` / ``tissue_lowres_image.png``.
    as_spatialdata
        Return a SpatialData (image, spot circles, table) instead of AnnData.

    Returns
    -------
    AnnData with raw counts in ``.X``; ``obs`` ``in_tissue``, ``array_row``, ``array_col``, ``library_id``;
    ``obsm['spatial']`` (x, y) full-resolution pixels (float); ``uns['spatial'][library]`` with ``images``,
    ``scalefactors`` (+ ``microns_per_pixel``) and ``metadata``.

    Examples
    --------
    >>> import spade_sc as ss
    >>> adata = ss.io.read_visium("outs/", source_image_path="image.tif")  # doctest: +SKIP
    """
    import squidpy as sq

    path = Path(path)
    if not (path / counts_file).is_file():
        raise FileNotFoundError(
            f"{str(path / counts_file)!r} does not exist; pass the Space Ranger `outs/` directory "
            "(and `counts_file=` if the matrix has another name)."
        )
    if not (path / "spatial").is_dir():
        raise FileNotFoundError(f"{str(path / 'spatial')!r} does not exist; is this Space Ranger output?")
    if library_id is None and counts_file.endswith(".h5"):
        import h5py

        with h5py.File(path / counts_file, "r") as f:
            if "library_ids" not in f.attrs:  # not written by Space Ranger: name the library after the folder
                library_id = (path.parent.name if path.name == "outs" else path.name) or "visium"
    with warnings.catch_warnings():  # duplicated gene symbols are made unique right below
        warnings.filterwarnings("ignore", message="Variable names are not unique", category=UserWarning)
        adata = sq.read.visium(
            path, counts_file=counts_file, library_id=library_id, load_images=load_images,
            source_image_path=source_image_path,
        )  # fmt: skip
    adata.var_names_make_unique()
    lib = next(iter(adata.uns["spatial"]))
    entry = adata.uns["spatial"][lib]
    if not load_images:  # squidpy skips positions and scale factors without images; read them here
        import json

        entry["scalefactors"] = json.loads((path / "spatial" / "scalefactors_json.json").read_text())
        _add_positions(adata, path)
    adata.obsm[_keys.SPATIAL] = np.asarray(adata.obsm[_keys.SPATIAL], dtype=np.float64)
    sf = entry.setdefault("scalefactors", {})
    if _keys.SPOT_DIAMETER in sf and float(sf[_keys.SPOT_DIAMETER]) > 0:
        sf[_keys.MICRONS_PER_PIXEL] = VISIUM_SPOT_UM / float(sf[_keys.SPOT_DIAMETER])
    adata.obs[_keys.LIBRARY_ID] = pd.Categorical([lib] * adata.n_obs)
    if as_spatialdata:
        from ._spatialdata import to_spatialdata

        return to_spatialdata(adata)
    return adata


def _add_positions(adata, path: Path) -> None:
    f = path / "spatial" / "tissue_positions.csv"
    if not f.is_file():
        f = path / "spatial" / "tissue_positions_list.csv"
    first = f.read_text().split(",", 1)[0].strip().lower()
    pos = pd.read_csv(f, header=0 if first == "barcode" else None, index_col=0)
    pos.columns = ["in_tissue", "array_row", "array_col", "pxl_row_in_fullres", "pxl_col_in_fullres"]
    pos.index = pos.index.astype(str)
    pos = pos.reindex(adata.obs_names)
    for c in ("in_tissue", "array_row", "array_col"):
        adata.obs[c] = pos[c].to_numpy()
    adata.obsm[_keys.SPATIAL] = pos[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(np.float64)
