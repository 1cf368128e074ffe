"""Lazy region readers over H&E images: arrays, JPEG/PNG (PIL), (pyramidal) TIFF (tifffile + zarr).

Every reader exposes the same small interface (:class:`ImageReader`): the shape of each resolution level and
``read_region(level, x0, y0, width, height)``, which returns an RGB ``uint8`` array and pads what lies outside
the image with a fill value. Only the requested region is read from (pyramidal) TIFF files; JPEG files are
decoded once per level, at 1/1, 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling), whichever is needed.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np

__all__ = ["ArrayReader", "ImageReader", "LazyTiffLevel", "PILReader", "TiffReader", "open_image"]

_TIFF_SUFFIXES = (".tif", ".tiff", ".svs", ".btf", ".ome.tif", ".ome.tiff")
_PIL_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")


def _to_uint8(x: np.ndarray) -> np.ndarray:
    if x.dtype == np.uint8:
        return x
    if x.dtype == np.uint16:
        return (x >> 8).astype(np.uint8)
    if np.issubdtype(x.dtype, np.floating):
        hi = 1.0 if (x.size == 0 or float(np.nanmax(x)) <= 1.0) else 255.0
        return np.clip(np.nan_to_num(x) * (255.0 / hi), 0, 255).astype(np.uint8)
    if np.issubdtype(x.dtype, np.integer) and (x.size == 0 or (x.min() >= 0 and x.max() <= 255)):
        return x.astype(np.uint8)
    raise TypeError(f"image dtype {x.dtype} is not supported; convert the image to RGB uint8 first.")


def _to_rgb(x: np.ndarray) -> np.ndarray:
    """``(h, w)``, ``(h, w, 1|3|4)`` → ``(h, w, 3)`` uint8."""
    x = _to_uint8(np.asarray(x))
    if x.ndim == 2:
        return np.repeat(x[..., None], 3, axis=2)
    if x.shape[2] == 1:
        return np.repeat(x, 3, axis=2)
    if x.shape[2] >= 3:
        return np.ascontiguousarray(x[..., :3])
    raise ValueError(f"expected 1, 3 or 4 channels, got an image of shape {x.shape}.")


class ImageReader:
    """Base class: a (possibly multi-resolution) RGB image read region by region.

    Subclasses set ``level_shapes`` (``(height, width)`` of each level, level 0 the full resolution) and
    implement ``_read(level, x0, y0, x1, y1)`` for regions inside the image.
    """

    level_shapes: list[tuple[int, int]]
    name: str = "image"

    @property
    def shape(self) -> tuple[int, int]:
        """``(height, width)`` of the full-resolution level."""
        return self.level_shapes[0]

    @property
    def n_levels(self) -> int:
        return len(self.level_shapes)

    def downsample(self, level: int) -> tuple[float, float]:
        """``(dy, dx)``: level-0 pixels per pixel of ``level``."""
        h0, w0 = self.level_shapes[0]
        h, w = self.level_shapes[level]
        return h0 / h, w0 / w

    def embedded_mpp(self) -> float | None:
        """µm per level-0 pixel stored in the file, if any."""
        return None

    def _read(self, level: int, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:  # pragma: no cover
        raise NotImplementedError

    def read_region(
        self, level: int, x0: int, y0: int, width: int, height: int, *, fill: int = 255
    ) -> np.ndarray:
        """RGB ``uint8`` array ``(height, width, 3)`` of the region at ``level``; outside is ``fill``."""
        h_img, w_img = self.level_shapes[level]
        out = np.full((height, width, 3), fill, dtype=np.uint8)
        ax0, ay0 = max(x0, 0), max(y0, 0)
        ax1, ay1 = min(x0 + width, w_img), min(y0 + height, h_img)
        if ax1 > ax0 and ay1 > ay0:
            out[ay0 - y0 : ay1 - y0, ax0 - x0 : ax1 - x0] = _to_rgb(self._read(level, ax0, ay0, ax1, ay1))
        return out

    def close(self) -> None:
        """Release file handles (readers also close when garbage-collected)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self) -> str:
        levels = ", ".join(f"{h}×{w}" for h, w in self.level_shapes)
        return f"{type(self).__name__}({self.name!r}, levels: {levels})"


