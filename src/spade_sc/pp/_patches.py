"""Spot-centred H&E patches at a fixed physical size (HEST's convention: 224 px at 0.5 µm/px)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .. import _keys
from .._logging import logger
from .._utils import get_table
from .._validate import check_anndata, check_choice, check_positive
from ._sources import (
    _EDGES,
    _RESAMPLE,
    close_sources,
    iter_patch_batches,
    resolve_image_sources,
)

__all__ = ["Patches", "check_edges", "extract_patches"]


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

    Returned by :func:`~spade_sc.pp.extract_patches` and :func:`~spade_sc.io.read_hest_patches`; indexing
    (``patches[i]``, ``patches[i:j]``, ``patches[[i, j]]``) returns NumPy arrays, ``len(patches)`` the number
    of spots.

    Parameters
    ----------
    images
        Array-like ``(n, size, size, 3)`` of RGB uint8 patches: a NumPy array or anything sliceable with a
        ``shape`` (e.g. an ``h5py`` dataset read on demand).
    obs_names
        Spot (barcode) of each patch, ``n`` names (stored as strings).
    coords
        Top-left corner ``(x, y)`` of each patch in full-resolution pixels (HEST's ``coords``), ``(n, 2)``.
    coverage
        Fraction of each patch inside the image, ``(n,)``.
    mpp
        µm per patch pixel (0.5 for HEST).
    source
        Free text naming where the patches come from (shown in the ``repr``).

    Attributes
    ----------
    images
        Array-like of RGB patches.
    obs_names
        Spot (barcode) of each patch (object array of ``str``).
    coords
        Top-left corner of each patch in full-resolution pixels (HEST's ``coords``), or ``None``.
    coverage
        Fraction of each patch inside the image (1 for HEST patch files), or ``None``.
    mpp
        µm per patch pixel (0.5 for HEST).
    source
        Where the patches come from (a file name, or the images they were cropped from).
    patch_size
        Side of the square patches in pixels.

    Raises
    ------
    ValueError
        If ``obs_names`` and ``images`` differ in length, or ``images`` is not ``(n, h, w, 3)``.

    Examples
    --------
    >>> import spade_sc as ss
    >>> adata = ss.datasets.toy()
    >>> patches = ss.pp.extract_patches(adata, patch_size=32, mpp=2.0)
    >>> len(patches), patches.patch_size, patches[0].shape
    (1600, 32, (32, 32, 3))
    >>> patches.obs_names[0] == adata.obs_names[0]
    True

    Build one from arrays, write it in HEST's layout and open it again lazily:

    >>> import numpy as np
    >>> small = ss.pp.Patches(np.zeros((2, 16, 16, 3), np.uint8), ["a", "b"], coords=[[0, 0], [16, 0]])
    >>> path = small.to_h5("patches/small.h5")  # doctest: +SKIP
    >>> ss.pp.Patches.from_h5(path)  # doctest: +SKIP
    Patches(2 × 16×16 px at 0.5 µm/px, small.h5)
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
            ds = f.create_dataset(
                "img", shape=(n, s, s, 3), dtype=np.uint8, chunks=(1, s, s, 3) if n else None
            )
            for start in range(0, n, 256):
                ds[start : start + 256] = self[slice(start, start + 256)]
            ds.attrs["patch_size_target"] = s
            coords = self.coords if self.coords is not None else np.zeros((n, 2))
            f.create_dataset("coords", data=np.round(coords).astype(np.int64))
            f.create_dataset(
                "barcode", data=np.array([b.encode() for b in self.obs_names], dtype="S")[:, None]
            )
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
        return cls(
            _H5Images(path), names, coords=coords, coverage=np.ones(len(names)), mpp=mpp, source=path.name
        )


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
    ``coords`` (top-left corners, in the coordinates of ``obsm[spatial_key]``) and ``coverage``. Nothing is
    written to ``adata``.

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
        _, c, _, cov = src.plan(patch_size=patch_size, mpp=mpp)
        coverage[src.obs_index] = cov
        corners[src.obs_index] = src.to_spot_coordinates(c)  # in the units of obsm['spatial']
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
