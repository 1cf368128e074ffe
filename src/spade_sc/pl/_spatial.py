"""Shared machinery of the tissue plots: which spots, where they fall on the H&E, and how to draw them.

Coordinates are always those of the pixels of the image that is drawn, so spots land where they belong
whatever the image's resolution (AnnData: ``uns['spatial'][library]['scalefactors']``; SpatialData: the
image element's transformation to the coordinate system of the spots).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from anndata import AnnData

from .. import _keys
from .._utils import get_table, is_spatialdata
from .._validate import check_anndata

__all__ = ["Slide", "get_slide", "draw_spots", "draw_tissue", "expert_colors", "new_axes", "split_axes"]


@dataclass
class Slide:
    """Spots of one slide placed on (one resolution level of) its H&E image.

    ``xy`` and ``radius`` are in pixels of ``image`` (``None`` when there is no image: then they are in
    the spots' own coordinates).
    """

    table: AnnData
    mask: np.ndarray
    xy: np.ndarray
    radius: float
    image: object | None = None  # (y, x, c) array-like: numpy array or a lazy xarray DataArray
    library_id: str | None = None
    extra: dict = field(default_factory=dict)

    @property
    def obs(self):
        return self.table.obs[self.mask]


# ---------------------------------------------------------------------------------------------- selection
def _select_library(table: AnnData, library_id, library_key: str, fallback_key: str | None = None):
    """Boolean mask of the spots of ``library_id`` and the library id actually used."""
    key = library_key if library_key in table.obs.columns else fallback_key
    if key is None or key not in table.obs.columns:
        if library_id is not None:
            raise KeyError(
                f"`library_id={library_id!r}` was given but `adata.obs` has no column {library_key!r}; "
                "pass `library_key=` naming the column of slides."
            )
        return np.ones(table.n_obs, dtype=bool), None
    libs = table.obs[key].astype(str)
    if library_id is None:
        uniq = libs.unique()
        if len(uniq) > 1:
            shown = ", ".join(map(repr, uniq[:8])) + (", …" if len(uniq) > 8 else "")
            raise ValueError(
                f"{len(uniq)} slides in `adata.obs[{key!r}]` ({shown}); pass `library_id=` to choose one."
            )
        library_id = uniq[0]
    mask = (libs == str(library_id)).to_numpy()
    if not mask.any():
        shown = ", ".join(map(repr, libs.unique()[:8]))
        raise ValueError(f"`library_id={library_id!r}` is not in `adata.obs[{key!r}]` (slides: {shown}).")
    return mask, str(library_id)


def _spacing(xy: np.ndarray) -> float:
    """Median nearest-neighbour distance of the points (1.0 when undefined)."""
    if len(xy) < 2:
        return 1.0
    from scipy.spatial import cKDTree

    d, _ = cKDTree(xy).query(xy, k=2)
    d = d[:, 1]
    d = d[d > 0]
    return float(np.median(d)) if len(d) else 1.0


def _coords(table: AnnData, mask: np.ndarray, spatial_key: str) -> np.ndarray:
    if spatial_key not in table.obsm:
        keys = ", ".join(map(repr, table.obsm.keys())) or "none"
        raise KeyError(
            f"no spot coordinates in `adata.obsm[{spatial_key!r}]` (obsm has: {keys}); pass `spatial_key=`."
        )
    xy = np.asarray(table.obsm[spatial_key], dtype=float)[mask]
    if xy.ndim != 2 or xy.shape[1] < 2:
        raise ValueError(f"`adata.obsm[{spatial_key!r}]` must be n_obs × 2 (x, y), got shape {xy.shape}.")
    return xy[:, :2]


def get_slide(
    data,
    *,
    library_id: str | None = None,
    library_key: str = _keys.LIBRARY_ID,
    spatial_key: str = _keys.SPATIAL,
    table_key: str | None = None,
    image_key: str | None = None,
    img_res_key: str | None = None,
    coordinate_system: str | None = None,
    spot_size: float | None = None,
    target_px: int | None = 2000,
    show_image: bool = True,
) -> Slide:
    """Locate one slide's spots on its image. See :func:`spade_sc.pl.experts` for the parameters.

    ``target_px``: for multiscale SpatialData images, use the coarsest level on which the spots' bounding
    box still spans at least this many pixels (``None``: full resolution).
    """
    if is_spatialdata(data):
        return _slide_spatialdata(
            data, library_id=library_id, library_key=library_key, spatial_key=spatial_key, table_key=table_key,
            image_key=image_key, coordinate_system=coordinate_system, spot_size=spot_size, target_px=target_px,
            show_image=show_image,
        )
    table = check_anndata(get_table(data, table_key))
    mask, lib = _select_library(table, library_id, library_key)
    xy = _coords(table, mask, spatial_key)
    spatial = table.uns.get("spatial", {})
    if lib is None and isinstance(spatial, dict) and len(spatial) == 1:
        lib = next(iter(spatial))
    info = spatial.get(lib, {}) if isinstance(spatial, dict) and lib is not None else {}
    images = info.get("images", {}) or {}
    sf = info.get("scalefactors", {}) or {}
    image, scale = None, 1.0
    if show_image and images:
        if img_res_key is not None:
            if img_res_key not in images:
                raise KeyError(
                    f"`img_res_key={img_res_key!r}` is not an image of slide {lib!r} (images: {list(images)})."
                )
            res = img_res_key
        else:
            res = next((r for r in ("hires", "lowres") if r in images), next(iter(images)))
        image = np.asarray(images[res])
        scale = float(sf.get(f"tissue_{res}_scalef", 1.0))
    if spot_size is None:
        spot_size = float(sf["spot_diameter_fullres"]) if "spot_diameter_fullres" in sf else 0.8 * _spacing(xy)
    return Slide(table, mask, xy * scale, spot_size * scale / 2, image, lib)


# ---------------------------------------------------------------------------------------------- SpatialData
def _affine(element, coordinate_system: str, what: str) -> np.ndarray:
    from spatialdata.transformations import get_transformation

    all_tr = get_transformation(element, get_all=True)
    if coordinate_system not in all_tr:
        raise ValueError(
            f"{what} has no transformation to coordinate system {coordinate_system!r} "
            f"(it has: {list(all_tr)}); pass `coordinate_system=`."
        )
    return np.asarray(
        all_tr[coordinate_system].to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y")), dtype=float
    )


def _levels(element) -> list:
    """The DataArrays of an image element, finest first."""
    from xarray import DataArray

    if isinstance(element, DataArray):
        return [element]
    out = []
    for name in sorted(element.keys(), key=lambda s: int("".join(c for c in s if c.isdigit()) or 0)):
        node = element[name]
        ds = node.ds if hasattr(node, "ds") else node
        out.append(next(iter(ds.data_vars.values())))
    return out


def _slide_spatialdata(
    sdata, *, library_id, library_key, spatial_key, table_key, image_key, coordinate_system, spot_size, target_px,
    show_image,
) -> Slide:
    table = check_anndata(get_table(sdata, table_key))
    attrs = table.uns.get("spatialdata_attrs", {}) or {}
    region_key = attrs.get("region_key")
    mask, lib = _select_library(table, library_id, library_key, fallback_key=region_key)
    # the element the selected spots annotate (for their transformation and circle radii)
    region = None
    if region_key is not None and region_key in table.obs.columns:
        regions = table.obs[region_key][mask].astype(str).unique()
        if len(regions) == 1:
            region = regions[0]
    elif isinstance(attrs.get("region"), str):
        region = attrs["region"]
    shapes = sdata.shapes[region] if region is not None and region in sdata.shapes else None
    if spatial_key in table.obsm:
        xy = _coords(table, mask, spatial_key)
    elif shapes is not None and "instance_key" in attrs:
        ids = table.obs[attrs["instance_key"]][mask].to_numpy()
        geo = shapes.loc[ids].geometry
        xy = np.stack([geo.centroid.x.to_numpy(), geo.centroid.y.to_numpy()], 1)
    else:
        raise KeyError(
            f"no spot coordinates: `adata.obsm[{spatial_key!r}]` is missing and the table does not annotate "
            "a shapes element; pass `spatial_key=`."
        )
    element = shapes if shapes is not None else (sdata.points[region] if region in sdata.points else None)
    spot_systems = list(_systems(element)) if element is not None else []
    image_systems = {k: _systems(v) for k, v in sdata.images.items()}
    if coordinate_system is None:
        coordinate_system = _choose_system(spot_systems, image_systems, image_key, lib)
    if element is not None:
        m_spot = _affine(element, coordinate_system, f"element {region!r}")
    else:
        m_spot = np.eye(3)
    if spot_size is None:
        if shapes is not None and "radius" in shapes.columns:
            spot_size = 2.0 * float(np.median(shapes["radius"]))
        else:
            spot_size = 0.8 * _spacing(xy)
    image, m = None, m_spot
    if image_key is not None and image_key not in sdata.images:
        raise KeyError(f"`image_key={image_key!r}` is not an image of this SpatialData (images: {list(sdata.images)}).")
    if show_image and len(sdata.images):
        if image_key is None:
            same = [k for k, cs in image_systems.items() if coordinate_system in cs]
            if len(same) > 1 and lib is not None:
                named = [k for k in same if str(lib) in k]
                same = named if len(named) == 1 else same
            if len(same) > 1:
                raise ValueError(
                    f"{len(same)} images are in coordinate system {coordinate_system!r} "
                    f"({', '.join(map(repr, same))}); pass `image_key=` to say which one to draw."
                )
            image_key = same[0] if same else None
    if show_image and image_key is not None:
        levels = _levels(sdata.images[image_key])
        # coarsest level on which the spots still span `target_px` pixels
        chosen = None
        for da in levels if target_px is None else reversed(levels):
            m_img = _affine(da, coordinate_system, f"image {image_key!r}")
            m_try = np.linalg.inv(m_img) @ m_spot
            p = _apply(m_try, xy)
            span = float(np.ptp(p, axis=0).max()) if len(p) > 1 else 0.0
            chosen = (da, m_try)
            if target_px is None or span >= target_px:
                break
        da, m = chosen
        image = da.transpose("y", "x", "c") if "c" in da.dims else da.transpose("y", "x")
    scale = float(np.sqrt(abs(np.linalg.det(m[:2, :2]))))
    return Slide(table, mask, _apply(m, xy), spot_size * scale / 2, image, lib)


def _systems(element) -> dict:
    from spatialdata.transformations import get_transformation

    return get_transformation(element, get_all=True)


def _choose_system(spot_systems: list, image_systems: dict, image_key, lib) -> str:
    """The coordinate system shared by the spots and the image: the only one, else 'global', else the library's."""
    cands = list(spot_systems)
    if image_key is not None and image_key in image_systems:
        cands = [c for c in cands if c in image_systems[image_key]] if cands else list(image_systems[image_key])
    if not cands:
        return "global"
    if len(cands) == 1:
        return cands[0]
    for pick in ("global", None if lib is None else str(lib)):
        if pick in cands:
            return pick
    raise ValueError(
        f"the spots are in several coordinate systems ({', '.join(map(repr, cands))}); pass `coordinate_system=`."
    )


def _apply(m: np.ndarray, xy: np.ndarray) -> np.ndarray:
    return xy @ m[:2, :2].T + m[:2, 2]


# ---------------------------------------------------------------------------------------------- images
def to_rgb(arr) -> np.ndarray:
    """An image crop as something ``imshow`` draws faithfully: uint8 / [0, 1] float RGB(A) or grey."""
    a = np.asarray(arr)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[..., 0]
    if a.ndim == 3 and a.shape[2] > 4:
        a = a[..., :3]
    if a.dtype == np.uint8 or a.dtype == bool:
        return a
    a = a.astype(np.float32)
    if a.size and (a.min() < 0 or a.max() > 1):
        hi = 255.0 if a.max() <= 255 and a.min() >= 0 else float(np.percentile(a, 99.5)) or 1.0
        lo = 0.0 if hi == 255.0 else float(a.min())
        a = np.clip((a - lo) / max(hi - lo, 1e-12), 0, 1)
    return a


def crop_image(slide: Slide, *, margin: float | None = None, max_px: int = 2000):
    """Crop ``slide.image`` to the spots (plus ``margin`` px) and stride it to ``max_px``; returns (img, extent)."""
    if slide.image is None:
        return None, None
    h, w = slide.image.shape[:2]
    margin = 2 * slide.radius if margin is None else margin
    x0 = int(max(0, np.floor(slide.xy[:, 0].min() - slide.radius - margin)))
    x1 = int(min(w, np.ceil(slide.xy[:, 0].max() + slide.radius + margin)))
    y0 = int(max(0, np.floor(slide.xy[:, 1].min() - slide.radius - margin)))
    y1 = int(min(h, np.ceil(slide.xy[:, 1].max() + slide.radius + margin)))
    if x1 <= x0 or y1 <= y0:  # spots outside the image
        return None, None
    step = max(1, int(np.ceil(max(x1 - x0, y1 - y0) / max_px)))
    img = to_rgb(slide.image[y0:y1:step, x0:x1:step])
    ny, nx = img.shape[:2]
    extent = (x0 - 0.5, x0 + nx * step - 0.5, y0 + ny * step - 0.5, y0 - 0.5)
    return img, extent


def patch(slide: Slide, center, half: int) -> np.ndarray:
    """A ``(2 half) × (2 half)`` window of the image around ``center`` (padded white at the borders)."""
    h, w = slide.image.shape[:2]
    cx, cy = (int(round(c)) for c in center)
    y0, y1, x0, x1 = cy - half, cy + half, cx - half, cx + half
    sub = to_rgb(slide.image[max(0, y0) : min(h, y1), max(0, x0) : min(w, x1)])
    if sub.dtype != np.uint8:
        sub = (np.clip(sub, 0, 1) * 255).astype(np.uint8)
    if sub.ndim == 2:
        sub = np.repeat(sub[..., None], 3, axis=2)
    out = np.full((2 * half, 2 * half, sub.shape[2]), 255, dtype=np.uint8)
    oy, ox = max(0, -y0), max(0, -x0)
    out[oy : oy + sub.shape[0], ox : ox + sub.shape[1]] = sub
    return out


# ---------------------------------------------------------------------------------------------- drawing
def draw_tissue(ax, slide: Slide, *, margin: float | None = None, max_px: int = 2000):
    """Draw the H&E crop (if any) and set limits/aspect to the spots; returns the image's extent."""
    img, extent = crop_image(slide, margin=margin, max_px=max_px)
    if img is not None:
        ax.imshow(img, extent=extent, interpolation="nearest" if max(img.shape[:2]) < 600 else "antialiased")
    pad = slide.radius + (2 * slide.radius if margin is None else margin)
    xy = slide.xy
    ax.set_xlim(xy[:, 0].min() - pad, xy[:, 0].max() + pad)
    ax.set_ylim(xy[:, 1].max() + pad, xy[:, 1].min() - pad)  # image convention: y down
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])
    return extent


