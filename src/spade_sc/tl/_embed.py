"""``tl.embed``: route spots to experts and embed them in SPADE's joint space."""

from __future__ import annotations

import numpy as np
import pandas as pd

from .. import _keys
from .._logging import log_added
from .._utils import copy_data, get_table
from ..model import SpadeModel

__all__ = ["embed"]


def embed(
    adata,
    model: SpadeModel,
    *,
    use_rep: str = _keys.IMAGE_REP,
    tau: float = 0.1,
    modality: str = "image",
    layer: str | None = None,
    routing_eps: float | str = "auto",
    key_added: str = _keys.DEFAULT_PREFIX,
    table_key: str | None = None,
    copy: bool = False,
):
    """Embed spots with a fitted SPADE model.

    Routing, as SPADE: the Euclidean distance ``d_k`` of each spot's image features to every stage-1
    centroid gives ``softmax_k(-d_k / (s · tau))``, summed over each expert's centroids; the embedding is the
    routing-weighted sum of the experts' outputs.

    ``s`` is ``model.distance_scale_``, the median distance of the training spots to their nearest centroid,
    so ``tau`` means the same on any encoder: a centroid farther by ``tau`` typical distances gets ``1/e`` of
    the weight. Models imported from the authors' checkpoints use ``s = 1`` (their raw distances). Small
    ``tau`` approaches hard routing to the nearest prototype's expert.

    Parameters
    ----------
    adata
        AnnData (or SpatialData with ``table_key``) with image features in ``.obsm[use_rep]``.
    model
        A fitted :class:`~spade_sc.SpadeModel`.
    use_rep
        ``.obsm`` key of the image features (the same encoder as at fit time).
    tau
        Routing temperature (SPADE: 0.1).
    modality
        ``"image"`` embeds the H&E features with the image heads; ``"expression"`` embeds each spot's
        expression (``layer``) with the expression heads, routed by its image, for cross-modal retrieval.
    layer
        Expression layer for ``modality="expression"``.
    routing_eps
        Drop routing weights below this and renormalise, so that only experts with a weight that matters are
        evaluated (0 keeps all). ``"auto"`` (default) picks the largest threshold whose error is provably at
        most 1e-4 in every coordinate of the embedding: a head's output ends in a LayerNorm, so each
        coordinate is at most ``R = max |γ|·sqrt(proj_dim - 1) + |β|``, and dropping mass ``m`` changes the
        embedding by at most ``2·m·R`` with ``m < (n_experts - 1)·routing_eps``
        (see :meth:`~spade_sc.SpadeModel.resolve_routing_eps`).
    key_added
        Prefix of the keys written.
    table_key
        Table to use when ``adata`` is a SpatialData.
    copy
        Return a modified copy instead of writing in place.

    Returns
    -------
    ``None``, or the copy when ``copy=True``. Writes:

    - ``.obsm['X_{key_added}']`` (image) or ``.obsm['X_{key_added}_expression']``: float32 embedding
    - ``.obsm['{key_added}_expert_weights']``: routing weights (rows sum to 1)
    - ``.obs['{key_added}_expert']``: expert of largest weight (categorical)
    - ``.uns['{key_added}']['embed_params']``

    Examples
    --------
    >>> import spade_sc as ss
    >>> adata = ss.datasets.toy()
    >>> model = ss.tl.fit_spade(adata, batch_key="slide", n_prototypes=8, n_experts=4, max_epochs=5)
    >>> ss.tl.embed(adata, model)
    >>> adata.obsm["X_spade"].shape, adata.obsm["spade_expert_weights"].shape
    ((1600, 256), (1600, 4))

    Embed the spots' expression with the expression heads (routed by their image), for cross-modal retrieval:

    >>> ss.tl.embed(adata, model, modality="expression")
    >>> adata.obsm["X_spade_expression"].shape
    (1600, 256)
    """
    if not isinstance(model, SpadeModel):
        raise TypeError(
            f"`model` must be a fitted spade_sc.SpadeModel, got {type(model).__name__}; get one from "
            "`ss.tl.fit_spade`, `ss.SpadeModel.load` or `ss.SpadeModel.from_spade_checkpoints`."
        )
    data = copy_data(adata) if copy else adata
    table = get_table(data, table_key)
    emb, weights = model.get_embedding(
        table, use_rep=use_rep, tau=tau, modality=modality, layer=layer, routing_eps=routing_eps
    )
    emb_key = _keys.embedding_key(key_added, modality)
    table.obsm[emb_key] = emb.astype(np.float32)
    table.obsm[_keys.weights_key(key_added)] = weights.astype(np.float32)
    table.obs[_keys.expert_key(key_added)] = pd.Categorical(weights.argmax(1), categories=range(model.n_experts_))
    table.uns.setdefault(_keys.uns_key(key_added), {})["embed_params"] = {
        "use_rep": use_rep,
        "tau": float(tau),
        "modality": modality,
        "routing_eps": model.resolve_routing_eps(routing_eps, modality),
        "distance_scale": float(model.distance_scale_),
    }
    for where, key in (("obsm", emb_key), ("obsm", _keys.weights_key(key_added)), ("obs", _keys.expert_key(key_added))):
        log_added(where, key)
    return data if copy else None
