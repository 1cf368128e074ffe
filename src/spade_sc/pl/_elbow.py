"""``pl.elbow``: the elbow plots of SPADE's two clustering stages (from :func:`spade_sc.tl.elbow`)."""

from __future__ import annotations

import numpy as np

from .. import _keys
from .._utils import get_table
from ._spatial import default_palette, split_axes

__all__ = ["elbow"]


def _result(adata, key: str, table_key):
    if isinstance(adata, dict):
        res = adata
    else:
        table = get_table(adata, table_key)
        if key not in table.uns:
            raise KeyError(f"no `adata.uns[{key!r}]`; run `ss.tl.elbow(adata)` first.")
        res = table.uns[key]
    missing = {"ks", "groups", "stage1_wcss", "stage2_ks", "stage2_wcss"} - set(res)
    if missing:
        raise KeyError(f"`uns[{key!r}]` lacks {sorted(missing)}; rerun `ss.tl.elbow`.")
    return res


def elbow(
    adata,
    *,
    stage: int | None = None,
    normalize: bool = True,
    chosen: tuple[int | None, int | None] | None = None,
    key: str = "spade_elbow",
    table_key: str | None = None,
    ax=None,
):
    """Within-cluster sum of squares against k for SPADE's stage 1 (one line per group) and stage 2.

    The elbow of each curve (the k farthest below the chord from its first to its last point, on the
    log-k scale drawn) is circled in red; dashed vertical lines mark the k used
    (stage 1: the ``n_prototypes`` that made the stage-2 centroids; stage 2: ``n_experts`` of a previous
    :func:`~spade_sc.tl.fit_spade`, if any).

    Parameters
    ----------
    adata
        AnnData/SpatialData after :func:`spade_sc.tl.elbow`, or the dict it wrote.
    stage
        ``1`` or ``2`` draws that stage only (one Axes); ``None`` draws both side by side.
    normalize
        Divide each curve by its total sum of squares (WCSS at k = 1), so groups of different sizes share one
        axis: the fraction of the variance left within clusters.
    chosen
        ``(k_stage1, k_stage2)`` to mark (``None`` entries are not marked). Default: as described above.
    key
        ``.uns`` key written by :func:`spade_sc.tl.elbow`.
    table_key
        Table to use when ``adata`` is a SpatialData.
    ax
        One Axes (split in two for ``stage=None``), or two Axes for ``stage=None``; a new figure when ``None``.

    Returns
    -------
    The :class:`~matplotlib.axes.Axes` for ``stage=1``/``2``, else the :class:`~matplotlib.figure.Figure`.

    Examples
    --------
    >>> import spade_sc as ss
    >>> adata = ss.datasets.toy()
    >>> ss.tl.elbow(adata, ks=(2, 4, 8, 16, 32), group_key="slide", n_prototypes=8)
    >>> fig = ss.pl.elbow(adata)  # both stages
    >>> ax = ss.pl.elbow(adata, stage=1)
    """
    if stage not in (None, 1, 2):
        raise ValueError(f"`stage` must be 1, 2 or None (both), got {stage!r}.")
    res = _result(adata, key, table_key)
    if chosen is None:
        k2 = None
        if not isinstance(adata, dict):
            params = get_table(adata, table_key).uns.get(_keys.uns_key(), {})
            params = params.get("params", {}) if isinstance(params, dict) else {}
            k2 = params.get("n_experts")
        chosen = (res.get("n_prototypes"), k2)
    if stage is None:
        fig, axs = split_axes(ax, 1, 2, (10, 4), wspace=0.3)
        axes = {1: axs[0, 0], 2: axs[0, 1]}
    else:
        import matplotlib.pyplot as plt

        if ax is None:
            _, ax = plt.subplots(figsize=(5, 4))
        axes = {stage: ax}
        fig = ax.figure
    ylabel = "WCSS / total sum of squares" if normalize else "within-cluster sum of squares"
    if 1 in axes:
        a = axes[1]
        ks = np.asarray(res["ks"])
        groups = [str(g) for g in np.asarray(res["groups"])]
        wcss = np.atleast_2d(np.asarray(res["stage1_wcss"], dtype=float))
        tss = np.asarray(res.get("stage1_tss", np.ones(len(groups))), dtype=float)
        knees = np.asarray(res.get("stage1_knee", np.full(len(groups), -1)))
        colors = default_palette(len(groups))
        for gi, g in enumerate(groups):
            y = wcss[gi] / (tss[gi] if normalize and tss[gi] > 0 else 1.0)
            a.plot(ks, y, "o-", color=colors[gi], ms=3, lw=1.5, label=g)
            _mark_knee(a, ks, y, int(knees[gi]))
        title = "stage 1: prototypes per group" if len(groups) > 1 else "stage 1: prototypes"
        _finish(a, ks, chosen[0], title, ylabel, "k (clusters per group)")
        if len(groups) > 1:
            a.legend(fontsize="small", ncol=2 if len(groups) > 8 else 1, frameon=False, title="group")
    if 2 in axes:
        a = axes[2]
        ks = np.asarray(res["stage2_ks"])
        tss = float(res.get("stage2_tss", 1.0))
        y = np.asarray(res["stage2_wcss"], dtype=float) / (tss if normalize and tss > 0 else 1.0)
        a.plot(ks, y, "o-", color="black", ms=3, lw=1.5, label="stage-1 centroids")
        _mark_knee(a, ks, y, int(res.get("stage2_knee", -1)))
        _finish(a, ks, chosen[1], "stage 2: experts", ylabel, "k (experts)")
    return axes[stage] if stage is not None else fig


def _mark_knee(ax, ks, y, k):
    if k in set(ks.tolist()):
        i = int(np.flatnonzero(ks == k)[0])
        ax.plot([k], [y[i]], "o", ms=11, mfc="none", mec="crimson", mew=1.5, zorder=5, label="_knee")


def _finish(ax, ks, chosen, title, ylabel, xlabel):
    from matplotlib.ticker import FixedLocator, NullLocator

    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_locator(FixedLocator(ks))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticklabels([str(k) for k in ks])
    if chosen is not None:
        ax.axvline(int(chosen), ls="--", color="grey", lw=1, label="_chosen")
        ax.text(int(chosen), 0.98, f" k = {int(chosen)}", transform=ax.get_xaxis_transform(), va="top",
                color="grey", fontsize="small")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
