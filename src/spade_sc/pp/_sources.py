"""Where spot pixels come from: crop geometry, image sources of an AnnData/SpatialData, background batches.

Geometry: a spot with centre ``(x, y)`` (full-resolution pixels) gets the square window of side
``patch_size · mpp / source_mpp`` source pixels centred on it. The window is read from the pyramid level
closest to (not coarser than) the target resolution, and resampled to ``patch_size`` pixels with sub-pixel
accuracy. Pixels outside the image are filled with ``fill``; the fraction of each window inside the image is
its *coverage*.
"""

from __future__ import annotations

import math
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import _keys
from .._logging import logger
from .._utils import is_spatialdata
from .._validate import check_positive
from ._image_readers import ImageReader, open_image

__all__ = [
    "SpotImageSource",
    "background",
    "choose_level",
    "close_sources",
    "crop_patch",
    "iter_patch_batches",
    "patch_windows",
    "resolve_image_sources",
    "window_coverage",
]

_RESAMPLE = {"nearest": 0, "bilinear": 2, "bicubic": 3, "lanczos": 1, "box": 4}
_EDGES = ("pad", "mask", "raise")


# --------------------------------------------------------------------------------------------- geometry
def patch_windows(centres: np.ndarray, *, patch_size: int, mpp: float, source_mpp: float):
    """Top-left corners ``(n, 2)`` and side (level-0 pixels) of the windows centred on ``centres``."""
    side = patch_size * mpp / source_mpp
    return np.asarray(centres, dtype=np.float64) - side / 2.0, side


def window_coverage(corners: np.ndarray, side: float, shape: tuple[int, int]) -> np.ndarray:
    """Fraction of each ``side × side`` window (top-left ``corners``, x/y) inside an image of ``shape`` (h, w)."""
    h, w = shape
    x0, y0 = corners[:, 0], corners[:, 1]
    ix = np.clip(np.minimum(x0 + side, w) - np.maximum(x0, 0), 0, None)
    iy = np.clip(np.minimum(y0 + side, h) - np.maximum(y0, 0), 0, None)
    return (ix * iy) / (side * side)


def choose_level(reader: ImageReader, source_mpp: float, mpp: float) -> int:
    """The coarsest pyramid level whose pixel size does not exceed the target ``mpp`` (2 % tolerance)."""
    best = 0
    for lev in range(reader.n_levels):
        d = max(reader.downsample(lev))
        if source_mpp * d <= mpp * 1.02:
            best = lev
    return best


def crop_patch(reader, level, corner, side, patch_size, *, fill=255, resample="bilinear") -> np.ndarray:
    """One ``(patch_size, patch_size, 3)`` uint8 patch: window ``corner``/``side`` (level-0 px) at ``level``."""
    from PIL import Image

    dy, dx = reader.downsample(level)
    lx0, ly0 = corner[0] / dx, corner[1] / dy
    lw, lh = side / dx, side / dy
    ix0, iy0 = math.floor(lx0) - 1, math.floor(ly0) - 1
    ix1, iy1 = math.ceil(lx0 + lw) + 1, math.ceil(ly0 + lh) + 1
    region = reader.read_region(level, ix0, iy0, ix1 - ix0, iy1 - iy0, fill=fill)
    bx, by = lx0 - ix0, ly0 - iy0
    im = Image.fromarray(region).resize(
        (patch_size, patch_size), resample=_RESAMPLE[resample], box=(bx, by, bx + lw, by + lh)
    )
    return np.asarray(im)


# --------------------------------------------------------------------------------------------- sources
@dataclass
class SpotImageSource:
    """Spots of one image: a reader, spot centres in its level-0 pixels, and its µm per pixel."""

    reader: ImageReader
    centres: np.ndarray  # (n, 2) x, y in level-0 pixels of `reader`
    mpp: float  # µm per level-0 pixel
    obs_index: np.ndarray  # rows of the table
    label: str
    owned: bool = True  # opened here (closed by `close_sources`), not passed in by the caller
    to_full: np.ndarray | None = (
        None  # 3×3 affine: level-0 pixels → the table's spot coordinates (None: identity)
    )

    def to_spot_coordinates(self, xy: np.ndarray) -> np.ndarray:
        """Map level-0 pixel positions of this image to the coordinates of ``obsm['spatial']``."""
        if self.to_full is None:
            return np.asarray(xy, dtype=np.float64)
        return (np.c_[xy, np.ones(len(xy))] @ self.to_full.T)[:, :2]

    def plan(self, *, patch_size: int, mpp: float):
        corners, side = patch_windows(self.centres, patch_size=patch_size, mpp=mpp, source_mpp=self.mpp)
        coverage = window_coverage(corners, side, self.reader.shape)
        return choose_level(self.reader, self.mpp, mpp), corners, side, coverage


