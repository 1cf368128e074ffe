"""``pl.gene_maps``: measured against predicted expression of some genes, side by side on the tissue."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp

from .. import _keys
from ._spatial import draw_spots, draw_tissue, get_slide, split_axes

__all__ = ["gene_maps"]


def _measured(table, genes, layer, normalize, target_sum=1e4) -> np.ndarray:
    x = table.X if layer is None else table.layers[layer] if layer in table.layers else None
    where = "adata.X" if layer is None else f"adata.layers[{layer!r}]"
    if x is None:
        keys = ", ".join(map(repr, table.layers.keys())) or "none"
        raise KeyError(f"`layer={layer!r}` is not in `adata.layers` (layers: {keys}).")
    pos = table.var_names.get_indexer(genes)
    missing = [g for g, p in zip(genes, pos, strict=True) if p < 0]
    if missing:
        raise KeyError(f"genes {missing[:5]} are not in `adata.var_names`; measured values need them there.")
    if sp.issparse(x):
        x = sp.csr_matrix(x)
        sub = x[:, pos].toarray().astype(np.float64)
        data = x.data
    else:
        x = np.asarray(x)
        sub = x[:, pos].astype(np.float64)
        data = x
    if not normalize:
        return sub
    sample = np.asarray(data).ravel()[:1_000_000]
    if sample.size and ((sample < 0).any() or not np.allclose(sample, np.round(sample))):
        raise ValueError(
            f"{where} does not hold raw counts (negative or non-integer values), so it cannot be normalised; "
            "pass `normalize=False` to draw it as it is, or `layer=` naming raw counts."
        )
    totals = np.asarray(x.sum(1)).ravel().astype(np.float64)
    with np.errstate(divide="ignore"):
        f = np.where(totals > 0, target_sum / totals, 0.0)
    return np.log1p(sub * f[:, None])


def _predicted(table, genes, predicted_key, predicted_layer) -> np.ndarray:
    if predicted_layer is not None:
        if predicted_layer not in table.layers:
            keys = ", ".join(map(repr, table.layers.keys())) or "none"
            raise KeyError(f"`predicted_layer={predicted_layer!r}` is not in `adata.layers` (layers: {keys}).")
        pos = table.var_names.get_indexer(genes)
        if (pos < 0).any():
            raise KeyError(f"genes {[g for g, p in zip(genes, pos, strict=True) if p < 0][:5]} are not in `adata.var_names`.")
        x = table.layers[predicted_layer]
        x = x[:, pos]
        return np.asarray(x.toarray() if sp.issparse(x) else x, dtype=np.float64)
    if predicted_key not in table.obsm:
        raise KeyError(
            f"no predicted expression in `adata.obsm[{predicted_key!r}]`; run `ss.tl.predict_expression` first, or "
            "pass `predicted_key=` / `predicted_layer=` naming where the predictions are."
        )
    pred = table.obsm[predicted_key]
    if isinstance(pred, pd.DataFrame):
        names = pd.Index(pred.columns.astype(str))
        values = pred.to_numpy()
    else:
        meta = table.uns.get(predicted_key, {})
        names = meta.get("genes") if isinstance(meta, dict) else None
        if names is None:
            raise KeyError(
                f"`adata.obsm[{predicted_key!r}]` has no gene names: expected them in "
                f"`adata.uns[{predicted_key!r}]['genes']` (as `ss.tl.predict_expression` writes)."
            )
        names = pd.Index(np.asarray(names).astype(str))
        values = np.asarray(pred.toarray() if sp.issparse(pred) else pred)
    pos = names.get_indexer(genes)
    missing = [g for g, p in zip(genes, pos, strict=True) if p < 0]
    if missing:
        raise KeyError(
            f"genes {missing[:5]} were not predicted (`adata.obsm[{predicted_key!r}]` has {len(names)} genes, "
            f"e.g. {', '.join(names[:5])}); choose predicted genes, or predict them with "
            "`ss.tl.predict_expression(..., genes=[...])`."
        )
    return values[:, pos].astype(np.float64)


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    den = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / den) if den > 0 else float("nan")


def gene_maps(
    adata,
    genes: str | Sequence[str],
    *,
    predicted_key: str = _keys.predicted_key(),
    predicted_layer: str | None = None,
    layer: str | None = None,
    normalize: bool = True,
    share_scale: bool = False,
    library_id: str | None = None,
    library_key: str = _keys.LIBRARY_ID,
    spatial_key: str = _keys.SPATIAL,
    spot_size: float | None = None,
    img_res_key: str | None = None,
    show_image: bool = True,
    alpha: float = 1.0,
    cmap: str = "viridis",
    table_key: str | None = None,
    image_key: str | None = None,
    coordinate_system: str | None = None,
    ax=None,
):
    """Measured and predicted expression of ``genes`` side by side on one slide (one row per gene).

    The predicted panel's title gives Pearson's r between the two over the slide's spots.

    Parameters
    ----------
    adata
        AnnData (or SpatialData) holding both the measured expression and the predictions.
    genes
        One gene or several.
    predicted_key
        ``.obsm`` key of the predictions, as :func:`spade_sc.tl.predict_expression` writes them
        (columns named by ``.uns[predicted_key]['genes']``, or a DataFrame's columns).
    predicted_layer
        Read the predictions from this layer instead (genes = ``var_names``).
    layer
        Measured expression (``.X`` when ``None``).
    normalize
        Draw the measured counts as ``log1p(CP10k)`` (totals over all genes, the scale of
        ``predict_expression``); ``False`` draws ``layer`` as it is.
    share_scale
        One colour scale per gene for both panels (default: each panel its own range, which compares
        patterns when predictions are smoother than the data).
    library_id, library_key, spatial_key, spot_size, img_res_key, show_image, alpha, cmap
        As in :func:`spade_sc.pl.experts`.
    table_key, image_key, coordinate_system
        SpatialData: which table, which image element, and the coordinate system matching them.
    ax
        One Axes to split into ``len(genes) × 2`` panels, or that many Axes; a new figure when ``None``.

    Returns
    -------
    The :class:`~matplotlib.figure.Figure`.

    Examples
    --------
    >>> import spade_sc as ss
    >>> adata = ss.datasets.toy()
    >>> ref = adata[adata.obs["slide"] != "slide3"].copy()
    >>> query = adata[adata.obs["slide"] == "slide3"].copy()
    >>> model = ss.tl.fit_spade(ref, batch_key="slide", n_prototypes=8, n_experts=4, max_epochs=5)
    >>> ss.tl.predict_expression(query, model, reference=ref)
    >>> fig = ss.pl.gene_maps(query, ["TUM1", "IMM1"], layer="counts")
    """
    import matplotlib.pyplot as plt

    genes = [genes] if isinstance(genes, str) else [str(g) for g in genes]
    if not genes:
        raise ValueError("`genes` is empty; name at least one gene.")
    slide = get_slide(
        adata, library_id=library_id, library_key=library_key, spatial_key=spatial_key, table_key=table_key,
        image_key=image_key, img_res_key=img_res_key, coordinate_system=coordinate_system, spot_size=spot_size,
        show_image=show_image,
    )
    table = slide.table
    meas = _measured(table, genes, layer, normalize)[slide.mask]
    pred = _predicted(table, genes, predicted_key, predicted_layer)[slide.mask]
    fig, axs = split_axes(ax, len(genes), 2, (9, 4.2 * len(genes)), wspace=0.35, hspace=0.25)
    unit = "log1p(CP10k)" if normalize else "expression"
    for i, g in enumerate(genes):
        lo, hi = (min(meas[:, i].min(), pred[:, i].min()), max(meas[:, i].max(), pred[:, i].max()))
        r = _pearson(meas[:, i], pred[:, i])
        for j, (vals, what) in enumerate(((meas[:, i], "measured"), (pred[:, i], "predicted"))):
            a = axs[i, j]
            draw_tissue(a, slide)
            kw = {"vmin": lo, "vmax": hi} if share_scale else {"vmin": vals.min(), "vmax": vals.max()}
            coll = draw_spots(a, slide, values=vals, cmap=cmap, alpha=alpha, **kw)
            plt.colorbar(coll, ax=a, fraction=0.046, pad=0.04, label=f"{g} {unit}" if j == 0 else f"{g} predicted")
            title = f"{g}: measured" if j == 0 else f"{g}: predicted (r = {r:.2f})"
            a.set_title(title)
    return fig
