"""``pl.training_curves``: train/validation loss per expert, from ``SpadeModel.history_``."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from ._spatial import default_palette, split_axes

__all__ = ["training_curves"]


def training_curves(
    model,
    *,
    experts: Sequence[int] | None = None,
    separate: bool = False,
    logy: bool = False,
    palette: Sequence[str] | None = None,
    ax=None,
):
    """Training (solid) and validation (dashed) contrastive loss against epoch, one colour per expert.

    Each expert keeps the weights of its lowest validation loss; that epoch is marked with a dot. Experts
    without validation spots have no dashed line (they keep their last epoch).

    Parameters
    ----------
    model
        A fitted :class:`~spade_sc.SpadeModel` (or its ``history_`` DataFrame with columns ``epoch, expert,
        train_loss, val_loss``).
    experts
        Experts to draw (default all).
    separate
        One panel per expert instead of all in one Axes.
    logy
        Logarithmic loss axis.
    palette
        Colours of the experts (default: scanpy's, the colours :func:`spade_sc.pl.experts` uses).
    ax
        Axes to draw into; with ``separate=True`` one Axes to split into panels or one Axes per expert.
        A new figure when ``None``.

    Returns
    -------
    The :class:`~matplotlib.axes.Axes`, or the :class:`~matplotlib.figure.Figure` with ``separate=True``.

    Examples
    --------
    >>> import spade_sc as ss
    >>> adata = ss.datasets.toy()
    >>> model = ss.tl.fit_spade(adata, batch_key="slide", n_prototypes=8, n_experts=4, max_epochs=5)
    >>> ax = ss.pl.training_curves(model)
    >>> fig = ss.pl.training_curves(model, separate=True)  # one panel per expert
    """
    hist = model if isinstance(model, pd.DataFrame) else getattr(model, "history_", None)
    if hist is None or len(hist) == 0:
        raise ValueError("this model has no training history (`model.history_`); fit it with `ss.tl.fit_spade`.")
    needed = {"epoch", "expert", "train_loss", "val_loss"}
    if not needed <= set(hist.columns):
        raise KeyError(f"the history lacks columns {sorted(needed - set(hist.columns))}.")
    all_experts = sorted(int(e) for e in hist["expert"].unique())
    n_total = max(all_experts) + 1
    if experts is None:
        experts = all_experts
    else:
        experts = [int(e) for e in experts]
        unknown = sorted(set(experts) - set(all_experts))
        if unknown:
            raise ValueError(f"experts {unknown} are not in the history (experts: {all_experts}).")
    colors = list(palette) if palette is not None else default_palette(n_total)
    if len(colors) < n_total:
        raise ValueError(f"`palette` has {len(colors)} colours but there are {n_total} experts.")

    if separate:
        ncols = min(4, len(experts))
        nrows = int(np.ceil(len(experts) / ncols))
        fig, axs = split_axes(ax, nrows, ncols, (3.2 * ncols, 2.6 * nrows), hspace=0.5, wspace=0.3)
        flat = list(axs.ravel())
        for a in flat[len(experts):]:
            a.set_visible(False)
        panels = dict(zip(experts, flat, strict=False))
    else:
        import matplotlib.pyplot as plt

        if ax is None:
            _, ax = plt.subplots(figsize=(6.5, 4))
        panels = dict.fromkeys(experts, ax)
        fig = None

    for e in experts:
        a = panels[e]
        h = hist[hist["expert"] == e].sort_values("epoch")
        c = colors[e]
        a.plot(h["epoch"], h["train_loss"], "-", color=c, lw=1.5, label=f"expert {e}")
        val = h["val_loss"].to_numpy(dtype=float)
        if np.isfinite(val).any():
            a.plot(h["epoch"], val, "--", color=c, lw=1.5, label="_val")
            best = int(np.nanargmin(val))
            a.plot([h["epoch"].iloc[best]], [val[best]], "o", color=c, ms=5, label="_best")
        if separate:
            a.set_title(f"expert {e}", fontsize="medium")
    from matplotlib.lines import Line2D

    for a in set(panels.values()):
        a.set_xlabel("epoch")
        a.set_ylabel("contrastive loss")
        if logy:
            a.set_yscale("log")
    style = [
        Line2D([], [], color="k", ls="-", label="train"),
        Line2D([], [], color="k", ls="--", label="validation"),
        Line2D([], [], color="k", ls="", marker="o", ms=5, label="best (kept)"),
    ]
    if separate:
        first = panels[experts[0]]
        first.legend(handles=style, fontsize="x-small", frameon=False)
        return fig
    handles = [Line2D([], [], color=colors[e], lw=2, label=f"expert {e}") for e in experts] + style
    ax.legend(handles=handles, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    ax.set_title("SPADE training")
    return ax