def _uns_mpp(table, library_id=None) -> float | None:
    spatial = table.uns.get("spatial", {})
    libs = [library_id] if library_id is not None else list(spatial)
    vals = set()
    for lib in libs:
        sf = spatial.get(lib, {}).get("scalefactors", {})
        if _keys.MICRONS_PER_PIXEL in sf:
            value = float(sf[_keys.MICRONS_PER_PIXEL])
            if not np.isfinite(value) or value <= 0:
                raise ValueError(
                    f"`adata.uns['spatial'][{lib!r}]['scalefactors'][{_keys.MICRONS_PER_PIXEL!r}]` is {value!r}, "
                    "not a positive pixel size; fix the recorded value or pass `source_mpp=` (µm per "
                    "full-resolution pixel)."
                )
            vals.add(value)
    return vals.pop() if len(vals) == 1 else None


def _no_mpp_error(where: str) -> ValueError:
    return ValueError(
        f"the pixel size of {where} is unknown; pass `source_mpp=` (µm per full-resolution pixel), or record it "
        f"in `adata.uns['spatial'][library_id]['scalefactors'][{_keys.MICRONS_PER_PIXEL!r}]` "
        "(the `ss.io` readers do this)."
    )


def _centres(table, spatial_key, rows=None) -> np.ndarray:
    if spatial_key not in table.obsm:
        raise KeyError(
            f"no spot coordinates in `adata.obsm[{spatial_key!r}]` (obsm has: {list(table.obsm.keys())}); "
            "pass `spatial_key=` naming the spot centres in full-resolution image pixels."
        )
    xy = np.asarray(table.obsm[spatial_key], dtype=np.float64)
    if xy.ndim != 2 or xy.shape[1] < 2:
        raise ValueError(f"`adata.obsm[{spatial_key!r}]` must be n_obs × 2 (x, y), got shape {xy.shape}.")
    xy = xy[:, :2] if rows is None else xy[rows, :2]
    if not np.isfinite(xy).all():
        raise ValueError(f"`adata.obsm[{spatial_key!r}]` has NaN or infinite spot centres; drop those spots.")
    return xy


def _library_image(lib: str, entry: dict, image_key: str | None):
    """Reader and scale (image px per full-res px) for one ``uns['spatial'][lib]`` entry."""
    meta = entry.get("metadata", {}) or {}
    images = entry.get("images", {}) or {}
    sf = entry.get("scalefactors", {}) or {}
    src = meta.get(_keys.SOURCE_IMAGE_PATH)
    if image_key in (None, "fullres") and src is not None:
        if Path(str(src)).is_file():
            return open_image(str(src)), 1.0, f"{lib}: {Path(str(src)).name}"
        if image_key == "fullres":
            raise FileNotFoundError(
                f"`uns['spatial'][{lib!r}]['metadata'][{_keys.SOURCE_IMAGE_PATH!r}]` = {src!r} does not exist; "
                "fix the path or pass `image=`."
            )
        logger.warning(
            "full-resolution image %r of library %r not found; using its downscaled image", src, lib
        )
    if image_key in (None, "fullres"):
        if not images:
            raise ValueError(
                f"library {lib!r} has no image in `uns['spatial'][{lib!r}]['images']` and no "
                f"`metadata[{_keys.SOURCE_IMAGE_PATH!r}]`; pass `image=` (a path or an array)."
            )
        image_key = max(images, key=lambda k: int(np.prod(np.shape(images[k])[:2])))
    if image_key not in images:
        raise KeyError(
            f"`image_key={image_key!r}` is not an image of library {lib!r} (images: {list(images)}); "
            "pass one of them, or `image_key='fullres'` for the full-resolution source image."
        )
    scale = float(sf.get(f"tissue_{image_key}_scalef", 1.0))
    return open_image(np.asarray(images[image_key])), scale, f"{lib}: {image_key}"


