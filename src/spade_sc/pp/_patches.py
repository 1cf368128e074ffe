"""Spot-centred H&E patches at a fixed physical size (HEST's convention: 224 px at 0.5 µm/px).

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
from .._utils import get_table, is_spatialdata
from .._validate import check_anndata, check_choice, check_positive
from ._image_readers import ImageReader, open_image

__all__ = ["extract_patches", "Patches", "SpotImageSource", "resolve_image_sources", "iter_patch_batches"]

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
            vals.add(float(sf[_keys.MICRONS_PER_PIXEL]))
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
        logger.warning("full-resolution image %r of library %r not found; using its downscaled image", src, lib)
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
        return [SpotImageSource(reader, _centres(table, spatial_key), float(mpp), everything, reader.name, owned)]
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
        sources.append(SpotImageSource(reader, _centres(table, spatial_key, rows) * scale, full_mpp / scale, rows, label))
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
    return SpotImageSource(open_image(element), pix, float(mpp) * units_per_px, np.arange(table.n_obs), image_key)


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
        xy = np.c_[geom.x.to_numpy(), geom.y.to_numpy()] if geom.geom_type.eq("Point").all() else np.c_[
            geom.centroid.x.to_numpy(), geom.centroid.y.to_numpy()
        ]
        all_t = get_transformation(shp, get_all=True)
        this_cs = cs if cs is not None else ("global" if "global" in all_t else next(iter(all_t)))
        aff = all_t[this_cs].to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y"))
        out[rows] = (np.c_[xy, np.ones(len(xy))] @ aff.T)[:, :2]
    if not np.isfinite(out).all():
        raise ValueError("some table rows annotate no shapes element of this SpatialData; cannot locate them.")
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


# --------------------------------------------------------------------------------------------- Patches
class _H5Images:
    """Lazy ``img`` dataset of a HEST patches file: slices are read on demand."""

    def __init__(self, path, key="img"):
        import h5py

        self.path, self.key = str(path), key
        with h5py.File(self.path, "r") as f:
            self.shape = tuple(f[key].shape)
            self.dtype = f[key].dtype
        self.ndim = len(self.shape)

    def __len__(self):
        return self.shape[0]

    def __getitem__(self, idx):
        import h5py

        with h5py.File(self.path, "r") as f:
            ds = f[self.key]
            if isinstance(idx, slice) or np.isscalar(idx):
                return ds[idx]
            uniq, inverse = np.unique(np.asarray(idx), return_inverse=True)
            return ds[uniq.tolist()][inverse]


class Patches:
    """Spot patches: ``images`` ``(n, size, size, 3)`` uint8 (in memory or lazily in an ``.h5``) + their spots.

    Attributes
    ----------
    images
        Array-like of RGB patches.
    obs_names
        Spot (barcode) of each patch.
    coords
        Top-left corner of each patch in full-resolution pixels (HEST's ``coords``), or ``None``.
    coverage
        Fraction of each patch inside the image (1 for HEST patch files), or ``None``.
    mpp
        µm per patch pixel (0.5 for HEST).
    """

    def __init__(self, images, obs_names, *, coords=None, coverage=None, mpp: float = 0.5, source: str = ""):
        self.images = images
        self.obs_names = np.asarray([str(x) for x in obs_names], dtype=object)
        if len(self.obs_names) != len(images):
            raise ValueError(f"{len(images)} patches but {len(self.obs_names)} names.")
        if len(images) and (len(images.shape) != 4 or images.shape[3] != 3):
            raise ValueError(f"patches must be (n, h, w, 3) RGB, got shape {tuple(images.shape)}.")
        self.coords = None if coords is None else np.asarray(coords)
        self.coverage = None if coverage is None else np.asarray(coverage, dtype=np.float64)
        self.mpp = float(mpp)
        self.source = source

    def __len__(self) -> int:
        return len(self.obs_names)

    @property
    def patch_size(self) -> int:
        return int(self.images.shape[1])

    def __getitem__(self, idx) -> np.ndarray:
        return np.asarray(self.images[idx])

    def __repr__(self) -> str:
        return f"Patches({len(self)} × {self.patch_size}×{self.patch_size} px at {self.mpp:g} µm/px{', ' + self.source if self.source else ''})"

    def to_h5(self, path) -> Path:
        """Write HEST's patch layout: ``img`` (n, s, s, 3) uint8, ``coords`` (n, 2) int, ``barcode`` (n, 1) bytes."""
        import h5py

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        n, s = len(self), self.patch_size
        with h5py.File(path, "w") as f:
            ds = f.create_dataset("img", shape=(n, s, s, 3), dtype=np.uint8, chunks=(1, s, s, 3) if n else None)
            for start in range(0, n, 256):
                ds[start : start + 256] = self[slice(start, start + 256)]
            ds.attrs["patch_size_target"] = s
            coords = self.coords if self.coords is not None else np.zeros((n, 2))
            f.create_dataset("coords", data=np.round(coords).astype(np.int64))
            f.create_dataset("barcode", data=np.array([b.encode() for b in self.obs_names], dtype="S")[:, None])
        return path

    @classmethod
    def from_h5(cls, path, *, mpp: float = 0.5) -> Patches:
        """Open a HEST ``patches/{id}.h5`` file lazily (``img``, ``coords``, ``barcode``)."""
        import h5py

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"patch file {str(path)!r} does not exist.")
        with h5py.File(path, "r") as f:
            missing = [k for k in ("img", "coords") if k not in f]
            bkey = "barcode" if "barcode" in f else ("barcodes" if "barcodes" in f else None)
            if missing or bkey is None:
                raise KeyError(
                    f"{str(path)!r} is not a HEST patch file: it lacks {missing + ([] if bkey else ['barcode'])} "
                    f"(has {list(f.keys())})."
                )
            raw = np.asarray(f[bkey][:]).reshape(-1)
            coords = np.asarray(f["coords"][:])
        names = [b.decode() if isinstance(b, bytes) else str(b) for b in raw]
        return cls(_H5Images(path), names, coords=coords, coverage=np.ones(len(names)), mpp=mpp, source=path.name)


