"""``pl.expert_genes``: what characterises each expert — its marker genes and its prototype H&E patches."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from .. import _keys
from .._logging import logger
from .._utils import get_table
from .._validate import check_anndata, check_positive, get_rep
from ._gene_maps import _measured
from ._spatial import default_palette, expert_colors, get_slide, patch

__all__ = ["expert_genes", "expert_markers", "prototype_spots"]


def _expert_labels(table, model, key: str, use_rep: str) -> np.ndarray:
    col = _keys.expert_key(key)
    if col in table.obs.columns:
        lab = table.obs[col]
        if lab.isna().any():
            raise ValueError(f"`adata.obs[{col!r}]` has missing values; rerun `ss.tl.embed`.")
        return lab.astype(int).to_numpy()
    return model.route(get_rep(table, use_rep)).argmax(1)


def expert_markers(
    table, labels: np.ndarray, genes, *, layer: str | None = None, normalize: bool = True, n_genes: int = 5
) -> pd.DataFrame:
    """Marker genes of each expert: genes whose expression is highest in its spots relative to the others.

    The score of gene ``g`` for expert ``e`` is the standardised mean difference (Cohen's d) of
    ``log1p(CP10k)`` expression between the spots of ``e`` and all other spots. Each gene is kept for the
    expert where it scores best; each expert gets its ``n_genes`` best genes with a positive score.

    Returns a DataFrame with columns ``expert, gene, score, mean_in, mean_out`` ordered by expert, then score.
    """
    genes = [str(g) for g in genes]
    x = _measured(table, genes, layer, normalize)
    labels = np.asarray(labels)
    rows = []
    for e in np.unique(labels):
        inside = labels == e
        if inside.all():
            continue
        a, b = x[inside], x[~inside]
        mean_in, mean_out = a.mean(0), b.mean(0)
        pooled = np.sqrt((a.var(0) + b.var(0)) / 2 + 1e-12)
        rows.append(pd.DataFrame({"expert": int(e), "gene": genes, "score": (mean_in - mean_out) / pooled,
                                  "mean_in": mean_in, "mean_out": mean_out}))
    if not rows:
        return pd.DataFrame(columns=["expert", "gene", "score", "mean_in", "mean_out"])
    df = pd.concat(rows, ignore_index=True)
    df = df[df["score"] > 0]
    df = df.sort_values("score", ascending=False).drop_duplicates("gene")  # each gene at its best expert
    df = df.groupby("expert", sort=True, group_keys=False).head(n_genes)
    return df.sort_values(["expert", "score"], ascending=[True, False]).reset_index(drop=True)


def prototype_spots(features: np.ndarray, labels: np.ndarray, model, expert: int, n: int) -> np.ndarray:
    """Up to ``n`` spots of ``expert`` nearest to its stage-1 centroids, taken in turn from each centroid.

    These are the expert's image prototypes: the patches whose features sit at the centres of the clusters
    that define the expert. Returns indices into ``features``.
    """
    spots = np.flatnonzero(labels == expert)
    cents = model.centroids_[np.asarray(model.centroid_to_expert_) == expert]
    if len(spots) == 0 or len(cents) == 0:
        return np.zeros(0, dtype=np.int64)
    x = np.asarray(features[spots], dtype=np.float64)
    c = np.asarray(cents, dtype=np.float64)
    d = np.sqrt(np.maximum((x * x).sum(1)[:, None] - 2 * x @ c.T + (c * c).sum(1)[None], 0))
    # centroids with most spots first, so the commonest look of the expert comes first
    near = d.argmin(1)
    order_c = np.argsort(-np.bincount(near, minlength=len(c)), kind="stable")
    queues = [list(np.argsort(d[:, j], kind="stable")) for j in order_c]
    out, taken = [], set()
    while len(out) < min(n, len(spots)) and any(queues):
        for q in queues:
            while q and q[0] in taken:
                q.pop(0)
            if q and len(out) < n:
                i = q.pop(0)
                taken.add(i)
                out.append(i)
    return spots[np.asarray(out, dtype=np.int64)]


def expert_genes(
    model,
    adata,
    *,
    n_genes: int = 5,
    n_patches: int = 4,
    genes: Sequence[str] | None = None,
    layer: str | None = None,
    normalize: bool = True,
    use_rep: str = _keys.IMAGE_REP,
    key: str = _keys.DEFAULT_PREFIX,
    library_key: str = _keys.LIBRARY_ID,
    spatial_key: str = _keys.SPATIAL,
    patch_scale: float = 1.5,
    cmap: str = "RdBu_r",
    table_key: str | None = None,
    image_key: str | None = None,
    coordinate_system: str | None = None,
    ax=None,
):
    """What each expert means: its marker genes (heatmap) and its prototype H&E patches (thumbnails).

    Left, a heatmap of experts × marker genes: each expert's mean ``log1p(CP10k)`` expression of the genes
    that distinguish its spots most (see :func:`expert_markers`), z-scored per gene across experts. Right,
    for each expert the H&E patches of the spots nearest to its stage-1 centroids (see
    :func:`prototype_spots`), each with the spot's outline — what the expert "looks at".

    Parameters
    ----------
    model
        The fitted :class:`~spade_sc.SpadeModel`.
    adata
        AnnData (or SpatialData) with expression, image features and experts (``.obs['{key}_expert']`` from
        :func:`~spade_sc.tl.embed`/``fit_spade``; else the model routes ``.obsm[use_rep]``).
    n_genes
        Marker genes shown per expert.
    genes
        Candidate marker genes (default: the model's panel, ``model.genes_``). On real tissue a broader list
        of well-expressed genes often names the experts better than the panel of highly variable genes.
    n_patches
        Prototype patches per expert (0: heatmap only). Needs the H&E images.
    layer, normalize
        Expression to score (raw counts, normalised to ``log1p(CP10k)``; ``normalize=False`` uses it as is).
    use_rep
        Image features (for the prototypes' distances to the centroids).
    key
        Prefix used by ``fit_spade``/``embed``.
    library_key, spatial_key
        Slides and spot centres, as in :func:`spade_sc.pl.experts`.
    patch_scale
        Patch side in spot diameters.
    cmap
        Colormap of the heatmap.
    table_key, image_key, coordinate_system
        SpatialData: which table, which image element, and the coordinate system matching them.
    ax
        One Axes whose place the figure's panels take; a new figure when ``None``.

    Returns
    -------
    The :class:`~matplotlib.figure.Figure`.

    Examples
    --------
    >>> import spade_sc as ss
    >>> adata = ss.datasets.toy()
    >>> model = ss.tl.fit_spade(adata, batch_key="slide", n_prototypes=8, n_experts=4, max_epochs=5)
    >>> fig = ss.pl.expert_genes(model, adata, n_genes=4, n_patches=4)
    """
    import matplotlib.pyplot as plt
    from matplotlib.patches import Circle

    check_positive("n_genes", n_genes, integer=True)
    check_positive("n_patches", n_patches, integer=True, allow_zero=True)
    check_positive("patch_scale", patch_scale)
    if not getattr(model, "is_fitted", False):
        raise ValueError("`model` must be a fitted `ss.SpadeModel`; run `ss.tl.fit_spade` first.")
    table = check_anndata(get_table(adata, table_key))
    labels = _expert_labels(table, model, key, use_rep)
    candidates = list(model.genes_) if genes is None else [str(g) for g in genes]
    present = set(table.var_names)
    panel = [g for g in dict.fromkeys(candidates) if g in present]
    if not panel:
        which = "the model's genes (`model.genes_`)" if genes is None else "`genes`"
        raise KeyError(f"none of {which} is in `adata.var_names`.")
    markers = expert_markers(table, labels, panel, layer=layer, normalize=normalize, n_genes=n_genes)
    n_exp = model.n_experts_
    shown = list(dict.fromkeys(markers["gene"]))
    x = _measured(table, shown, layer, normalize) if shown else np.zeros((table.n_obs, 0))
    means = np.full((n_exp, len(shown)), np.nan)
    for e in range(n_exp):
        if (labels == e).any():
            means[e] = x[labels == e].mean(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        z = (means - np.nanmean(means, 0)) / np.nanstd(means, 0)
    z = np.nan_to_num(z, nan=0.0)

    # prototype patches: one Slide per library that has an image
    thumbs: dict[int, list] = {e: [] for e in range(n_exp)}
    if n_patches > 0:
        feats = get_rep(table, use_rep)
        libs = (
            table.obs[library_key].astype(str).to_numpy()
            if library_key in table.obs.columns else np.full(table.n_obs, "", dtype=object)
        )
        slides: dict[str, object] = {}
        for e in range(n_exp):
            for i in prototype_spots(feats, labels, model, e, n_patches):
                lib = libs[i]
                if lib not in slides:
                    slides[lib] = get_slide(
                        adata, library_id=lib or None, library_key=library_key, spatial_key=spatial_key,
                        table_key=table_key, image_key=image_key, coordinate_system=coordinate_system,
                        target_px=None,
                    )
                s = slides[lib]
                if s.image is None:
                    continue
                j = int(np.flatnonzero(np.flatnonzero(s.mask) == i)[0])
                half = max(4, int(round(s.radius * patch_scale)))
                thumbs[e].append((patch(s, s.xy[j], half), half, s.radius, table.obs_names[i]))
        if not any(thumbs.values()):
            logger.warning("no H&E images found for the spots; drawing the marker genes only.")
            n_patches = 0

    # layout: heatmap | patches
    w_heat = max(3.0, 0.38 * max(1, len(shown)) + 1.8)
    w_patch = 1.1 * n_patches
    height = max(2.5, 0.75 * n_exp + 1.2)
    ratios = [w_heat, w_patch] if n_patches else [w_heat]
    if ax is None:
        fig = plt.figure(figsize=(w_heat + w_patch + 0.8, height))
        gs = fig.add_gridspec(1, len(ratios), width_ratios=ratios, wspace=0.15)
    else:
        fig = ax.figure
        gs = ax.get_subplotspec().subgridspec(1, len(ratios), width_ratios=ratios, wspace=0.15)
        ax.remove()
    hax = fig.add_subplot(gs[0, 0])
    lim = max(1.0, float(np.abs(z).max())) if z.size else 1.0
    im = hax.imshow(z, cmap=cmap, vmin=-lim, vmax=lim, aspect="auto", interpolation="nearest")
    hax.set_xticks(range(len(shown)))
    hax.set_xticklabels(shown, rotation=90, fontsize="small")
    counts = np.bincount(labels, minlength=n_exp)
    hax.set_yticks(range(n_exp))
    hax.set_yticklabels([f"expert {e} ({counts[e]})" for e in range(n_exp)])
    col = _keys.expert_key(key)
    colors = expert_colors(table, col, n_exp) if col in table.obs.columns else default_palette(n_exp)
    for e, lab in enumerate(hax.get_yticklabels()):
        lab.set_color(colors[e])
    # bracket each expert's own genes
    by_exp = markers.groupby("expert")["gene"].apply(list).to_dict()
    for e, gl in by_exp.items():
        idx = [shown.index(g) for g in gl]
        hax.add_patch(plt.Rectangle((min(idx) - 0.5, e - 0.5), len(idx), 1, fill=False, ec="black", lw=1.2))
    hax.set_title("marker genes (mean expression, z-score across experts)", fontsize="medium")
    fig.colorbar(im, ax=hax, fraction=0.03, pad=0.02, label="z-score")
    if n_patches:
        pgs = gs[0, 1].subgridspec(n_exp, n_patches, wspace=0.05, hspace=0.05)
        for e in range(n_exp):
            for j in range(n_patches):
                pa = fig.add_subplot(pgs[e, j])
                pa.set_xticks([])
                pa.set_yticks([])
                for sp in pa.spines.values():
                    sp.set_edgecolor(colors[e])
                    sp.set_linewidth(2)
                if j < len(thumbs[e]):
                    img, half, radius, name = thumbs[e][j]
                    pa.imshow(img, interpolation="nearest")
                    pa.add_patch(Circle((half - 0.5, half - 0.5), radius, fill=False, ec="black", lw=0.8, ls="--"))
                    pa.set_gid(f"patch:{e}:{name}")
                else:
                    pa.set_axis_off()
                if e == 0 and j == 0:
                    pa.set_title("prototype patches", fontsize="medium", loc="left")
    return fig
