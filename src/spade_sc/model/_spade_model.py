"""The SPADE model object: hyper-parameters in, ``fit``, ``get_embedding``, ``save``/``load``."""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from anndata import AnnData

from .. import _keys
from .._logging import logger
from .._utils import get_table, resolve_device
from .._validate import (
    check_anndata,
    check_choice,
    check_fraction,
    check_positive,
    get_counts,
    get_obs_column,
    get_rep,
    is_out_of_core,
)

__all__ = ["SpadeModel"]

FORMAT_VERSION = 1
_CONFIG = "config.json"
_WEIGHTS = "model.safetensors"


def _hyper_defaults() -> dict:
    return {
        "n_prototypes": 16,
        "n_experts": 16,
        "proj_dim": 256,
        "dropout": 0.1,
        "temperature": 1.0,
        "max_epochs": 100,
        "batch_size": 128,
        "lr": 1e-4,
        "weight_decay": 1e-2,
        "val_fraction": 0.1,
        "patience": None,
        "normalize": True,
        "target_sum": 1e4,
        "min_expert_spots": 2,
        "clustering_backend": "auto",
        "precision": "32",
        "random_state": 0,
    }


class SpadeModel:
    """A mixture of data experts aligning H&E features with spot expression (SPADE).

    Parameters
    ----------
    n_prototypes
        Stage-1 k-means clusters per group (SPADE: 16 per organ).
    n_experts
        Stage-2 clusters of the stage-1 centroids; one pair of projection heads each (SPADE: 16).
    proj_dim
        Size of the joint space (SPADE: 256).
    dropout
        Dropout in the heads (SPADE: 0.1).
    temperature
        ``T`` of the contrastive loss (SPADE: 1).
    max_epochs, batch_size, lr, weight_decay
        AdamW with a cosine schedule over each expert's steps (SPADE: 100, 128, 1e-4, 1e-2).
    val_fraction
        Fraction of slides (with ``batch_key``) or spots held out to pick each expert's best epoch.
    patience
        Stop an expert after this many epochs without validation improvement (``None``: never).
    normalize
        If True, expression is treated as raw counts and turned into ``log1p(CP10k)`` per spot
        (``target_sum`` per spot, totals over all genes); if False it is used as it is (the authors' code
        trains on raw counts).
    target_sum
        Counts per spot after normalisation.
    min_expert_spots
        An expert with fewer training spots than this is an error (lower ``n_experts``).
    clustering_backend
        ``"sklearn"``, ``"faiss"`` (optional dependency) or ``"auto"`` (faiss for groups of ≥ 50,000 spots
        when installed) for stage-1 k-means.
    precision
        ``"32"``, or ``"bf16"`` autocast (CUDA only; ignored on CPU where it is slower).
    random_state
        Seed of clustering, splits, initialisation, shuffling and dropout (no global seeding).
    device
        Torch device; ``None`` picks CUDA when available, else CPU.

    Attributes
    ----------
    centroids_
        ``[K, D]`` stage-1 centroids.
    centroid_to_expert_
        ``[K]`` expert of each centroid.
    centroid_group_
        ``[K]`` group (``group_key`` value) of each centroid.
    distance_scale_
        Distance unit of the routing (see :func:`spade_sc.tl.embed`).
    genes_
        The gene panel, in the order the expression heads expect.
    feature_dim_
        Image feature size.
    history_
        Loss per epoch and expert (DataFrame with ``epoch, expert, train_loss, val_loss``).
    """

    def __init__(self, *, device: str | None = None, **hyperparameters):
        params = _hyper_defaults()
        unknown = set(hyperparameters) - set(params)
        if unknown:
            raise TypeError(f"unknown hyper-parameter(s) {sorted(unknown)}; known: {sorted(params)}.")
        params.update(hyperparameters)
        _check_hyper(params)
        self.params = params
        self.device = device
        self.pairs_ = None
        self.centroids_ = None
        self.centroid_to_expert_ = None
        self.centroid_group_ = None
        self.distance_scale_ = 1.0
        self.genes_ = None
        self.feature_dim_ = None
        self.history_ = None
        self.train_labels_ = None

    # ------------------------------------------------------------------ convenience
    def __getattr__(self, name):
        params = self.__dict__.get("params")
        if params is not None and name in params:
            return params[name]
        raise AttributeError(f"{type(self).__name__!s} has no attribute {name!r}")

    @property
    def is_fitted(self) -> bool:
        return self.pairs_ is not None

    @property
    def n_experts_(self) -> int:
        return int(self.centroid_to_expert_.max()) + 1 if self.centroid_to_expert_ is not None else 0

    def __repr__(self) -> str:
        if not self.is_fitted:
            return f"SpadeModel(unfitted, n_prototypes={self.n_prototypes}, n_experts={self.n_experts})"
        return (
            f"SpadeModel({len(self.centroids_)} prototypes → {self.n_experts_} experts, "
            f"{self.feature_dim_}-d image features, {len(self.genes_)} genes, {self.proj_dim}-d joint space)"
        )

    def _require_fitted(self):
        if not self.is_fitted:
            raise RuntimeError("this SpadeModel is not fitted; call `ss.tl.fit_spade` or `model.fit` first.")

    # ------------------------------------------------------------------ fit
    def fit(
        self,
        adata: AnnData,
        *,
        use_rep: str = _keys.IMAGE_REP,
        layer: str | None = None,
        batch_key: str | None = None,
        group_key: str | None = None,
        checkpoint_dir: str | os.PathLike | None = None,
        table_key: str | None = None,
    ) -> SpadeModel:
        """Cluster the image features and train the experts. Writes nothing into ``adata``.

        See :func:`spade_sc.tl.fit_spade` for the parameters (the hyper-parameters are the model's, set when
        it is created). The spots' prototype and expert labels are kept in ``train_labels_`` (a DataFrame
        indexed like ``adata.obs``).

        Returns
        -------
        The model itself, fitted: ``centroids_``, ``centroid_to_expert_``, ``centroid_group_``,
        ``distance_scale_``, ``genes_``, ``feature_dim_``, ``history_`` and ``train_labels_`` (columns
        ``prototype``, ``expert``, ``split``) are set.

        Examples
        --------
        >>> import spade_sc as ss
        >>> adata = ss.datasets.toy()
        >>> model = ss.SpadeModel(n_prototypes=8, n_experts=4, max_epochs=5).fit(adata, batch_key="slide")
        >>> model
        SpadeModel(8 prototypes → 4 experts, 64-d image features, 300 genes, 256-d joint space)
        >>> list(model.train_labels_.columns)
        ['prototype', 'expert', 'split']

        :func:`spade_sc.tl.fit_spade` does the same and also writes the labels into ``adata``.
        """
        import torch

        from ._clustering import RowSubset, assign_nearest, two_stage_kmeans
        from ._data import ExpressionSource
        from ._heads import ExpertPairs
        from ._trainer import TrainConfig, train_experts

        adata = check_anndata(get_table(adata, table_key))
        p = self.params
        feats = get_rep(adata, use_rep)
        counts = get_counts(
            adata, layer, require_counts=p["normalize"], hint="or `normalize=False` to use the values as they are"
        )
        batches = get_obs_column(adata, batch_key, what="batch_key") if batch_key is not None else None
        groups = get_obs_column(adata, group_key, what="group_key") if group_key is not None else None
        if _keys.GENE_MASK in adata.var.columns:
            gene_mask = adata.var[_keys.GENE_MASK].to_numpy().astype(bool)
            if not gene_mask.any():
                raise ValueError(
                    f"`adata.var[{_keys.GENE_MASK!r}]` selects no gene; rerun `ss.pp.select_genes` or drop the column."
                )
        else:
            gene_mask = np.ones(adata.n_vars, dtype=bool)
        gene_idx = np.flatnonzero(gene_mask)
        if len(gene_idx) == 0:
            raise ValueError("`adata` has no genes (n_vars == 0); SPADE trains on the spots' expression, pass an "
                             "AnnData whose `.X` (or `layer=`) holds it.")

        train, val = _split(adata.n_obs, batches, p["val_fraction"], p["random_state"])
        if len(train) < p["n_prototypes"] and groups is None:
            raise ValueError(
                f"only {len(train)} training spots for `n_prototypes={p['n_prototypes']}`; lower `n_prototypes` "
                f"(≤ {len(train)}) or fit on more spots."
            )
        logger.info("stage 1/2 clustering of %d training spots", len(train))
        train_feats = RowSubset(feats, train)  # read on demand: no copy of the training spots' features
        clus = two_stage_kmeans(
            train_feats,
            None if groups is None else groups[train],
            n_prototypes=p["n_prototypes"],
            n_experts=p["n_experts"],
            random_state=p["random_state"],
            backend=p["clustering_backend"],
        )
        labels = _assign(feats, groups, clus, train)
        _, nearest = assign_nearest(train_feats, clus.centroids)
        scale = float(np.median(nearest))
        self.distance_scale_ = scale if scale > 0 else 1.0
        expert_of_spot = clus.centroid_to_expert[labels]
        n_exp = p["n_experts"]
        train_spots = [train[expert_of_spot[train] == e] for e in range(n_exp)]
        val_spots = [val[expert_of_spot[val] == e] for e in range(n_exp)]
        sizes = np.array([len(s) for s in train_spots])
        if (sizes < p["min_expert_spots"]).any():
            small = {int(e): int(sizes[e]) for e in np.flatnonzero(sizes < p["min_expert_spots"])}
            raise ValueError(
                f"expert(s) {small} (expert: training spots) have fewer than {p['min_expert_spots']} training "
                f"spots, too few to train contrastively; lower `n_experts` (now {n_exp}) or `n_prototypes`, "
                "or fit on more spots."
            )

        device = resolve_device(self.device)
        gen = torch.Generator().manual_seed(int(p["random_state"]) if p["random_state"] is not None else 0)
        pairs = ExpertPairs(n_exp, feats.shape[1], len(gene_idx), p["proj_dim"], p["dropout"], gen)
        expr = ExpressionSource(counts, gene_idx, normalize=p["normalize"], target_sum=p["target_sum"])
        config = TrainConfig(
            max_epochs=p["max_epochs"],
            batch_size=p["batch_size"],
            lr=p["lr"],
            weight_decay=p["weight_decay"],
            temperature=p["temperature"],
            patience=p["patience"],
            random_state=int(p["random_state"] or 0),
            precision=p["precision"],
        )
        fingerprint = _fingerprint(p, feats, adata, gene_idx, train)
        logger.info("training %d experts on %s", n_exp, device)
        self.history_ = train_experts(
            pairs, feats, expr, train_spots, val_spots, config, device,
            checkpoint_dir=checkpoint_dir, fingerprint=fingerprint,
        )
        self.pairs_ = pairs.cpu().eval()
        self.centroids_ = clus.centroids
        self.centroid_to_expert_ = clus.centroid_to_expert
        self.centroid_group_ = clus.centroid_group.astype(str)
        self.genes_ = adata.var_names[gene_idx].to_numpy().astype(str)
        self.feature_dim_ = int(feats.shape[1])
        split = np.full(adata.n_obs, "train", dtype=object)
        split[val] = "val"
        self.train_labels_ = pd.DataFrame(
            {"prototype": labels, "expert": expert_of_spot, "split": split}, index=adata.obs_names.copy()
        )
        return self

    # ------------------------------------------------------------------ inference
    def route(self, features: np.ndarray, *, tau: float = 0.1) -> np.ndarray:
        """Routing weights ``[n, n_experts]`` (rows sum to 1) of image features ``[n, D]``.

        The softmax over the stage-1 centroids of ``-d_k / (distance_scale_ · tau)``, summed over each
        expert's centroids (see :func:`spade_sc.tl.embed`). No threshold is applied (``routing_eps`` is
        :meth:`get_embedding`'s).

        Parameters
        ----------
        features
            Image features ``[n, feature_dim_]`` from the encoder used at fit time (a NumPy array, memmap or
            another array read chunk by chunk).
        tau
            Routing temperature, in units of ``distance_scale_`` (SPADE: 0.1).

        Returns
        -------
        float32 array ``[n, n_experts_]``; each row sums to 1.

        Raises
        ------
        ValueError
            If ``features`` is not ``[n, feature_dim_]`` or holds NaN or infinite values.

        Examples
        --------
        >>> import spade_sc as ss
        >>> adata = ss.datasets.toy()
        >>> model = ss.tl.fit_spade(adata, batch_key="slide", n_prototypes=8, n_experts=4, max_epochs=5)
        >>> weights = model.route(adata.obsm["X_image"], tau=0.1)
        >>> weights.shape, bool(abs(weights.sum(axis=1) - 1).max() < 1e-5)
        ((1600, 4), True)
        """
        import torch

        from ._routing import routing_weights

        self._require_fitted()
        check_positive("tau", tau)
        features = self._check_features(features)
        out = []
        c = torch.from_numpy(self.centroids_)
        c2e = torch.from_numpy(self.centroid_to_expert_)
        for s in range(0, features.shape[0], 16384):
            x = torch.from_numpy(_chunk(features, s, 16384))
            if not bool(torch.isfinite(x).all()):
                raise ValueError("image features contain NaN or infinite values; drop those spots first.")
            out.append(routing_weights(x, c, c2e, self.n_experts_, tau, self.distance_scale_).numpy())
        return np.concatenate(out) if out else np.zeros((0, self.n_experts_), np.float32)

    def _check_features(self, features) -> np.ndarray:
        """Shape check (values are checked chunk by chunk by ``route``); out-of-core arrays stay as they are."""
        if not is_out_of_core(features):
            features = np.asarray(features)
        if len(features.shape) != 2 or features.shape[1] != self.feature_dim_:
            raise ValueError(
                f"image features have shape {features.shape} but this model was fitted on {self.feature_dim_}-d "
                "features; extract features with the same encoder as at fit time."
            )
        return features

    def _heads_embed(self, which: str, x, weights: np.ndarray, *, chunk: int = 32768) -> np.ndarray:
        """Σ_e w_e · head_e(x), evaluating each expert only on the spots with non-zero weight.

        ``x`` is read one chunk of spots at a time (it may be a memmap or another out-of-core array).
        """
        import torch

        heads = getattr(self.pairs_, which)
        out = np.zeros((len(weights), self.proj_dim), dtype=np.float32)
        with torch.no_grad():
            for s in range(0, len(weights), chunk):
                xc = _chunk(x, s, chunk)
                wc = weights[s : s + chunk]
                for e in range(self.n_experts_):
                    rows = np.flatnonzero(wc[:, e] > 0)
                    if len(rows) == 0:
                        continue
                    xe = torch.from_numpy(xc if len(rows) == len(xc) else xc[rows])
                    emb = heads.forward_expert(xe, e).numpy()
                    out[s + rows] += wc[rows, e, None].astype(np.float32) * emb
        return out

    def resolve_routing_eps(self, routing_eps: float | str = "auto", modality: str = "image") -> float:
        """The routing threshold that ``routing_eps`` stands for (``"auto"``: the largest exact one).

        ``"auto"`` is the largest ``eps`` for which sparse routing changes no coordinate of the embedding by
        more than 1e-4 (:data:`spade_sc.model._routing.DEFAULT_ROUTING_ATOL`):
        ``eps = 1e-4 / (2 · (n_experts - 1) · R)``, ``R`` the bound of the heads' LayerNorm outputs
        (:func:`spade_sc.model._routing.head_output_bound`).

        Parameters
        ----------
        routing_eps
            A threshold ``≥ 0`` (returned as it is) or ``"auto"``.
        modality
            Heads the bound is computed for with ``"auto"``: ``"image"`` or ``"expression"``.

        Returns
        -------
        The threshold as a float: routing weights below it are dropped (and the rest renormalised) by
        :meth:`get_embedding` and :func:`spade_sc.tl.embed`.

        Raises
        ------
        ValueError
            If ``routing_eps`` is negative or a string other than ``"auto"``.

        Examples
        --------
        >>> import spade_sc as ss
        >>> adata = ss.datasets.toy()
        >>> model = ss.tl.fit_spade(adata, batch_key="slide", n_prototypes=8, n_experts=4, max_epochs=5)
        >>> 0 < model.resolve_routing_eps("auto") < 1e-4
        True
        >>> model.resolve_routing_eps(0)  # keep every expert
        0.0
        """
        from ._routing import auto_routing_eps, head_output_bound

        self._require_fitted()
        if isinstance(routing_eps, str):
            if routing_eps != "auto":
                raise ValueError(f"`routing_eps` must be a number ≥ 0 or 'auto', got {routing_eps!r}.")
            heads = getattr(self.pairs_, "image" if modality == "image" else "expression")
            return auto_routing_eps(self.n_experts_, head_output_bound(heads))
        check_positive("routing_eps", routing_eps, allow_zero=True)
        return float(routing_eps)

    def get_embedding(
        self,
        adata: AnnData,
        *,
        use_rep: str = _keys.IMAGE_REP,
        tau: float = 0.1,
        modality: str = "image",
        layer: str | None = None,
        routing_eps: float | str = "auto",
        table_key: str | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Embed spots; returns ``(embedding [n, proj_dim] float32, routing weights [n, n_experts])``.

        Writes nothing. See :func:`spade_sc.tl.embed` for the parameters.

        Returns
        -------
        ``(embedding, weights)``: the float32 joint-space embedding ``[n_obs, proj_dim]`` (of the image
        features, or of the expression with ``modality="expression"``) and the routing weights
        ``[n_obs, n_experts_]`` used (rows sum to 1, after dropping weights below ``routing_eps``).

        Examples
        --------
        >>> import spade_sc as ss
        >>> adata = ss.datasets.toy()
        >>> model = ss.tl.fit_spade(adata, batch_key="slide", n_prototypes=8, n_experts=4, max_epochs=5)
        >>> embedding, weights = model.get_embedding(adata)
        >>> embedding.shape, embedding.dtype, weights.shape
        ((1600, 256), dtype('float32'), (1600, 4))
        >>> "X_spade" in adata.obsm  # nothing written; ss.tl.embed writes it
        False
        """
        from ._routing import sparsify_weights

        self._require_fitted()
        check_choice("modality", modality, ("image", "expression"))
        routing_eps = self.resolve_routing_eps(routing_eps, modality)
        adata = check_anndata(get_table(adata, table_key))
        feats = get_rep(adata, use_rep)
        weights = self.route(feats, tau=tau)
        if routing_eps > 0:
            import torch

            weights = sparsify_weights(torch.from_numpy(weights), routing_eps).numpy()
        if modality == "image":
            return self._heads_embed("image", feats, weights), weights
        return self._heads_embed("expression", self._expression_input(adata, layer), weights), weights

    def _expression_input(self, adata: AnnData, layer: str | None) -> np.ndarray:
        import torch

        from ._data import ExpressionSource

        counts = get_counts(
            adata, layer, require_counts=self.normalize, hint="as this model (fitted with `normalize=True`) expects"
        )
        pos = pd.Index(adata.var_names).get_indexer(self.genes_)
        if (pos < 0).any():
            missing = self.genes_[pos < 0]
            raise ValueError(
                f"{len(missing)} of the model's {len(self.genes_)} genes are not in `adata.var_names` "
                f"(e.g. {', '.join(missing[:5])}); expression embedding needs the model's gene panel "
                "(`model.genes_`)."
            )
        src = ExpressionSource(counts, pos, normalize=self.normalize, target_sum=self.target_sum)
        idx = np.arange(len(src))
        return src.transform(torch.from_numpy(src.rows(idx)), idx).numpy()

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> None:
        """Write ``config.json`` and ``model.safetensors`` into directory ``path`` (no pickle).

        ``config.json`` holds the format and package versions, the hyper-parameters, the gene panel and the
        feature size; ``model.safetensors`` the heads, centroids and centroid → expert map.

        Parameters
        ----------
        path
            Directory to write (created if needed).
        overwrite
            Write into ``path`` even if it exists and is not empty; otherwise that raises ``FileExistsError``.

        Returns
        -------
        ``None``.

        Examples
        --------
        >>> import spade_sc as ss
        >>> adata = ss.datasets.toy()
        >>> model = ss.tl.fit_spade(adata, batch_key="slide", n_prototypes=8, n_experts=4, max_epochs=5)
        >>> model.save("spade_model")  # doctest: +SKIP
        >>> model = ss.SpadeModel.load("spade_model")  # doctest: +SKIP
        """
        from ._serialization import save_model

        self._require_fitted()
        save_model(self, Path(path), overwrite=overwrite)

    @classmethod
    def load(cls, path: str | os.PathLike, *, device: str | None = None) -> SpadeModel:
        """Load a model written by :meth:`save`.

        The format version is checked; the weights are read from safetensors (no pickle).

        Parameters
        ----------
        path
            Directory written by :meth:`save`.
        device
            Torch device of the model (``None``: CUDA when available, else CPU).

        Returns
        -------
        The fitted :class:`SpadeModel`; it embeds exactly as the saved one.

        Examples
        --------
        >>> import spade_sc as ss
        >>> model = ss.SpadeModel.load("spade_model")  # doctest: +SKIP
        >>> ss.tl.embed(adata, model)  # doctest: +SKIP
        """
        from ._serialization import load_model

        return load_model(cls, Path(path), device=device)

    @classmethod
    def from_spade_checkpoints(cls, *args, **kwargs) -> SpadeModel:
        """Import the SPADE authors' release: one ``.pt`` per expert, ``centroids.npy``, ``reassigned_clusters.npy``.

        Call as ``SpadeModel.from_spade_checkpoints(expert_files, centroids, centroid_to_expert, *, genes,
        centroid_group=None, normalize=False, target_sum=1e4, dropout=0.1, device=None)``. The ``.pt`` files
        are read with ``torch.load(..., weights_only=True)`` (a file that would run code is refused); the model
        routes with the authors' raw distances (``distance_scale_ = 1``). Parameters in full:
        :func:`spade_sc.model._interop.from_spade_checkpoints`.

        Parameters
        ----------
        *args, **kwargs
            ``expert_files`` (one ``.pt`` per expert, in expert order), ``centroids`` (``centroids.npy`` or
            a ``[K, D]`` array), ``centroid_to_expert`` (``reassigned_clusters.npy`` or a ``[K]`` array), and
            the keyword-only ``genes`` (the expression head's gene panel, in order), ``centroid_group``,
            ``normalize``, ``target_sum``, ``dropout``, ``device``.

        Returns
        -------
        A fitted :class:`SpadeModel`, to use with :func:`spade_sc.tl.embed` and to save with :meth:`save`.

        Examples
        --------
        >>> import spade_sc as ss
        >>> files = [f"spade_release/expert_{e}.pt" for e in range(16)]
        >>> model = ss.SpadeModel.from_spade_checkpoints(
        ...     files, "spade_release/centroids.npy", "spade_release/reassigned_clusters.npy", genes=panel
        ... )  # doctest: +SKIP
        >>> ss.tl.embed(adata, model, tau=0.1)  # doctest: +SKIP
        """
        from ._interop import from_spade_checkpoints

        return from_spade_checkpoints(cls, *args, **kwargs)


def _chunk(x, start: int, size: int) -> np.ndarray:
    """Rows ``start:start + size`` of any array-like (NumPy, memmap, zarr, h5py, dask) as a writable float32 array."""
    block = x[start : start + size]
    if hasattr(block, "compute"):
        block = block.compute()
    block = np.asarray(block, dtype=np.float32)
    return block if block.flags.writeable else block.copy()


def _check_hyper(p: dict) -> None:
    for name in ("n_prototypes", "n_experts", "proj_dim", "max_epochs", "batch_size", "min_expert_spots"):
        check_positive(name, p[name], integer=True)
    for name in ("temperature", "lr", "target_sum"):
        check_positive(name, p[name])
    check_positive("weight_decay", p["weight_decay"], allow_zero=True)
    check_fraction("dropout", p["dropout"])
    check_fraction("val_fraction", p["val_fraction"])
    if p["patience"] is not None:
        check_positive("patience", p["patience"], integer=True)
    check_choice("clustering_backend", p["clustering_backend"], ("auto", "sklearn", "faiss"))
    check_choice("precision", p["precision"], ("32", "bf16"))
    if p["n_experts"] > p["n_prototypes"] and True:
        pass  # more experts than total prototypes is checked at fit time (prototypes are per group)
    rs = p["random_state"]
    if rs is not None and (isinstance(rs, bool) or not isinstance(rs, (int, np.integer))):
        raise TypeError(f"`random_state` must be an integer or None, got {rs!r}.")
    if not isinstance(p["normalize"], bool):
        raise TypeError(f"`normalize` must be True or False, got {p['normalize']!r}.")


def _split(n: int, batches: np.ndarray | None, val_fraction: float, random_state) -> tuple[np.ndarray, np.ndarray]:
    """Train/validation spot indices: whole slides when ``batches`` is given (≥ 2 slides), else spots."""
    rng = np.random.default_rng(random_state)
    if val_fraction == 0:
        return np.arange(n), np.zeros(0, dtype=np.int64)
    if batches is not None:
        names = np.unique(batches)
        if len(names) >= 2:
            n_val = min(len(names) - 1, max(1, int(round(val_fraction * len(names)))))
            val_names = rng.choice(names, n_val, replace=False)
            is_val = np.isin(batches, val_names)
            return np.flatnonzero(~is_val), np.flatnonzero(is_val)
        warnings.warn(
            "only one batch in `batch_key`; validation spots are drawn at random instead of by slide.",
            UserWarning,
            stacklevel=3,
        )
    perm = rng.permutation(n)
    n_val = int(round(val_fraction * n))
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def _assign(feats, groups, clus, train) -> np.ndarray:
    """Prototype of every spot: its k-means label for training spots, else the nearest centroid of its group."""
    from ._clustering import RowSubset, assign_nearest

    labels = np.empty(feats.shape[0], dtype=np.int64)
    labels[train] = clus.labels
    other = np.setdiff1d(np.arange(feats.shape[0]), train)
    if len(other) == 0:
        return labels
    if groups is None:
        labels[other] = assign_nearest(RowSubset(feats, other), clus.centroids)[0]
        return labels
    for g in np.unique(groups[other]):
        rows = other[groups[other] == g]
        cand = np.flatnonzero(clus.centroid_group == g)
        if len(cand) == 0:  # a group seen only in validation: nearest centroid of any group
            cand = np.arange(len(clus.centroids))
        labels[rows] = cand[assign_nearest(RowSubset(feats, rows), clus.centroids[cand])[0]]
    return labels


def _fingerprint(params: dict, feats: np.ndarray, adata: AnnData, gene_idx: np.ndarray, train: np.ndarray) -> str:
    h = hashlib.sha256()
    h.update(json.dumps(params, sort_keys=True, default=str).encode())
    h.update(str(feats.shape).encode())
    from ._data import take_rows

    h.update(np.ascontiguousarray(take_rows(feats, np.arange(0, feats.shape[0], max(1, feats.shape[0] // 997))),
                                  dtype=np.float32).tobytes())
    h.update(",".join(adata.var_names[gene_idx][:2000]).encode())
    h.update(train.tobytes())
    return h.hexdigest()
