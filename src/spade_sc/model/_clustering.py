"""SPADE's two-stage clustering of image features into prototypes (stage 1) and experts (stage 2)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

__all__ = ["TwoStageClustering", "two_stage_kmeans", "kmeans", "assign_nearest", "wcss_curve"]


@dataclass
class TwoStageClustering:
    """Result of :func:`two_stage_kmeans`.

    Attributes
    ----------
    centroids
        ``[K, D]`` stage-1 centroids (prototypes), all groups stacked.
    centroid_group
        ``[K]`` group name of each centroid.
    centroid_to_expert
        ``[K]`` expert index (stage-2 cluster) of each centroid.
    labels
        ``[n]`` prototype index of each input spot.
    """

    centroids: np.ndarray
    centroid_group: np.ndarray
    centroid_to_expert: np.ndarray
    labels: np.ndarray

    @property
    def spot_expert(self) -> np.ndarray:
        return self.centroid_to_expert[self.labels]


def kmeans(x: np.ndarray, k: int, *, random_state: int | None = 0, n_init="auto", backend: str = "sklearn"):
    """k-means of the rows of ``x``; returns ``(centroids [k, D] float32, labels [n], inertia)``.

    ``backend="faiss"`` uses faiss-cpu (optional dependency ``spade_sc[faiss]``) on all points.
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    if backend == "faiss":
        try:
            import faiss
        except ImportError as e:  # pragma: no cover - depends on the optional extra
            raise ImportError("`backend='faiss'` needs faiss-cpu: `pip install 'spade_sc[faiss]'`.") from e
        seed = 0 if random_state is None else int(random_state)
        km = faiss.Kmeans(
            x.shape[1], k, niter=25, nredo=1 if n_init == "auto" else int(n_init), seed=seed,
            max_points_per_centroid=max(256, -(-x.shape[0] // k)),
        )
        km.train(x)
        dist, labels = km.index.search(x, 1)
        return km.centroids.astype(np.float32), labels[:, 0].astype(np.int64), float(dist.sum())
    from sklearn.cluster import KMeans

    km = KMeans(n_clusters=k, n_init=n_init, random_state=random_state).fit(x)
    return km.cluster_centers_.astype(np.float32), km.labels_.astype(np.int64), float(km.inertia_)


def assign_nearest(x: np.ndarray, centroids: np.ndarray, chunk: int = 65536) -> tuple[np.ndarray, np.ndarray]:
    """Index of, and Euclidean distance to, the nearest centroid for each row of ``x``."""
    c = centroids.astype(np.float32)
    c2 = (c * c).sum(1)
    idx = np.empty(len(x), dtype=np.int64)
    dist = np.empty(len(x), dtype=np.float32)
    for s in range(0, len(x), chunk):
        xb = np.asarray(x[s : s + chunk], dtype=np.float32)
        d2 = (xb * xb).sum(1)[:, None] - 2 * xb @ c.T + c2[None]
        j = d2.argmin(1)
        idx[s : s + chunk] = j
        dist[s : s + chunk] = np.sqrt(np.maximum(d2[np.arange(len(j)), j], 0))
    return idx, dist


def two_stage_kmeans(
    x: np.ndarray,
    groups: np.ndarray | None,
    *,
    n_prototypes: int = 16,
    n_experts: int = 16,
    random_state: int | None = 0,
    backend: str = "sklearn",
) -> TwoStageClustering:
    """SPADE's clustering: k-means per group (stage 1), then k-means of all centroids (stage 2).

    A group with fewer distinct feature vectors than ``n_prototypes`` gets one prototype per distinct
    vector (with a warning) instead of failing.

    Raises
    ------
    ValueError
        If the groups together give fewer prototypes than ``n_experts``.
    """
    n = len(x)
    if groups is None:
        groups = np.zeros(n, dtype=object)
        groups[:] = "all"
    groups = np.asarray(groups).astype(str)
    names = sorted(np.unique(groups))
    centroids, centroid_group = [], []
    labels = np.empty(n, dtype=np.int64)
    offset = 0
    for gi, name in enumerate(names):
        rows = np.flatnonzero(groups == name)
        xg = x[rows]
        n_distinct = len(np.unique(xg, axis=0)) if len(xg) <= 4 * n_prototypes else len(xg)
        k = min(n_prototypes, n_distinct)
        if k < n_prototypes:
            warnings.warn(
                f"group {name!r} has only {n_distinct} distinct spots, fewer than `n_prototypes={n_prototypes}`; "
                f"it gets {k} prototypes (one per distinct spot).",
                UserWarning,
                stacklevel=3,
            )
        seed = None if random_state is None else random_state + gi
        c, lab, _ = kmeans(xg, k, random_state=seed, backend=backend)
        centroids.append(c)
        centroid_group.extend([name] * k)
        labels[rows] = lab + offset
        offset += k
    centroids = np.concatenate(centroids, axis=0)
    n_total = len(centroids)
    if n_experts > n_total:
        raise ValueError(
            f"`n_experts={n_experts}` is larger than the number of stage-1 prototypes ({n_total} = "
            f"{len(names)} group(s) × up to `n_prototypes={n_prototypes}`); lower `n_experts` to ≤ {n_total} "
            "or raise `n_prototypes`."
        )
    if n_experts == n_total:
        c2e = np.arange(n_total, dtype=np.int64)
    else:
        _, c2e, _ = kmeans(centroids, n_experts, random_state=random_state, n_init=10, backend="sklearn")
    # renumber experts by size (largest first) so that labels are stable and readable
    sizes = np.bincount(c2e[labels], minlength=n_experts)
    order = np.argsort(-sizes, kind="stable")
    rename = np.empty(n_experts, dtype=np.int64)
    rename[order] = np.arange(n_experts)
    return TwoStageClustering(centroids, np.asarray(centroid_group, dtype=object), rename[c2e], labels)


def wcss_curve(x: np.ndarray, ks, *, random_state: int | None = 0, backend: str = "sklearn") -> np.ndarray:
    """Within-cluster sum of squares of k-means for each ``k`` in ``ks`` (SPADE's elbow)."""
    return np.array([kmeans(x, int(k), random_state=random_state, backend=backend)[2] for k in ks])