# --------------------------------------------------------------------------------------------- public
def extract_patches(
    adata,
    *,
    image=None,
    library_id: str | None = None,
    library_key: str = _keys.LIBRARY_ID,
    image_key: str | None = None,
    spatial_key: str = _keys.SPATIAL,
    patch_size: int = 224,
    mpp: float = 0.5,
    source_mpp: float | None = None,
    edge: str = "pad",
    min_coverage: float = 0.5,
    fill: int = 255,
    resample: str = "bilinear",
    coordinate_system: str | None = None,
    table_key: str | None = None,
) -> Patches:
    """Crop a square H&E patch of fixed physical size around every spot.

    Each patch covers ``patch_size · mpp`` µm (default 224 px at 0.5 µm/px = 112 µm, HEST's convention)
    centred on the spot, resampled from the source resolution. Pyramidal TIFFs are read from the level
    closest to the target resolution and only around the spots; JPEGs are decoded at the coarsest DCT scale
    that is still fine enough.

    Parameters
    ----------
    adata
        AnnData with spot centres in ``.obsm[spatial_key]`` (full-resolution pixels), or a SpatialData.
    image
        The image: a JPEG/PNG/TIFF path, an RGB array ``(y, x, 3)``, or a reader. ``None`` uses the image
        referenced by the data: ``uns['spatial'][library]['metadata']['source_image_path']`` (full
        resolution) or the largest of ``uns['spatial'][library]['images']`` (scaled by
        ``scalefactors['tissue_{key}_scalef']``); for SpatialData, the image element ``image_key``.
    library_id
        Library in ``uns['spatial']`` to use for all spots. ``None``: the only library, or each spot's
        ``obs[library_key]`` when there are several.
    library_key
        ``.obs`` column naming each spot's library.
    image_key
        SpatialData image element; for AnnData a key of ``uns['spatial'][library]['images']`` or ``'fullres'``.
    spatial_key
        ``.obsm`` key of the spot centres (x, y).
    patch_size
        Patch side in output pixels.
    mpp
        Output µm per pixel.
    source_mpp
        µm per full-resolution pixel. ``None`` reads ``uns['spatial'][library]['scalefactors']['microns_per_pixel']``,
        then the TIFF's resolution tags.
    edge
        Patches reaching beyond the image: ``'pad'`` fills the outside with ``fill`` and keeps them;
        ``'mask'`` leaves out patches with less than ``min_coverage`` of their area inside the image;
        ``'raise'`` raises if any patch leaves the image. Counts are logged.
    min_coverage
        Minimum fraction inside the image for ``edge='mask'``.
    fill
        Grey level (0–255) of padded pixels (255: white, like bare glass).
    resample
        ``'bilinear'``, ``'bicubic'``, ``'lanczos'``, ``'box'`` or ``'nearest'``.
    coordinate_system
        SpatialData coordinate system of the spot coordinates (default ``'global'``).
    table_key
        Table to use when ``adata`` is a SpatialData.

    Returns
    -------
    :class:`Patches` (in memory) with ``images`` ``(n, patch_size, patch_size, 3)`` uint8, ``obs_names``,
    ``coords`` (top-left corners in full-resolution pixels) and ``coverage``. Nothing is written to ``adata``.

    Examples
    --------
    >>> import spade_sc as ss
    >>> adata = ss.datasets.toy()
    >>> patches = ss.pp.extract_patches(adata, patch_size=64, mpp=1.0)
    >>> patches.images.shape
    (1600, 64, 64, 3)
    """
    check_positive("patch_size", patch_size, integer=True)
    check_positive("mpp", mpp)
    check_choice("edge", edge, _EDGES)
    check_choice("resample", resample, tuple(_RESAMPLE))
    table = check_anndata(get_table(adata, table_key))
    sources = resolve_image_sources(
        adata, table, image=image, library_id=library_id, library_key=library_key, image_key=image_key,
        spatial_key=spatial_key, source_mpp=source_mpp, coordinate_system=coordinate_system,
    )  # fmt: skip
    try:
        coverage, corners_full = _coverage_and_corners(sources, table.n_obs, patch_size=patch_size, mpp=mpp)
        keep = check_edges(coverage, table.obs_names, edge=edge, min_coverage=min_coverage)
        rows = np.flatnonzero(keep)
        images = np.empty((len(rows), patch_size, patch_size, 3), dtype=np.uint8)
        pos = np.full(table.n_obs, -1)
        pos[rows] = np.arange(len(rows))
        for idx, batch in iter_patch_batches(
            sources, patch_size=patch_size, mpp=mpp, batch_size=64, keep=keep, fill=fill, resample=resample
        ):
            images[pos[idx]] = batch
    finally:
        close_sources(sources)
    return Patches(
        images, table.obs_names[rows], coords=corners_full[rows], coverage=coverage[rows], mpp=mpp,
        source=", ".join(s.label for s in sources),
    )  # fmt: skip