class ArrayReader(ImageReader):
    """Reader over in-memory or lazy arrays (numpy, dask, zarr, xarray), one per resolution level.

    Parameters
    ----------
    levels
        One array per level, finest first, each ``(y, x)``, ``(y, x, c)`` or, with ``channels_first``,
        ``(c, y, x)``.
    channels_first
        Channel axis first (SpatialData's ``cyx``); ``None`` guesses (first axis of size 1, 3 or 4 when the last
        axis is not).
    """

    def __init__(self, levels: Sequence, *, channels_first: bool | None = None, name: str = "array"):
        if not isinstance(levels, (list, tuple)):
            levels = [levels]
        if len(levels) == 0:
            raise ValueError("`levels` is empty; pass at least one image array.")
        self.name = name
        self._levels = []
        shapes = []
        for arr in levels:
            data = getattr(arr, "data", arr) if type(arr).__name__ == "DataArray" else arr
            if data.ndim not in (2, 3):
                raise ValueError(f"image arrays must be 2-D or 3-D, got shape {tuple(data.shape)}.")
            cf = channels_first
            if cf is None:
                cf = data.ndim == 3 and data.shape[0] in (1, 3, 4) and data.shape[2] not in (1, 3, 4)
            self._levels.append((data, bool(cf) and data.ndim == 3))
            shapes.append(
                tuple(int(s) for s in (data.shape[1:3] if (cf and data.ndim == 3) else data.shape[:2]))
            )
        self.level_shapes = shapes

    def _read(self, level, x0, y0, x1, y1):
        data, cf = self._levels[level]
        reg = data[:, y0:y1, x0:x1] if cf else data[y0:y1, x0:x1]
        if hasattr(reg, "compute"):
            reg = reg.compute()
        reg = np.asarray(reg)
        return np.moveaxis(reg, 0, -1) if cf else reg


@contextlib.contextmanager
def _trusted_pil():
    """Allow PIL to open large (trusted, local) slide images without DecompressionBomb warnings."""
    from PIL import Image

    old = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        yield Image
    finally:
        Image.MAX_IMAGE_PIXELS = old