def draw_spots(ax, slide: Slide, *, facecolors=None, values=None, cmap="viridis", vmin=None, vmax=None,
               alpha: float = 0.8, edgecolor="none"):
    """Draw the spots as circles of the true diameter (data units); returns the collection."""
    from matplotlib.collections import EllipseCollection

    d = np.full(len(slide.xy), 2 * slide.radius)
    coll = EllipseCollection(
        d, d, np.zeros_like(d), units="xy", offsets=slide.xy, offset_transform=ax.transData,
        alpha=alpha, edgecolors=edgecolor, linewidths=0.5 if edgecolor != "none" else 0,
    )
    if values is not None:
        coll.set_array(np.asarray(values, dtype=float))
        coll.set_cmap(cmap)
        coll.set_clim(vmin, vmax)
    elif facecolors is not None:
        coll.set_facecolor(facecolors)
    ax.add_collection(coll, autolim=False)
    return coll


def expert_colors(table: AnnData, col: str, n: int) -> np.ndarray:
    """``n`` RGBA colours for the categories of ``.obs[col]``: scanpy's ``uns['{col}_colors']`` if present."""
    from matplotlib.colors import to_rgba

    stored = table.uns.get(f"{col}_colors") if table is not None else None
    if stored is not None and len(stored) >= n:
        return np.array([to_rgba(c) for c in list(stored)[:n]])
    return np.array([to_rgba(c) for c in default_palette(n)])


