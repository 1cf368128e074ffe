"""SPADE's gene panel: genes shared by every slide, union of each slide's top highly variable genes."""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from .. import _keys
from .._logging import log_added
from .._utils import copy_data, get_table
from .._validate import check_anndata, check_positive, get_counts, get_obs_column

__all__ = ["select_genes"]


def select_genes(
    adata,
    *,
    batch_key: str | None = None,
    n_top_genes: int = 50,
    layer: str | None = None,
    table_key: str | None = None,
    copy: bool = False,
):
    """Mark SPADE's gene panel in ``.var['spade_gene']``.

    A gene is *shared* if it is detected (≥ 1 count) in every batch (slide). On the shared genes, each batch
    is normalised (``normalize_total`` to 10⁴, ``log1p``) and its top ``n_top_genes`` highly variable genes
    are found with :func:`scanpy.pp.highly_variable_genes` (``flavor='seurat'``); the panel is their union,
    as in SPADE (union of each HEST slide's top-50 HVGs over genes shared by all slides: ≈ 8k genes on
    HEST-1k).

    Parameters
    ----------
    adata
        AnnData (or SpatialData with ``table_key``) with raw counts.
    batch_key
        ``.obs`` column naming the slide of each spot; one batch when ``None``.
    n_top_genes
        Highly variable genes taken from each batch.
    layer
        Layer holding raw counts (``.X`` when ``None``).
    table_key
        Table to use when ``adata`` is a SpatialData.
    copy
        Return a modified copy instead of writing in place.

    Returns
    -------
    ``None``, or the copy when ``copy=True``. Writes ``.var['spade_gene']`` (bool),
    ``.var['spade_hvg_batches']`` (in how many batches the gene is a top HVG) and
    ``.uns['spade_select_genes']['params']``.

    Examples
    --------
    >>> import spade_sc as ss
    >>> adata = ss.datasets.toy()
    >>> ss.pp.select_genes(adata, batch_key="slide", n_top_genes=30)
    >>> int(adata.var["spade_gene"].sum()) > 30
    True
    """
    import scanpy as sc

    check_positive("n_top_genes", n_top_genes, integer=True)
    data = copy_data(adata) if copy else adata
    table = check_anndata(get_table(data, table_key))
    x = get_counts(table, layer, require_counts=True)  # it normalises: normalised input would be logged twice
    batches = (
        get_obs_column(table, batch_key, what="batch_key") if batch_key is not None else np.zeros(table.n_obs, str)
    )
    names = pd.unique(batches)
    x = sp.csr_matrix(x) if sp.issparse(x) else np.asarray(x)
    shared = np.ones(table.n_vars, dtype=bool)
    for b in names:
        rows = batches == b
        detected = np.asarray((x[rows] > 0).sum(0)).ravel() > 0
        shared &= detected
    if not shared.any():
        raise ValueError(
            "no gene is detected in every batch; check `batch_key` (each batch should be one slide) and `layer`."
        )
    shared_idx = np.flatnonzero(shared)
    votes = np.zeros(table.n_vars, dtype=np.int64)
    for b in names:
        rows = np.flatnonzero(batches == b)
        sub = AnnData(X=(x[rows][:, shared_idx]).astype(np.float32))
        sc.pp.normalize_total(sub, target_sum=1e4)
        sc.pp.log1p(sub)
        n_top = min(n_top_genes, len(shared_idx))
        sc.pp.highly_variable_genes(sub, n_top_genes=n_top, flavor="seurat", subset=False)
        hv = sub.var["highly_variable"].to_numpy()
        votes[shared_idx[hv]] += 1
    table.var[_keys.GENE_MASK] = votes > 0
    table.var[_keys.HVG_RANK] = votes
    table.uns["spade_select_genes"] = {
        "params": {"batch_key": batch_key, "n_top_genes": n_top_genes, "layer": layer, "n_shared": int(shared.sum())}
    }
    log_added("var", _keys.GENE_MASK)
    return data if copy else None