def _coverage_and_corners(sources, n_obs, *, patch_size, mpp):
    coverage = np.full(n_obs, np.nan)
    corners = np.full((n_obs, 2), np.nan)
    for src in sources:
        _, c, side, cov = src.plan(patch_size=patch_size, mpp=mpp)
        coverage[src.obs_index] = cov
        # corners in full-resolution pixels of the source image (scale 1 for full-res sources)
        corners[src.obs_index] = c
    return coverage, corners


def check_edges(coverage: np.ndarray, obs_names, *, edge: str, min_coverage: float) -> np.ndarray:
    """Apply the ``edge`` policy: return the spots to keep; log or raise about patches leaving the image."""
    check_positive("min_coverage", min_coverage, allow_zero=True)
    if min_coverage > 1:
        raise ValueError(f"`min_coverage` must be in [0, 1], got {min_coverage!r}.")
    partial = coverage < 1.0 - 1e-9
    if edge == "raise" and partial.any():
        names = ", ".join(map(str, np.asarray(obs_names)[partial][:5]))
        raise ValueError(
            f"{int(partial.sum())} spot patches reach beyond the image (e.g. {names}); use `edge='pad'` to fill "
            "the outside, `edge='mask'` to leave them out, or drop those spots."
        )
    keep = np.ones(len(coverage), dtype=bool)
    if edge == "mask":
        keep = coverage >= min_coverage
        if (~keep).any():
            logger.warning(
                "%d of %d spot patches have less than %.0f%% of their area inside the image and are masked",
                int((~keep).sum()), len(keep), 100 * min_coverage,
            )  # fmt: skip
    if partial.any():
        outside = coverage <= 0
        logger.warning(
            "%d of %d spot patches reach beyond the image (%d entirely outside); the outside is padded",
            int(partial.sum()), len(coverage), int(outside.sum()),
        )  # fmt: skip
    return keep