class PILReader(ImageReader):
    """JPEG/PNG reader. JPEGs get levels 1, 1/2, 1/4, 1/8 decoded on demand with libjpeg's DCT scaling.

    Only the most recently used level is kept decoded in memory.
    """

    def __init__(self, path):
        self.path = Path(path)
        self.name = self.path.name
        if not self.path.is_file():
            raise FileNotFoundError(f"image file {str(self.path)!r} does not exist.")
        with _trusted_pil() as Image, Image.open(self.path) as im:
            w, h = im.size
            self._is_jpeg = im.format == "JPEG"
            dpi = im.info.get("dpi")
        factors = (1, 2, 4, 8) if self._is_jpeg else (1,)
        self._factors = [f for f in factors if f == 1 or min(h, w) // f >= 16]
        self.level_shapes = [(-(-h // f), -(-w // f)) for f in self._factors]
        self._dpi = dpi
        self._cache: tuple[int, np.ndarray] | None = None
        self._lock = threading.Lock()

    def _decoded(self, level: int) -> np.ndarray:
        with self._lock:
            if self._cache is not None and self._cache[0] == level:
                return self._cache[1]
            self._cache = None  # free the previous level before decoding the next
            f = self._factors[level]
            with _trusted_pil() as Image, Image.open(self.path) as im:
                if f > 1:
                    im.draft("RGB", (im.size[0] // f, im.size[1] // f))
                arr = _to_rgb(np.asarray(im.convert("RGB")))
            self.level_shapes[level] = arr.shape[:2]
            self._cache = (level, arr)
            return arr

    def read_region(self, level, x0, y0, width, height, *, fill=255):
        self._decoded(level)  # decode first so that level_shapes is exact
        return super().read_region(level, x0, y0, width, height, fill=fill)

    def _read(self, level, x0, y0, x1, y1):
        return self._decoded(level)[y0:y1, x0:x1]

    def close(self):
        self._cache = None


class TiffReader(ImageReader):
    """(Pyramidal) TIFF reader on :mod:`tifffile` + :mod:`zarr`: only the tiles of a region are decoded.

    Pyramids stored as SubIFDs or as a chain of reduced-resolution pages (as written by pyvips / HEST) are
    both recognised.
    """

    def __init__(self, path):
        import tifffile

        self.path = Path(path)
        self.name = self.path.name
        if not self.path.is_file():
            raise FileNotFoundError(f"image file {str(self.path)!r} does not exist.")
        self._tif = tifffile.TiffFile(self.path)
        series = self._tif.series
        if not series:
            self._tif.close()
            raise ValueError(f"{str(self.path)!r} has no image series tifffile can read.")
        s0 = series[0]
        levels = [(s0, i) for i in range(len(s0.levels))]
        if len(levels) == 1:  # pyramid written as separate pages (one series per level)
            for s in series[1:]:
                prev = levels[-1][0].levels[levels[-1][1]].shape
                if s.axes == s0.axes and s.shape != prev and all(a <= b for a, b in zip(s.shape, prev)):
                    levels.append((s, 0))
        self._axes = s0.axes
        self._arrays = []
        shapes = []
        for ser, i in levels:
            self._arrays.append(self._open_level(ser, i))
            lev = ser.levels[i]
            ax = lev.axes
            shapes.append((int(lev.shape[ax.index("Y")]), int(lev.shape[ax.index("X")])))
        self.level_shapes = shapes

    @staticmethod
    def _open_level(series, level: int):
        import zarr

        z = zarr.open(series.aszarr(level=level), mode="r")
        if not hasattr(z, "shape"):  # pragma: no cover - a group despite `level=`
            z = z[str(level)]
        return z, series.levels[level].axes

    def embedded_mpp(self) -> float | None:
        page = self._tif.pages[0]
        desc = getattr(page, "description", "") or ""
        if "MPP" in desc:  # Aperio: "... |MPP = 0.2520|"
            for part in desc.split("|"):
                if part.strip().upper().startswith("MPP"):
                    with contextlib.suppress(ValueError, IndexError):
                        return float(part.split("=")[1])
        tags = page.tags
        if "XResolution" in tags and "ResolutionUnit" in tags:
            num, den = tags["XResolution"].value
            unit = int(tags["ResolutionUnit"].value)
            per_unit = num / den if den else 0.0
            um = {2: 25400.0, 3: 10000.0}.get(unit)
            if um and per_unit > 1:
                mpp = um / per_unit
                if 0.05 < mpp < 100:
                    return float(mpp)
        return None

    def _read(self, level, x0, y0, x1, y1):
        z, axes = self._arrays[level]
        index = []
        keep = []
        for ax in axes:
            if ax == "Y":
                index.append(slice(y0, y1))
                keep.append(ax)
            elif ax == "X":
                index.append(slice(x0, x1))
                keep.append(ax)
            elif ax in "SC":
                index.append(slice(None))
                keep.append(ax)
            else:  # time, z, pages...: take the first
                index.append(0)
        reg = np.asarray(z[tuple(index)])
        order = [keep.index("Y"), keep.index("X")] + [i for i, a in enumerate(keep) if a in "SC"]
        return np.transpose(reg, order)

    def close(self):
        with contextlib.suppress(Exception):
            self._tif.close()

    def __del__(self):
        self.close()


class LazyTiffLevel:
    """Array-like ``(3, y, x)`` view of one TIFF pyramid level that opens the file for each read.

    Wrapped with :func:`dask.array.from_array` it gives lazy SpatialData images that hold no open file
    handle between reads.
    """

    def __init__(self, path, level: int):
        self.path = str(path)
        self.level = level
        with TiffReader(path) as r:
            h, w = r.level_shapes[level]
        self.shape = (3, h, w)
        self.dtype = np.dtype(np.uint8)
        self.ndim = 3

    def __getitem__(self, index):
        if not isinstance(index, tuple):
            index = (index,)
        index = index + (slice(None),) * (3 - len(index))
        cs, ys, xs = (i if isinstance(i, slice) else slice(i, i + 1) for i in index)
        y0, y1, _ = ys.indices(self.shape[1])
        x0, x1, _ = xs.indices(self.shape[2])
        with TiffReader(self.path) as r:
            reg = r.read_region(self.level, x0, y0, max(x1 - x0, 0), max(y1 - y0, 0))
        out = np.moveaxis(reg, -1, 0)[cs]
        if ys.step not in (None, 1) or xs.step not in (None, 1):
            out = out[:, :: ys.step or 1, :: xs.step or 1]
        squeeze = tuple(ax for ax, i in enumerate(index) if not isinstance(i, slice))
        return out.squeeze(squeeze) if squeeze else out


def open_image(image, *, channels_first: bool | None = None) -> ImageReader:
    """Open ``image`` as an :class:`ImageReader`.

    Parameters
    ----------
    image
        A path to a JPEG/PNG/TIFF (pyramidal TIFF, SVS, OME-TIFF) file, an array ``(y, x, c)`` (numpy, dask,
        zarr), a list of arrays (a pyramid, finest first), a SpatialData image element (``DataArray`` or
        multiscale ``DataTree``), or an existing reader.
    channels_first
        For arrays: channel axis first (``None`` guesses).

    Returns
    -------
    An :class:`ImageReader` (``image`` itself when it already is one): ``shape`` is ``(height, width)`` of the
    full resolution, and ``read_region(level, x0, y0, width, height)`` returns an RGB uint8 array.

    Examples
    --------
    >>> import numpy as np
    >>> import spade_sc as ss
    >>> reader = ss.pp.open_image(np.zeros((100, 200, 3), dtype=np.uint8))
    >>> reader.shape
    (100, 200)
    >>> reader.read_region(0, 0, 0, 10, 5).shape  # level, x0, y0, width, height
    (5, 10, 3)

    Files are read lazily, region by region:

    >>> reader = ss.pp.open_image("slide.svs")  # doctest: +SKIP
    """
    if isinstance(image, ImageReader):
        return image
    if isinstance(image, (str, Path)):
        path = Path(image)
        name = path.name.lower()
        if name.endswith(_TIFF_SUFFIXES):
            return TiffReader(path)
        if name.endswith(_PIL_SUFFIXES):
            return PILReader(path)
        raise ValueError(
            f"unsupported image file {str(path)!r}; pass a JPEG/PNG/TIFF path or an RGB array (y, x, 3)."
        )
    tname = type(image).__name__
    if tname == "DataTree":  # SpatialData multiscale image
        scales = sorted(image.children, key=lambda k: int(str(k).replace("scale", "") or 0))
        arrs = []
        for k in scales:
            node = image[k]
            var = next(iter(node.data_vars))
            arrs.append(node[var])
        return ArrayReader(arrs, channels_first=_dims_cf(arrs[0]), name="spatialdata image")
    if tname == "DataArray":
        return ArrayReader([image], channels_first=_dims_cf(image), name="spatialdata image")
    if isinstance(image, (list, tuple)):
        return ArrayReader(list(image), channels_first=channels_first)
    if hasattr(image, "shape") and hasattr(image, "ndim"):
        return ArrayReader([image], channels_first=channels_first)
    raise TypeError(
        f"cannot read an image from a {tname}; pass a file path, an RGB array (y, x, 3), or a SpatialData image."
    )


def _dims_cf(arr) -> bool | None:
    dims = getattr(arr, "dims", None)
    if dims is None:
        return None
    dims = tuple(dims)
    if dims[0] == "c":
        return True
    if dims[-1] == "c":
        return False
    return None
