"""``tl.predict_expression``: expression of spots from H&E alone, by retrieval in the joint space or a ridge map."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp

from .. import _keys
from .._logging import log_added
from .._utils import copy_data, get_table
from .._validate import check_anndata, check_choice, check_positive, get_counts, get_rep
from ..model import SpadeModel

__all__ = ["normalized_expression", "predict_expression"]

_CHUNK = 2048


def normalized_expression(
    adata, genes: Sequence[str], *, layer: str | None = None, normalize: bool = True, target_sum: float = 1e4
) -> np.ndarray:
    """``[n_obs, len(genes)]`` float32 expression on SPADE's scale: ``log1p(CP10k)`` (totals over all genes).

    With ``normalize=False`` the values of ``layer`` as they are. Raises ``KeyError`` naming missing genes.
    """
    counts = get_counts(adata, layer, require_counts=False)
    pos = pd.Index(adata.var_names).get_indexer(list(genes))
    if (pos < 0).any():
        missing = np.asarray(genes)[pos < 0]
        raise KeyError(
            f"{len(missing)} genes are not in the reference's `var_names` (e.g. {', '.join(map(str, missing[:5]))}); "
            "pass `genes=` with genes the reference has."
        )
    from ..model._data import panel_values

    values = panel_values(counts, pos, target_sum=target_sum if normalize else None, log1p=normalize)
    return values.astype(np.float32)


def _retrieve(
    query: np.ndarray,
    ref: np.ndarray,
    values: np.ndarray,
    *,
    k: int,
    similarity: str,
    weighting: str,
    temperature: float,
) -> np.ndarray:
    """Weighted mean of ``values`` of each query's ``k`` most similar reference rows."""
    q = query.astype(np.float32)
    r = ref.astype(np.float32)
    if similarity == "cosine":
        q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
        r = r / np.maximum(np.linalg.norm(r, axis=1, keepdims=True), 1e-12)
    k = min(k, len(r))
    out = np.empty((len(q), values.shape[1]), dtype=np.float32)
    values = np.asarray(values, dtype=np.float64)
    for s in range(0, len(q), _CHUNK):
        sim = q[s : s + _CHUNK] @ r.T
        top = (
            np.argpartition(-sim, k - 1, axis=1)[:, :k]
            if k < len(r)
            else np.tile(np.arange(len(r)), (len(sim), 1))
        )
        top_sim = np.take_along_axis(sim, top, axis=1).astype(np.float64)
        if weighting == "softmax":
            z = top_sim / temperature
            w = np.exp(z - z.max(1, keepdims=True))
        else:
            w = np.ones_like(top_sim)
        w /= w.sum(1, keepdims=True)
        rows = np.repeat(np.arange(len(sim)), k)
        weights = sp.csr_matrix((w.ravel(), (rows, top.ravel())), shape=(len(sim), len(r)))
        out[s : s + _CHUNK] = np.asarray(weights @ values, dtype=np.float32)
    return out


