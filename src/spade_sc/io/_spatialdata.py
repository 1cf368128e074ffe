"""AnnData (scanpy/squidpy spatial layout) ↔ SpatialData (image + spot circles + table)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from anndata import AnnData

from .. import _keys
from .._utils import get_table, is_spatialdata

__all__ = ["lazy_image", "to_anndata", "to_spatialdata"]


def lazy_image(path) -> list:
    """Dask arrays ``(c, y, x)`` of an image file, one per pyramid level, read only when computed.

    TIFFs are wrapped level by level through :mod:`tifffile`'s zarr store (nothing is decoded up front);
    JPEG/PNG files are decoded on first access.
    """
    import dask.array as da

    from ..pp._image_readers import LazyTiffLevel, PILReader, TiffReader, open_image

    path = str(path)
    reader = open_image(path)
    try:
        if isinstance(reader, TiffReader):
            out = []
            for level in range(reader.n_levels):
                arr = LazyTiffLevel(path, level)
                out.append(da.from_array(arr, chunks=(3, 2048, 2048), name=f"spade-tiff-{path}-{level}"))
            return out
        if isinstance(reader, PILReader):
            import dask

            h, w = reader.shape

            def load():
                return np.moveaxis(PILReader(path)._decoded(0), -1, 0)

            return [da.from_delayed(dask.delayed(load)(), shape=(3, h, w), dtype=np.uint8)]
    finally:
        reader.close()
    raise TypeError(f"cannot wrap {path!r} lazily.")  # pragma: no cover


def _image_element(levels: list, base_transform):
    """A SpatialData image (single scale or multiscale DataTree) from ``(c, y, x)`` arrays, finest first."""
    import xarray as xr
    from spatialdata.models import Image2DModel
    from spatialdata.transformations import Scale, Sequence

    c_coords = ["r", "g", "b"]
    if len(levels) == 1:
        return Image2DModel.parse(levels[0], dims=("c", "y", "x"), c_coords=c_coords,
                                  transformations={"global": base_transform})  # fmt: skip
    h0, w0 = levels[0].shape[1:]
    nodes = {}
    for i, arr in enumerate(levels):
        dy, dx = h0 / arr.shape[1], w0 / arr.shape[2]
        t = base_transform if i == 0 else Sequence([Scale([dy, dx], axes=("y", "x")), base_transform])
        el = Image2DModel.parse(arr, dims=("c", "y", "x"), c_coords=c_coords, transformations={"global": t})
        nodes[f"scale{i}"] = xr.Dataset({"image": el})
    dt = xr.DataTree.from_dict(nodes)
    Image2DModel().validate(dt)
    return dt


def _rename_cs(element, cs: str):
    from spatialdata.transformations import get_transformation, set_transformation

    if cs == "global":
        return element
    t = get_transformation(element, to_coordinate_system="global")
    set_transformation(element, {cs: t}, set_all=True)
    if type(element).__name__ == "DataTree":
        for key in element.children:
            node = element[key]
            var = next(iter(node.data_vars))
            tt = get_transformation(node[var], to_coordinate_system="global")
            set_transformation(node[var], {cs: tt}, set_all=True)
    return element


def to_spatialdata(
    adata: AnnData,
    *,
    library_key: str = _keys.LIBRARY_ID,
    spatial_key: str = _keys.SPATIAL,
    images: bool = True,
    table_key: str = "table",
):
    """Convert a scanpy/squidpy-style spatial AnnData into a SpatialData.

    Per library of ``adata.uns['spatial']``: an image element ``'{library}_image'`` (the full-resolution
    ``metadata['source_image_path']``, read lazily and keeping its pyramid, or else the largest image of
    ``uns['spatial'][library]['images']`` with its scale factor as a transformation), and a circles element
    ``'{library}_spots'`` (spot centres from ``obsm[spatial_key]``, radius = half
    ``scalefactors['spot_diameter_fullres']``). The table annotates the circles (region key ``'region'``,
    instance key ``'spot_id'``). With one library the coordinate system is ``'global'`` (full-resolution
    pixels); with several, each library gets its own, named after it.

    Parameters
    ----------
    adata
        AnnData with ``obsm[spatial_key]`` and ``uns['spatial']``.
    library_key
        ``.obs`` column of each spot's library (needed with several libraries).
    spatial_key
        ``.obsm`` key of the spot centres (full-resolution pixels).
    images
        Add the images (``False``: circles and table only).
    table_key
        Name of the table element.

    Returns
    -------
    :class:`spatialdata.SpatialData`. ``adata`` is not modified (the table is a copy without image arrays
    in ``uns``).

    Examples
    --------
    >>> import spade_sc as ss
    >>> sdata = ss.io.to_spatialdata(ss.datasets.toy(n_slides=1, grid=4))
    >>> sorted(sdata.shapes)
    ['slide0_spots']
    """
    import spatialdata as sd
    from spatialdata.models import ShapesModel, TableModel
    from spatialdata.transformations import Identity, Scale

    if spatial_key not in adata.obsm:
        raise KeyError(f"no spot centres in `adata.obsm[{spatial_key!r}]`; pass `spatial_key=`.")
    spatial = adata.uns.get("spatial", {}) or {}
    libs = list(spatial) or ["spots"]
    if len(libs) == 1:
        lib_of = np.full(adata.n_obs, libs[0], dtype=object)
    else:
        if library_key not in adata.obs:
            raise KeyError(
                f"`adata.uns['spatial']` has {len(libs)} libraries; `adata.obs[{library_key!r}]` must say which "
                "library each spot belongs to (pass `library_key=`)."
            )
        lib_of = adata.obs[library_key].astype(str).to_numpy()
    xy = np.asarray(adata.obsm[spatial_key], dtype=np.float64)[:, :2]
    shapes, imgs = {}, {}
    region = np.empty(adata.n_obs, dtype=object)
    instance = np.zeros(adata.n_obs, dtype=np.int64)
    for lib in libs:
        cs = "global" if len(libs) == 1 else str(lib)
        rows = np.flatnonzero(lib_of == str(lib))
        if len(rows) == 0:
            continue
        entry = spatial.get(lib, {})
        sf = entry.get("scalefactors", {}) or {}
        diam = float(sf.get(_keys.SPOT_DIAMETER, 1.0))
        name = f"{lib}_spots"
        df = pd.DataFrame({"radius": np.full(len(rows), diam / 2.0)}, index=np.arange(len(rows)))
        circles = ShapesModel.parse(xy[rows], geometry=0, radius=df["radius"].to_numpy(), index=df.index,
                                    transformations={"global": Identity()})  # fmt: skip
        shapes[name] = _rename_cs(circles, cs)
        region[rows] = name
        instance[rows] = np.arange(len(rows))
        if images:
            el = _library_image_element(entry, Identity, Scale)
            if el is not None:
                imgs[f"{lib}_image"] = _rename_cs(el, cs)
    table = adata.copy()
    if "spatial" in table.uns:
        table.uns["spatial"] = {
            lib: {k: v for k, v in (e or {}).items() if k != "images"}
            for lib, e in table.uns["spatial"].items()
        }
    table.obs[_keys.REGION_KEY] = pd.Categorical(region)
    table.obs[_keys.INSTANCE_KEY] = instance
    table = TableModel.parse(
        table, region=sorted(set(region)), region_key=_keys.REGION_KEY, instance_key=_keys.INSTANCE_KEY
    )
    return sd.SpatialData(images=imgs, shapes=shapes, tables={table_key: table})


def _library_image_element(entry: dict, Identity, Scale):
    meta = entry.get("metadata", {}) or {}
    src = meta.get(_keys.SOURCE_IMAGE_PATH)
    if src is not None and Path(str(src)).is_file():
        return _image_element(lazy_image(src), Identity())
    images = entry.get("images", {}) or {}
    if not images:
        return None
    key = max(images, key=lambda k: int(np.prod(np.shape(images[k])[:2])))
    arr = np.asarray(images[key])
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    if arr.dtype != np.uint8:
        arr = np.clip(arr * (255.0 if arr.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
    scale = float((entry.get("scalefactors", {}) or {}).get(f"tissue_{key}_scalef", 1.0))
    t = Identity() if scale == 1.0 else Scale([1.0 / scale, 1.0 / scale], axes=("y", "x"))
    return _image_element([np.moveaxis(arr[..., :3], -1, 0)], t)


def to_anndata(sdata, *, table_key: str | None = None, spatial_key: str = _keys.SPATIAL) -> AnnData:
    """The table of a SpatialData as a stand-alone AnnData, with spot centres in ``obsm[spatial_key]``.

    Centres come from the table's ``obsm[spatial_key]`` when present, else from the annotated shapes
    (circle centres / polygon centroids) in the ``'global'`` coordinate system (else each element's own).

    Parameters
    ----------
    sdata
        A SpatialData (an AnnData is returned as a copy).
    table_key
        Which table (needed when there are several).
    spatial_key
        ``.obsm`` key to fill.

    Returns
    -------
    A copy of the table, with spot centres in ``.obsm[spatial_key]``.

    Examples
    --------
    >>> import spade_sc as ss
    >>> sdata = ss.io.to_spatialdata(ss.datasets.toy())
    >>> adata = ss.io.to_anndata(sdata)
    >>> adata.shape, adata.obsm["spatial"].shape
    ((1600, 300), (1600, 2))
    """
    from ..pp._sources import _shape_centres

    if isinstance(sdata, AnnData):
        return sdata.copy()
    if not is_spatialdata(sdata):
        raise TypeError(f"expected a SpatialData, got {type(sdata).__name__}.")
    table = get_table(sdata, table_key).copy()
    if spatial_key not in table.obsm:
        table.obsm[spatial_key] = _shape_centres(sdata, table, None)
    return table
