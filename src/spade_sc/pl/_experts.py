"""``pl.experts``: spots coloured by expert over the H&E image."""

from __future__ import annotations

import numpy as np

from .. import _keys
from .._utils import get_table
from .._validate import check_anndata

__all__ = ["experts"]


def _hires_image(adata, library_id):
    spatial = adata.uns.get("spatial", {})
    if library_id not in spatial:
        return None, 1.0
    lib = spatial[library_id]
    images = lib.get("images", {})
    sf = lib.get("scalefactors", {})
    for res in ("hires", "lowres"):
        if res in images:
            return np.asarray(images[res]), float(sf.get(f"tissue_{res}_scalef", 1.0))
    return None, 1.0


def experts(
    adata,
    *,
    color: str = "expert",
    expert: int | None = None,
    library_id: str | None = None,
    library_key: str = _keys.LIBRARY_ID,
    key: str = _keys.DEFAULT_PREFIX,
    spot_size: float | None = None,
    alpha: float = 0.8,
    cmap: str = "viridis",
    palette: str = "tab20",
    table_key: str | None = None,
    ax=None,
):
    """Draw spots coloured by expert (or one expert's weight, or routing entropy) over the H&E image.

    Parameters
    ----------
    adata
        AnnData (or SpatialData with ``table_key``) after :func:`spade_sc.tl.embed` or ``fit_spade``.
    color
        ``"expert"`` (categorical ``.obs['{key}_expert']``), ``"weight"`` (``.obsm['{key}_expert_weights']``
        of ``expert``) or ``"entropy"`` (routing entropy, an uncertainty map).
    expert
        Expert whose weight is drawn when ``color="weight"``.
    library_id
        Slide to draw (a value of ``.obs[library_key]``); needed when there are several.
    library_key
        ``.obs`` column of slides.
    key
        Prefix used by ``fit_spade``/``embed``.
    spot_size
        Marker diameter in image pixels (default: from the scale factors, else the median spot spacing).
    alpha, cmap, palette
        Drawing options.
    table_key
        Table to use when ``adata`` is a SpatialData.
    ax
        Matplotlib axes to draw into (a new figure when ``None``).

    Returns
    -------
    The :class:`matplotlib.axes.Axes`.
    """
    import matplotlib.pyplot as plt
    from matplotlib.patches import Circle
    from matplotlib.collections import PatchCollection

    adata = check_anndata(get_table(adata, table_key))
    if _keys.SPATIAL not in adata.obsm:
        raise KeyError(f"no spot coordinates in `adata.obsm[{_keys.SPATIAL!r}]`.")
    if library_key in adata.obs.columns:
        libs = adata.obs[library_key].astype(str)
        if library_id is None:
            if libs.nunique() > 1:
                raise ValueError(
                    f"several slides in `adata.obs[{library_key!r}]` ({', '.join(libs.unique()[:5])}); "
                    "pass `library_id=` to choose one."
                )
            library_id = libs.iloc[0]
        sel = (libs == str(library_id)).to_numpy()
        if not sel.any():
            raise ValueError(f"`library_id={library_id!r}` is not in `adata.obs[{library_key!r}]`.")
    else:
        sel = np.ones(adata.n_obs, dtype=bool)
        if library_id is None and len(adata.uns.get("spatial", {})) == 1:
            library_id = next(iter(adata.uns["spatial"]))
    sub = adata[sel]
    img, scale = _hires_image(adata, library_id)
    xy = np.asarray(sub.obsm[_keys.SPATIAL], dtype=float) * scale
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 6))
    if img is not None:
        ax.imshow(img, interpolation="nearest")
    if spot_size is None:
        sf = adata.uns.get("spatial", {}).get(library_id, {}).get("scalefactors", {})
        if "spot_diameter_fullres" in sf:
            spot_size = float(sf["spot_diameter_fullres"])
        else:
            from scipy.spatial import cKDTree

            d, _ = cKDTree(xy / scale).query(xy / scale, k=2) if len(xy) > 1 else (np.ones((1, 2)), None)
            spot_size = float(np.median(d[:, 1])) * 0.8
    radius = spot_size * scale / 2
    circles = [Circle((x, y), radius) for x, y in xy]
    coll = PatchCollection(circles, alpha=alpha, linewidths=0)
    if color == "expert":
        col = _keys.expert_key(key)
        if col not in sub.obs.columns:
            raise KeyError(f"no `adata.obs[{col!r}]`; run `ss.tl.embed` (or `ss.tl.fit_spade`) first.")
        cats = sub.obs[col].astype("category")
        all_cats = list(adata.obs[col].astype("category").cat.categories)
        colors = plt.get_cmap(palette)(np.arange(len(all_cats)) % 20)
        codes = np.array([all_cats.index(c) for c in cats])
        coll.set_facecolor(colors[codes])
        from matplotlib.lines import Line2D

        present = sorted(set(codes))
        handles = [Line2D([], [], marker="o", ls="", color=colors[c], label=str(all_cats[c])) for c in present]
        ax.legend(handles=handles, title="expert", loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    elif color in ("weight", "entropy"):
        wk = _keys.weights_key(key)
        if wk not in sub.obsm:
            raise KeyError(f"no `adata.obsm[{wk!r}]`; run `ss.tl.embed` first.")
        w = np.asarray(sub.obsm[wk])
        if color == "weight":
            if expert is None or not (0 <= expert < w.shape[1]):
                raise ValueError(f"`color='weight'` needs `expert=` in [0, {w.shape[1] - 1}], got {expert!r}.")
            values, label = w[:, expert], f"weight of expert {expert}"
        else:
            with np.errstate(divide="ignore", invalid="ignore"):
                values = -np.nansum(np.where(w > 0, w * np.log(w), 0.0), axis=1)
            label = "routing entropy (nats)"
        coll.set_array(values)
        coll.set_cmap(cmap)
        plt.colorbar(coll, ax=ax, label=label, fraction=0.046, pad=0.04)
    else:
        raise ValueError(f"`color` must be 'expert', 'weight' or 'entropy', got {color!r}.")
    ax.add_collection(coll)
    if img is None:
        ax.set_xlim(xy[:, 0].min() - radius, xy[:, 0].max() + radius)
        ax.set_ylim(xy[:, 1].max() + radius, xy[:, 1].min() - radius)
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(f"{library_id}: {color}" if library_id is not None else color)
    return ax