def resolve_image_sources(
    data,
    table,
    *,
    image=None,
    library_id: str | None = None,
    library_key: str = _keys.LIBRARY_ID,
    image_key: str | None = None,
    spatial_key: str = _keys.SPATIAL,
    source_mpp: float | None = None,
    coordinate_system: str | None = None,
) -> list[SpotImageSource]:
    """Where each spot's pixels come from. See :func:`extract_patches` for the meaning of the arguments."""
    n = table.n_obs
    everything = np.arange(n)
    if source_mpp is not None:
        check_positive("source_mpp", source_mpp)
    if image is not None:
        reader = open_image(image)
        mpp = source_mpp or _uns_mpp(table, library_id) or reader.embedded_mpp()
        if mpp is None:
            raise _no_mpp_error("`image`")
        owned = not isinstance(image, ImageReader)
        return [
            SpotImageSource(reader, _centres(table, spatial_key), float(mpp), everything, reader.name, owned)
        ]
    if is_spatialdata(data):
        return [_spatialdata_source(data, table, image_key, spatial_key, source_mpp, coordinate_system)]
    spatial = table.uns.get("spatial")
    if not spatial:
        raise ValueError(
            "no image to read patches from: `adata.uns['spatial']` is empty; pass `image=` (a path or an "
            "array), or read the data with an `ss.io` reader."
        )
    if library_id is not None:
        if library_id not in spatial:
            raise KeyError(f"`library_id={library_id!r}` is not in `adata.uns['spatial']` ({list(spatial)}).")
        groups = {library_id: everything}
    elif len(spatial) == 1:
        groups = {next(iter(spatial)): everything}
    else:
        if library_key not in table.obs:
            raise KeyError(
                f"`adata.uns['spatial']` has {len(spatial)} libraries but `adata.obs[{library_key!r}]` does not "
                "exist; pass `library_key=` naming the column that says which library each spot belongs to, "
                "or `library_id=`."
            )
        lab = table.obs[library_key].astype(str).to_numpy()
        unknown = sorted(set(lab) - set(map(str, spatial)))
        if unknown:
            raise ValueError(
                f"`adata.obs[{library_key!r}]` has values with no image in `adata.uns['spatial']`: {unknown[:5]}."
            )
        groups = {lib: np.flatnonzero(lab == str(lib)) for lib in spatial if (lab == str(lib)).any()}
    sources = []
    for lib, rows in groups.items():
        reader, scale, label = _library_image(lib, spatial[lib], image_key)
        full_mpp = source_mpp or _uns_mpp(table, lib)
        if full_mpp is None:
            full_mpp = reader.embedded_mpp() if scale == 1.0 else None
            if full_mpp is None:
                raise _no_mpp_error(f"library {lib!r}")
        sources.append(
            SpotImageSource(
                reader,
                _centres(table, spatial_key, rows) * scale,
                full_mpp / scale,
                rows,
                label,
                to_full=None if scale == 1.0 else np.diag([1.0 / scale, 1.0 / scale, 1.0]),
            )
        )
    return sources


def close_sources(sources) -> None:
    """Close the readers that :func:`resolve_image_sources` opened."""
    for src in sources or []:
        if src.owned:
            src.reader.close()


def _spatialdata_source(sdata, table, image_key, spatial_key, source_mpp, coordinate_system):
    from spatialdata.transformations import get_transformation

    names = list(sdata.images.keys())
    if image_key is None:
        if len(names) != 1:
            raise ValueError(f"this SpatialData has {len(names)} images ({names}); pass `image_key=`.")
        image_key = names[0]
    if image_key not in sdata.images:
        raise KeyError(f"`image_key={image_key!r}` is not an image of this SpatialData (images: {names}).")
    element = sdata.images[image_key]
    transforms = get_transformation(element, get_all=True)
    if coordinate_system is None:
        coordinate_system = "global" if "global" in transforms else next(iter(transforms))
    if coordinate_system not in transforms:
        raise KeyError(
            f"image {image_key!r} has no transformation to `coordinate_system={coordinate_system!r}` "
            f"(it has {list(transforms)})."
        )
    affine = transforms[coordinate_system].to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y"))
    if spatial_key in table.obsm:
        pts = _centres(table, spatial_key)
    else:
        pts = _shape_centres(sdata, table, coordinate_system)
    inv = np.linalg.inv(affine)
    pix = (np.c_[pts, np.ones(len(pts))] @ inv.T)[:, :2]
    units_per_px = float(np.sqrt(abs(np.linalg.det(affine[:2, :2]))))
    mpp = source_mpp or _uns_mpp(table)
    if mpp is None:
        raise _no_mpp_error(f"coordinate system {coordinate_system!r}")
    return SpotImageSource(
        open_image(element), pix, float(mpp) * units_per_px, np.arange(table.n_obs), image_key, to_full=affine
    )


