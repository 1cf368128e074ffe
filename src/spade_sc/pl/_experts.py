"""``pl.experts``: spots coloured by expert, by one expert's routing weight, or by routing entropy, on the H&E."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .. import _keys
from .._validate import check_choice
from ._spatial import draw_spots, draw_tissue, expert_colors, get_slide, new_axes

__all__ = ["experts", "routing_entropy"]


def routing_entropy(weights: np.ndarray) -> np.ndarray:
    """Shannon entropy (nats) of each row of routing weights: 0 = one expert, ``log K`` = all equal."""
    w = np.asarray(weights, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(w > 0, w * np.log(w), 0.0)
    return -terms.sum(axis=1)


def experts(
    adata,
    *,
    color: str = "expert",
    expert: int | None = None,
    library_id: str | None = None,
    library_key: str = _keys.LIBRARY_ID,
    key: str = _keys.DEFAULT_PREFIX,
    spatial_key: str = _keys.SPATIAL,
    spot_size: float | None = None,
    img_res_key: str | None = None,
    show_image: bool = True,
    alpha: float = 0.8,
    cmap: str = "viridis",
    palette: Sequence[str] | None = None,
    legend: bool = True,
    title: str | None = None,
    table_key: str | None = None,
    image_key: str | None = None,
    coordinate_system: str | None = None,
    ax=None,
):
    """Draw the spots of one slide over its H&E image, coloured by what SPADE learned.

    Three views of the routing: the expert of each spot (``color="expert"``), how much one expert is used
    (``color="weight"``), and the routing entropy (``color="entropy"``), an uncertainty map that is high where
    a spot's image sits between the prototypes of several experts.

    Spots are drawn as circles of their true diameter at the image's scale: AnnData images come from
    ``.uns['spatial'][library_id]['images'][img_res_key]`` with the matching
    ``scalefactors['tissue_{res}_scalef']``; SpatialData images are placed with the image element's
    transformation to the coordinate system of the spots (the element the table annotates), using the coarsest
    resolution level that still shows the tissue at about 2000 px.

    Parameters
    ----------
    adata
        AnnData, or SpatialData (with ``table_key``/``image_key`` when it has several), after
        :func:`spade_sc.tl.embed` (``"expert"`` also works after :func:`spade_sc.tl.fit_spade` alone).
    color
        ``"expert"`` (``.obs['{key}_expert']``), ``"weight"`` (column ``expert`` of
        ``.obsm['{key}_expert_weights']``) or ``"entropy"`` (routing entropy of those weights, in nats).
    expert
        The expert whose weight is drawn when ``color="weight"``.
    library_id
        The slide to draw, a value of ``.obs[library_key]``; needed when there are several.
    library_key
        ``.obs`` column of slides (for SpatialData, the table's region column is used when this is absent).
    key
        Prefix used by ``fit_spade``/``embed`` (their ``key_added``).
    spatial_key
        ``.obsm`` key of the spot centres (full-resolution pixels for AnnData; for SpatialData, coordinates of
        the annotated element).
    spot_size
        Spot diameter in the units of ``.obsm[spatial_key]`` (default: ``spot_diameter_fullres`` of the
        scale factors or the circles' radius, else 0.8 × the median spot spacing).
    img_res_key
        AnnData image to draw (``"hires"``, ``"lowres"``, …; default ``hires`` when present).
    show_image
        Draw the H&E under the spots.
    alpha
        Opacity of the spots.
    cmap
        Colormap of ``"weight"`` and ``"entropy"``.
    palette
        Colours of the experts (default ``.uns['{key}_expert_colors']`` when present, as scanpy, else
        scanpy's default palette).
    legend
        Show the legend (``"expert"``).
    title
        Axes title (default: slide and what is shown).
    table_key, image_key, coordinate_system
        SpatialData: which table, which image element, and the coordinate system in which image and spots
        are matched. By default the coordinate system is the one of the spots' element (``'global'``, or the
        library's when each library has its own, as :func:`spade_sc.io.to_spatialdata` writes them) and the
        image is the one in that coordinate system.
    ax
        Axes to draw into (a new figure when ``None``).

    Returns
    -------
    The :class:`~matplotlib.axes.Axes` (with a colorbar for ``"weight"``/``"entropy"``).

    Examples
    --------
    >>> import spade_sc as ss
    >>> adata = ss.datasets.toy()
    >>> model = ss.tl.fit_spade(adata, batch_key="slide", n_prototypes=8, n_experts=4, max_epochs=5)
    >>> ss.tl.embed(adata, model)
    >>> ax = ss.pl.experts(adata, library_id="slide0")
    >>> ax = ss.pl.experts(adata, library_id="slide0", color="weight", expert=2)
    >>> ax = ss.pl.experts(adata, library_id="slide0", color="entropy")
    """
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    check_choice("color", color, ("expert", "weight", "entropy"))
    slide = get_slide(
        adata, library_id=library_id, library_key=library_key, spatial_key=spatial_key, table_key=table_key,
        image_key=image_key, img_res_key=img_res_key, coordinate_system=coordinate_system, spot_size=spot_size,
        show_image=show_image,
    )
    table = slide.table
    col, wk = _keys.expert_key(key), _keys.weights_key(key)
    if color == "expert":
        if col not in table.obs.columns:
            raise KeyError(f"no `adata.obs[{col!r}]`; run `ss.tl.embed` (or `ss.tl.fit_spade`) first.")
        cat = table.obs[col].astype("category")
        cats = list(cat.cat.categories)
        colors = expert_colors(table, col, len(cats)) if palette is None else _palette(palette, len(cats))
        codes = cat.cat.codes.to_numpy()[slide.mask]
        if (codes < 0).any():
            raise ValueError(f"`adata.obs[{col!r}]` has missing values on this slide; rerun `ss.tl.embed`.")
    else:
        if wk not in table.obsm:
            raise KeyError(f"no routing weights in `adata.obsm[{wk!r}]`; run `ss.tl.embed` first.")
        w = np.asarray(table.obsm[wk])[slide.mask]
        if color == "weight":
            if expert is None or isinstance(expert, bool) or not isinstance(expert, (int, np.integer)) or not (
                0 <= expert < w.shape[1]
            ):
                raise ValueError(f"`color='weight'` needs `expert=` an integer in [0, {w.shape[1] - 1}], got {expert!r}.")
            values, vmax, label = w[:, expert], 1.0, f"routing weight of expert {expert}"
        else:
            values, vmax, label = routing_entropy(w), float(np.log(w.shape[1])), "routing entropy (nats)"

    ax = new_axes(ax, (6.5, 6))
    draw_tissue(ax, slide)
    if color == "expert":
        draw_spots(ax, slide, facecolors=colors[codes], alpha=alpha)
        if legend:
            handles = [
                Line2D([], [], marker="o", ls="", markersize=8, color=colors[c], label=str(cats[c]))
                for c in sorted(set(codes.tolist()))
            ]
            ax.legend(handles=handles, title="expert", loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    else:
        coll = draw_spots(ax, slide, values=values, cmap=cmap, vmin=0.0, vmax=vmax, alpha=alpha)
        plt.colorbar(coll, ax=ax, label=label, fraction=0.046, pad=0.04)
    what = {"expert": "expert", "weight": f"weight of expert {expert}", "entropy": "routing entropy"}[color]
    ax.set_title(title if title is not None else (f"{slide.library_id}: {what}" if slide.library_id else what))
    return ax


def _palette(palette, n: int) -> np.ndarray:
    from matplotlib.colors import to_rgba

    palette = list(palette)
    if len(palette) < n:
        raise ValueError(f"`palette` has {len(palette)} colours but there are {n} experts; give at least {n}.")
    return np.array([to_rgba(c) for c in palette[:n]])
