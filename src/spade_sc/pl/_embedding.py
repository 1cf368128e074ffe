"""``pl.embedding``: UMAP of SPADE's joint-space embedding coloured by expert, slide or gene (via scanpy)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from anndata import AnnData

from .. import _keys
from .._utils import get_table
from .._validate import check_anndata, get_rep
from ._experts import routing_entropy
from ._spatial import default_palette, split_axes

__all__ = ["embedding", "umap_coordinates"]


def umap_coordinates(
    x: np.ndarray, *, n_neighbors: int = 15, random_state: int | None = 0, metric: str = "euclidean"
) -> np.ndarray:
    """2-D UMAP of the rows of ``x`` with scanpy (``sc.pp.neighbors`` + ``sc.tl.umap``); writes nothing."""
    import scanpy as sc

    tmp = AnnData(obs=pd.DataFrame(index=[str(i) for i in range(len(x))]))
    tmp.obsm["X_rep"] = np.asarray(x, dtype=np.float32)
    n_neighbors = int(min(n_neighbors, max(2, len(x) - 1)))
    sc.pp.neighbors(tmp, use_rep="X_rep", n_neighbors=n_neighbors, random_state=random_state or 0, metric=metric)
    sc.tl.umap(tmp, random_state=random_state or 0)
    return np.asarray(tmp.obsm["X_umap"])


def embedding(
    adata,
    *,
    color: str | Sequence[str] = "expert",
    use_rep: str = "X_spade",
    basis: str | None = None,
    layer: str | None = None,
    key: str = _keys.DEFAULT_PREFIX,
    n_neighbors: int = 15,
    random_state: int | None = 0,
    table_key: str | None = None,
    ax=None,
    **kwargs,
):
    """UMAP of the SPADE embedding (``.obsm['X_spade']``) coloured by expert, slide, a gene or any column.

    The UMAP is computed with scanpy on the fly (``sc.pp.neighbors(use_rep=...)`` then ``sc.tl.umap``) on a
    scratch object, so ``adata`` is not modified; pass ``basis=`` to draw coordinates you already have (e.g.
    ``"X_umap"`` after your own ``sc.tl.umap``). Drawing is :func:`scanpy.pl.embedding`'s.

    Parameters
    ----------
    adata
        AnnData (or SpatialData with ``table_key``) after :func:`spade_sc.tl.embed`.
    color
        What to colour by, or a list of them (one panel each): ``"expert"`` (``.obs['{key}_expert']``),
        ``"entropy"`` (routing entropy of ``.obsm['{key}_expert_weights']``), an ``.obs`` column (e.g.
        ``"slide"``) or a gene of ``var_names``.
    use_rep
        ``.obsm`` key of the representation to lay out.
    basis
        ``.obsm`` key of existing 2-D coordinates to draw instead of computing a UMAP.
    layer
        Layer giving the gene colours (``.X`` when ``None``).
    key
        Prefix used by ``fit_spade``/``embed``.
    n_neighbors, random_state
        Of the neighbour graph and UMAP.
    table_key
        Table to use when ``adata`` is a SpatialData.
    ax
        Axes to draw into; for several colours one Axes to split, or one per colour. New figure when ``None``.
    **kwargs
        Passed to :func:`scanpy.pl.embedding` (e.g. ``size``, ``legend_loc``, ``cmap``, ``vmax``).

    Returns
    -------
    The :class:`~matplotlib.axes.Axes` (one colour) or the :class:`~matplotlib.figure.Figure` (several).

    Examples
    --------
    >>> import spade_sc as ss
    >>> adata = ss.datasets.toy()
    >>> model = ss.tl.fit_spade(adata, batch_key="slide", n_prototypes=8, n_experts=4, max_epochs=5)
    >>> ss.tl.embed(adata, model)
    >>> fig = ss.pl.embedding(adata, color=["expert", "slide", "TUM1"])
    """
    import scanpy as sc

    table = check_anndata(get_table(adata, table_key))
    colors = [color] if isinstance(color, str) else list(color)
    if not colors:
        raise ValueError("`color` is empty; name at least one thing to colour by.")
    expert_col, wk = _keys.expert_key(key), _keys.weights_key(key)
    obs = pd.DataFrame(index=table.obs_names.copy())
    resolved = []
    for c in colors:
        if c == "expert":
            if expert_col not in table.obs.columns:
                raise KeyError(f"no `adata.obs[{expert_col!r}]`; run `ss.tl.embed` first.")
            c = expert_col
        if c == "entropy":
            if wk not in table.obsm:
                raise KeyError(f"no `adata.obsm[{wk!r}]`; run `ss.tl.embed` first.")
            obs["routing entropy"] = routing_entropy(table.obsm[wk])
            resolved.append("routing entropy")
            continue
        if c in table.obs.columns:
            obs[c] = table.obs[c].to_numpy() if not isinstance(table.obs[c].dtype, pd.CategoricalDtype) else table.obs[c]
        elif c not in table.var_names:
            raise KeyError(f"`color={c!r}` is neither a column of `adata.obs` nor a gene of `adata.var_names`.")
        resolved.append(c)

    # coordinates
    if basis is not None:
        bkey = basis if basis in table.obsm else f"X_{basis}"
        if bkey not in table.obsm:
            keys = ", ".join(map(repr, table.obsm.keys())) or "none"
            raise KeyError(f"`basis={basis!r}` is not in `adata.obsm` (obsm has: {keys}).")
        coords = np.asarray(table.obsm[bkey])[:, :2]
        plot_basis = bkey if bkey.startswith("X_") else f"X_{bkey}"
    else:
        coords = umap_coordinates(
            get_rep(table, use_rep, hint="run `ss.tl.embed` first"), n_neighbors=n_neighbors, random_state=random_state
        )
        plot_basis = "X_umap"

    genes = [c for c in resolved if c not in obs.columns]
    x = None
    if genes:
        src = table.X if layer is None else table.layers[layer]
        pos = table.var_names.get_indexer(genes)
        x = src[:, pos]
    var = pd.DataFrame(index=pd.Index(genes, dtype=str))
    tmp = AnnData(X=x if x is not None else np.zeros((table.n_obs, 0), dtype=np.float32), obs=obs, var=var)
    tmp.obsm[plot_basis] = coords
    for c in obs.columns:
        if isinstance(obs[c].dtype, pd.CategoricalDtype):
            stored = table.uns.get(f"{c}_colors")
            n = len(obs[c].cat.categories)
            if stored is not None and len(stored) >= n:
                tmp.uns[f"{c}_colors"] = list(stored)[:n]
            elif c == expert_col:
                tmp.uns[f"{c}_colors"] = default_palette(n)  # the colours of pl.experts

    kwargs.setdefault("frameon", True)
    name = plot_basis[2:]  # scanpy finds `X_<name>` and labels the axes `<NAME>1`, `<NAME>2`
    if len(resolved) == 1:
        import matplotlib.pyplot as plt

        if ax is None:
            _, ax = plt.subplots(figsize=(5.5, 4.5))
        sc.pl.embedding(tmp, basis=name, color=resolved[0], ax=ax, show=False, **kwargs)
        return ax
    ncols = min(3, len(resolved))
    nrows = int(np.ceil(len(resolved) / ncols))
    fig, axs = split_axes(ax, nrows, ncols, (5.5 * ncols, 4.5 * nrows), wspace=0.45, hspace=0.3)
    flat = list(axs.ravel())
    for a, c in zip(flat, resolved, strict=False):
        sc.pl.embedding(tmp, basis=name, color=c, ax=a, show=False, **kwargs)
    for a in flat[len(resolved):]:
        a.set_visible(False)
    return fig