def _shape_centres(sdata, table, cs) -> np.ndarray:
    from spatialdata.transformations import get_transformation

    attrs = table.uns.get("spatialdata_attrs", {})
    region, rkey, ikey = attrs.get("region"), attrs.get("region_key"), attrs.get("instance_key")
    if region is None or rkey is None or ikey is None:
        raise KeyError("the table annotates no shapes and has no `obsm['spatial']`; cannot locate the spots.")
    out = np.full((table.n_obs, 2), np.nan)
    reg_col = table.obs[rkey].astype(str).to_numpy()
    for name in [region] if isinstance(region, str) else list(region):
        if name not in sdata.shapes:
            continue
        shp = sdata.shapes[name]
        rows = np.flatnonzero(reg_col == name)
        ids = table.obs[ikey].to_numpy()[rows]
        geom = shp.geometry.loc[ids]
        xy = (
            np.c_[geom.x.to_numpy(), geom.y.to_numpy()]
            if geom.geom_type.eq("Point").all()
            else np.c_[geom.centroid.x.to_numpy(), geom.centroid.y.to_numpy()]
        )
        all_t = get_transformation(shp, get_all=True)
        this_cs = cs if cs is not None else ("global" if "global" in all_t else next(iter(all_t)))
        aff = all_t[this_cs].to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y"))
        out[rows] = (np.c_[xy, np.ones(len(xy))] @ aff.T)[:, :2]
    if not np.isfinite(out).all():
        raise ValueError(
            "some table rows annotate no shapes element of this SpatialData; cannot locate them."
        )
    return out


# --------------------------------------------------------------------------------------------- batches
def iter_patch_batches(
    sources: list[SpotImageSource],
    *,
    patch_size: int,
    mpp: float,
    batch_size: int,
    keep: np.ndarray | None = None,
    fill: int = 255,
    resample: str = "bilinear",
    prefetch: int = 2,
    num_workers: int = 1,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield ``(rows, patches)`` batches, read by a background thread while the caller computes.

    ``keep`` (bool over table rows) skips spots; ``num_workers`` threads crop within a batch.
    """
    jobs = []
    for src in sources:
        level, corners, side, _ = src.plan(patch_size=patch_size, mpp=mpp)
        for j, row in enumerate(src.obs_index):
            if keep is None or keep[row]:
                jobs.append((src.reader, level, corners[j], side, row))

    def crop(job):
        reader, level, corner, side, _ = job
        return crop_patch(reader, level, corner, side, patch_size, fill=fill, resample=resample)

    def batches():
        pool = None
        if num_workers > 1:
            from concurrent.futures import ThreadPoolExecutor

            pool = ThreadPoolExecutor(num_workers)
        try:
            for start in range(0, len(jobs), batch_size):
                chunk = jobs[start : start + batch_size]
                imgs = list(pool.map(crop, chunk)) if pool else [crop(j) for j in chunk]
                yield np.array([j[4] for j in chunk], dtype=np.int64), np.stack(imgs)
        finally:
            if pool is not None:
                pool.shutdown(wait=True)

    return background(batches(), prefetch=prefetch)


def background(iterator, *, prefetch: int = 2):
    """Run ``iterator`` in a background thread, ``prefetch`` items ahead; errors are re-raised here.

    Closing the returned generator early (``break``, an exception in the consumer) stops the thread.
    """
    q: queue.Queue = queue.Queue(maxsize=max(1, prefetch))
    stop = threading.Event()
    end = object()

    def put(item):
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce():
        try:
            for item in iterator:
                if not put(item):
                    return
        except BaseException as err:  # noqa: BLE001 - re-raised in the consumer
            put(err)
        finally:
            if hasattr(iterator, "close"):
                iterator.close()
            put(end)

    thread = threading.Thread(target=produce, name="spade_sc-patch-reader", daemon=True)
    thread.start()

    def consume():
        try:
            while True:
                item = q.get()
                if item is end:
                    break
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            thread.join()

    return consume()
