"""``tl.fit_spade``: two-stage clustering + contrastive training of the experts."""

from __future__ import annotations

import os

import pandas as pd

from .. import _keys
from .._logging import log_added
from .._utils import get_table
from ..model import SpadeModel

__all__ = ["fit_spade"]


def fit_spade(
    adata,
    *,
    use_rep: str = _keys.IMAGE_REP,
    layer: str | None = None,
    batch_key: str | None = None,
    group_key: str | None = None,
    n_prototypes: int = 16,
    n_experts: int = 16,
    proj_dim: int = 256,
    temperature: float = 1.0,
    max_epochs: int = 100,
    batch_size: int = 128,
    lr: float = 1e-4,
    weight_decay: float = 1e-2,
    val_fraction: float = 0.1,
    device: str | None = None,
    random_state: int | None = 0,
    dropout: float = 0.1,
    patience: int | None = None,
    normalize: bool = True,
    precision: str = "32",
    clustering_backend: str = "auto",
    checkpoint_dir: str | os.PathLike | None = None,
    key_added: str = _keys.DEFAULT_PREFIX,
    table_key: str | None = None,
) -> SpadeModel:
    """Fit SPADE: cluster image features into prototypes and experts, train one pair of heads per expert.

    Stage 1 runs k-means with ``n_prototypes`` clusters on the image features of each group
    (``group_key``, e.g. organ; one group when ``None``); stage 2 runs k-means of all stage-1 centroids into
    ``n_experts`` experts. Every spot belongs to the expert of its prototype. Each expert then trains a pair
    of projection heads (image, expression) with BLEEP's soft-target contrastive loss on minibatches of its
    own spots; all experts are trained at once (stacked parameters, one optimizer step), which is the same
    as training them one by one. Each expert keeps its weights of lowest validation loss.

    A group with fewer distinct spots than ``n_prototypes`` gets one prototype per distinct spot (with a
    warning).

    Parameters
    ----------
    adata
        AnnData (or SpatialData with ``table_key``) with image features in ``.obsm[use_rep]`` and raw counts.
    use_rep
        ``.obsm`` key of the image features (see :func:`spade_sc.pp.extract_features`).
    layer
        Layer with the expression (``.X`` when ``None``). Genes: ``.var['spade_gene']`` when present
        (:func:`spade_sc.pp.select_genes`), else all.
    batch_key
        ``.obs`` column of slides; validation holds out whole slides when given (else random spots).
    group_key
        ``.obs`` column of groups clustered separately in stage 1 (SPADE: organ).
    n_prototypes, n_experts, proj_dim, temperature, max_epochs, batch_size, lr, weight_decay
        SPADE's hyper-parameters (defaults as in the paper).
    val_fraction
        Fraction of slides (or spots) held out for choosing each expert's best epoch (0: keep the last).
    device
        ``"cuda"``, ``"cpu"``, …; ``None`` picks CUDA when available.
    random_state
        Seed of everything random in the fit (no global seeding).
    dropout
        Dropout of the heads.
    patience
        Early stopping: stop an expert after this many epochs without validation improvement.
    normalize
        Treat the expression as raw counts and use ``log1p(CP10k)`` (True), or use it as it is (False, the
        authors' raw-count input).
    precision
        ``"32"`` or ``"bf16"`` (autocast on CUDA).
    clustering_backend
        Stage-1 k-means: ``"sklearn"``, ``"faiss"`` (optional dependency ``spade_sc[faiss]``), or ``"auto"``:
        faiss for groups of ≥ 50,000 spots when it is installed, else scikit-learn. Groups larger than
        65,536 spots are clustered on a random sample of that size, then every spot goes to its nearest
        centroid.
    checkpoint_dir
        Write a checkpoint after every epoch here (atomically) and resume from it if one exists.
    key_added
        Prefix of the keys written.
    table_key
        Table to use when ``adata`` is a SpatialData.

    Returns
    -------
    The fitted :class:`~spade_sc.SpadeModel`. Writes into ``adata``:

    - ``.obs['{key_added}_prototype']``: stage-1 prototype of each spot (categorical)
    - ``.obs['{key_added}_expert']``: expert of each spot (categorical)
    - ``.obs['{key_added}_split']``: ``train`` / ``val``
    - ``.uns['{key_added}']['params']``: every fit argument and the package version

    Examples
    --------
    >>> import spade_sc as ss
    >>> adata = ss.datasets.toy()
    >>> ss.pp.select_genes(adata, batch_key="slide")
    >>> model = ss.tl.fit_spade(adata, batch_key="slide", n_prototypes=8, n_experts=4, max_epochs=5)
    >>> ss.tl.embed(adata, model)
    """
    from .. import __version__

    model = SpadeModel(
        n_prototypes=n_prototypes,
        n_experts=n_experts,
        proj_dim=proj_dim,
        dropout=dropout,
        temperature=temperature,
        max_epochs=max_epochs,
        batch_size=batch_size,
        lr=lr,
        weight_decay=weight_decay,
        val_fraction=val_fraction,
        patience=patience,
        normalize=normalize,
        precision=precision,
        clustering_backend=clustering_backend,
        random_state=random_state,
        device=device,
    )
    table = get_table(adata, table_key)
    model.fit(
        table,
        use_rep=use_rep,
        layer=layer,
        batch_key=batch_key,
        group_key=group_key,
        checkpoint_dir=checkpoint_dir,
    )
    # write only after a successful fit: a failure leaves the caller's data untouched
    labels = model.train_labels_
    table.obs[_keys.prototype_key(key_added)] = pd.Categorical(labels["prototype"].to_numpy(),
                                                               categories=range(len(model.centroids_)))
    table.obs[_keys.expert_key(key_added)] = pd.Categorical(labels["expert"].to_numpy(),
                                                            categories=range(model.n_experts_))
    table.obs[f"{key_added}_split"] = pd.Categorical(labels["split"].to_numpy(), categories=["train", "val"])
    params = {k: v for k, v in model.params.items() if v is not None}
    params.update(
        use_rep=use_rep,
        layer=layer or "",
        batch_key=batch_key or "",
        group_key=group_key or "",
        distance_scale=model.distance_scale_,
        n_genes=len(model.genes_),
        package_version=__version__,
    )
    table.uns.setdefault(_keys.uns_key(key_added), {})["params"] = params
    for col in (_keys.prototype_key(key_added), _keys.expert_key(key_added), f"{key_added}_split"):
        log_added("obs", col)
    log_added("uns", _keys.uns_key(key_added))
    return model