def predict_expression(
    adata,
    model: SpadeModel | None,
    *,
    reference,
    method: str = "retrieval",
    k: int = 50,
    use_rep: str = _keys.IMAGE_REP,
    layer: str | None = None,
    genes: Sequence[str] | None = None,
    tau: float = 0.1,
    similarity: str = "cosine",
    weighting: str = "softmax",
    temperature: float = 0.1,
    alpha: float = 1.0,
    key_added: str = _keys.DEFAULT_PREFIX,
    table_key: str | None = None,
    reference_table_key: str | None = None,
    copy: bool = False,
):
    """Predict the expression of spots from their H&E features alone, using a reference with expression.

    ``method="retrieval"`` (BLEEP): the reference spots are embedded from their **expression** into the joint
    space (``modality="expression"``, routed by their image), the query spots from their **image**
    (``modality="image"``); each query spot gets the weighted mean expression of its ``k`` most similar
    reference spots. Weights are ``softmax(similarity / temperature)`` over the ``k`` neighbours
    (``weighting="softmax"``; BLEEP's "weighted average" is ``similarity="dot"``, ``temperature=1``) or equal
    (``weighting="uniform"``).

    ``method="ridge"``: a ridge regression (features standardised, intercept) from the reference's **image**
    embeddings to its expression, applied to the query's image embeddings.

    With ``model=None`` the features ``.obsm[use_rep]`` are used as they are for both sides (a baseline
    without SPADE: image-to-image retrieval, or a ridge from the encoder's features).

    Predictions are on the model's expression scale: ``log1p(CP10k)`` of the reference counts (totals over all
    genes) when the model normalises (the default, and always with ``model=None``), raw values otherwise.

    Parameters
    ----------
    adata
        Query AnnData (or SpatialData with ``table_key``) with image features in ``.obsm[use_rep]``.
    model
        A fitted :class:`~spade_sc.SpadeModel`, or ``None`` for the encoder-feature baseline.
    reference
        AnnData (or SpatialData with ``reference_table_key``) with image features in ``.obsm[use_rep]`` and
        expression (raw counts when the model normalises) in ``layer``, holding the model's genes. Not
        modified.
    method
        ``"retrieval"`` or ``"ridge"``.
    k
        Neighbours averaged by retrieval.
    use_rep
        ``.obsm`` key of the image features in both ``adata`` and ``reference``.
    layer
        Expression layer of ``reference`` (``.X`` when ``None``).
    genes
        Genes to predict, all in ``reference.var_names``; default the model's panel (``model.genes_``), or
        with ``model=None`` the genes marked in ``reference.var['spade_gene']`` (else all).
    tau
        Routing temperature of the embedding (see :func:`spade_sc.tl.embed`).
    similarity
        ``"cosine"`` or ``"dot"`` (retrieval).
    weighting
        ``"softmax"`` or ``"uniform"`` (retrieval).
    temperature
        Softmax temperature on the similarities (retrieval with ``weighting="softmax"``).
    alpha
        Ridge penalty on standardised features (``method="ridge"``).
    key_added
        Prefix of the keys written.
    table_key, reference_table_key
        Tables to use when ``adata``/``reference`` are SpatialData.
    copy
        Return a modified copy instead of writing in place.

    Returns
    -------
    ``None``, or the copy when ``copy=True``. Writes into ``adata``:

    - ``.obsm['{key_added}_predicted']``: float32 ``n_obs × n_genes`` predicted expression; column ``j`` is
      gene ``genes[j]`` (``pd.DataFrame(adata.obsm[key], columns=adata.uns[key]['genes'])`` gives a table);
    - ``.uns['{key_added}_predicted']``: ``genes`` (the column names) and ``params``.

    Examples
    --------
    >>> import spade_sc as ss
    >>> adata = ss.datasets.toy()
    >>> ss.pp.select_genes(adata, batch_key="slide")
    >>> ref = adata[adata.obs["slide"] != "slide3"].copy()
    >>> query = adata[adata.obs["slide"] == "slide3"].copy()
    >>> model = ss.tl.fit_spade(ref, batch_key="slide", n_prototypes=8, n_experts=2, max_epochs=5)
    >>> ss.tl.predict_expression(query, model, reference=ref, k=20)
    >>> query.obsm["spade_predicted"].shape == (query.n_obs, len(model.genes_))
    True
    """
    # ---------------------------------------------------------------- validate everything first
    check_choice("method", method, ("retrieval", "ridge"))
    check_choice("similarity", similarity, ("cosine", "dot"))
    check_choice("weighting", weighting, ("softmax", "uniform"))
    check_positive("k", k, integer=True)
    check_positive("temperature", temperature)
    check_positive("alpha", alpha, allow_zero=True)
    check_positive("tau", tau)
    if model is not None and not isinstance(model, SpadeModel):
        raise TypeError(f"`model` must be a fitted `ss.SpadeModel` or None, got {type(model).__name__}.")
    if model is not None and not model.is_fitted:
        raise ValueError("`model` is not fitted; call `ss.tl.fit_spade` first.")
    table = check_anndata(get_table(adata, table_key))
    ref = check_anndata(get_table(reference, reference_table_key))
    q_feats = get_rep(table, use_rep)
    r_feats = get_rep(ref, use_rep, hint="the reference needs the same image features as the query")
    if q_feats.shape[1] != r_feats.shape[1]:
        raise ValueError(
            f"`{use_rep}` has {q_feats.shape[1]} features in `adata` but {r_feats.shape[1]} in `reference`; "
            "extract both with the same encoder."
        )
    if genes is None:
        if model is not None:
            genes = list(model.genes_)
        elif _keys.GENE_MASK in ref.var.columns:
            genes = list(ref.var_names[ref.var[_keys.GENE_MASK].to_numpy().astype(bool)])
        else:
            genes = list(ref.var_names)
    genes = [str(g) for g in genes]
    if not genes:
        raise ValueError("no gene to predict; pass `genes=` or mark genes with `ss.pp.select_genes`.")
    if model is not None and method == "retrieval":
        missing = pd.Index(model.genes_).difference(ref.var_names)
        if len(missing):
            raise ValueError(
                f"{len(missing)} of the model's {len(model.genes_)} genes are not in `reference.var_names` "
                f"(e.g. {', '.join(missing[:5])}); retrieval embeds the reference's expression, so the reference "
                "needs the model's gene panel (`model.genes_`)."
            )
    normalize = True if model is None else bool(model.normalize)
    target_sum = 1e4 if model is None else float(model.target_sum)
    values = normalized_expression(ref, genes, layer=layer, normalize=normalize, target_sum=target_sum)

    # ---------------------------------------------------------------- embeddings
    if model is None:
        q_emb, r_emb = q_feats.astype(np.float32), r_feats.astype(np.float32)
    else:
        q_emb, _ = model.get_embedding(table, use_rep=use_rep, tau=tau, modality="image")
        ref_modality = "expression" if method == "retrieval" else "image"
        r_emb, _ = model.get_embedding(ref, use_rep=use_rep, tau=tau, modality=ref_modality, layer=layer)

    # ---------------------------------------------------------------- predict
    if method == "retrieval":
        pred = _retrieve(
            q_emb, r_emb, values, k=k, similarity=similarity, weighting=weighting, temperature=temperature
        )
    else:
        from sklearn.linear_model import Ridge
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        reg = make_pipeline(StandardScaler(), Ridge(alpha=alpha))
        reg.fit(r_emb.astype(np.float64), values.astype(np.float64))
        pred = reg.predict(q_emb.astype(np.float64)).reshape(len(q_emb), len(genes)).astype(np.float32)

    # ---------------------------------------------------------------- write
    data = copy_data(adata) if copy else adata
    out = get_table(data, table_key)
    key = _keys.predicted_key(key_added)
    out.obsm[key] = pred
    out.uns[key] = {
        "genes": np.asarray(genes, dtype=object),
        "params": {
            "method": method,
            "model": "none" if model is None else "spade",
            "k": int(k),
            "use_rep": use_rep,
            "layer": layer or "",
            "tau": float(tau),
            "similarity": similarity,
            "weighting": weighting,
            "temperature": float(temperature),
            "alpha": float(alpha),
            "scale": "log1p_cp10k" if normalize else "raw",
            "n_reference": int(ref.n_obs),
        },
    }
    log_added("obsm", key)
    log_added("uns", key)
    return data if copy else None