def default_palette(n: int) -> list[str]:
    """scanpy's default categorical palettes (tab10 / tab20 / the 102-colour one) as hex strings."""
    from matplotlib import colormaps
    from matplotlib.colors import to_hex

    if n <= 10:
        return [to_hex(c) for c in colormaps["tab10"].colors[:n]]
    if n <= 20:
        return [to_hex(c) for c in colormaps["tab20"].colors[:n]]
    from scanpy.plotting.palettes import default_102

    return [default_102[i % len(default_102)] for i in range(n)]


def new_axes(ax, figsize):
    """``ax`` or a fresh Axes of a new figure."""
    if ax is not None:
        return ax
    import matplotlib.pyplot as plt

    _, ax = plt.subplots(figsize=figsize)
    return ax


def split_axes(ax, nrows: int, ncols: int, figsize, **gridspec_kw):
    """A figure with an ``nrows × ncols`` grid of Axes: new, or in the place of ``ax`` (which is removed).

    ``ax`` may also be a sequence of ``nrows × ncols`` Axes, used as they are.
    """
    import matplotlib.pyplot as plt

    if ax is None:
        fig, axs = plt.subplots(nrows, ncols, figsize=figsize, squeeze=False, gridspec_kw=gridspec_kw or None)
        return fig, axs
    if isinstance(ax, (list, tuple, np.ndarray)):
        axs = np.asarray(ax, dtype=object).ravel()
        if len(axs) != nrows * ncols:
            raise ValueError(f"`ax` must be one Axes or {nrows * ncols} Axes, got {len(axs)}.")
        return axs[0].figure, axs.reshape(nrows, ncols)
    fig = ax.figure
    spec = ax.get_subplotspec()
    if spec is None:
        raise ValueError("`ax` must be a subplot (made with `plt.subplots` or `fig.add_subplot`).")
    sub = spec.subgridspec(nrows, ncols, **gridspec_kw)
    ax.remove()
    axs = np.empty((nrows, ncols), dtype=object)
    for i in range(nrows):
        for j in range(ncols):
            axs[i, j] = fig.add_subplot(sub[i, j])
    return fig, axs
