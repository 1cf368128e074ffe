"""SPADE's two-stage clustering of image features into prototypes (stage 1) and experts (stage 2)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

__all__ = ["TwoStageClustering", "two_stage_kmeans", "kmeans", "assign_nearest", "wcss_curve", "RowSubset",
           "MAX_KMEANS_POINTS", "resolve_backend"]

#: k-means is fitted on a random sample of at most this many rows (then every row goes to its nearest
#: centroid): bounded memory and time on cohorts of millions of spots, same result on smaller data.
MAX_KMEANS_POINTS = 65536


class RowSubset:
    """Rows ``rows`` of ``x``, read on demand: ``len``, ``shape``, slicing and integer-array indexing.

    Lets the clustering work on a subset of spots (a group, the training split) without copying it.
    """

    def __init__(self, x, rows: np.ndarray):
        self.x = x
        self.rows = np.asarray(rows, dtype=np.int64)
        self.shape = (len(self.rows), *x.shape[1:])
        self.dtype = x.dtype

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, key):
        from ._data import take_rows

        return np.asarray(take_rows(self.x, self.rows[key]))


#: ``clustering_backend="auto"`` uses faiss (when installed) from this many rows on, scikit-learn below
#: (small fits stay identical with and without the optional dependency).
AUTO_FAISS_MIN_ROWS = 50_000


def resolve_backend(backend: str, n_rows: int | None = None) -> str:
    """``"auto"`` → ``"faiss"`` when faiss is importable and ``n_rows >= AUTO_FAISS_MIN_ROWS``, else
    ``"sklearn"``."""
    if backend != "auto":
        return backend
    if n_rows is not None and n_rows < AUTO_FAISS_MIN_ROWS:
        return "sklearn"
    try:
        import faiss  # noqa: F401
    except ImportError:
        return "sklearn"
    return "faiss"


def _dense_rows(x, idx=None) -> np.ndarray:
    if idx is None:
        return np.ascontiguousarray(x[:] if isinstance(x, RowSubset) else x, dtype=np.float32)
    return np.ascontiguousarray(x[idx], dtype=np.float32)


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


def kmeans(
    x, k: int, *, random_state: int | None = 0, n_init="auto", backend: str = "sklearn",
    max_points: int | None = MAX_KMEANS_POINTS,
):
    """k-means of the rows of ``x``; returns ``(centroids [k, D] float32, labels [n], inertia)``.

    With more than ``max_points`` rows the centroids are fitted on a random sample of ``max_points`` rows
    (only the sample is converted to float32), then every row is labelled with its nearest centroid
    (chunked) and the inertia is computed over all rows. ``backend="faiss"`` uses faiss-cpu (optional
    dependency ``spade_sc[faiss]``); ``"auto"`` picks faiss when it is installed.
    """
    n = len(x)
    backend = resolve_backend(backend, n)
    sample = None
    if max_points is not None and n > max_points:
        rng = np.random.default_rng(None if random_state is None else int(random_state) + 7919)
        sample = np.sort(rng.choice(n, max_points, replace=False))
    xs = _dense_rows(x, sample)
    if backend == "faiss":
        try:
            import faiss
        except ImportError as e:  # pragma: no cover - depends on the optional extra
            raise ImportError("`backend='faiss'` needs faiss-cpu: `pip install 'spade_sc[faiss]'`.") from e
        seed = 0 if random_state is None else int(random_state)
        km = faiss.Kmeans(
            xs.shape[1], k, niter=25, nredo=1 if n_init == "auto" else int(n_init), seed=seed,
            max_points_per_centroid=max(256, -(-xs.shape[0] // k)),
        )
        from sklearn.cluster import kmeans_plusplus

        # k-means++ seeding (as scikit-learn) on ≤ 256·k rows: faiss' own random seeding is worse (≈ 5 %
        # higher inertia on blob data) and k-means++ over all rows costs more than the iterations
        n_seed = min(len(xs), 256 * k)
        seed_rows = np.random.default_rng(seed).choice(len(xs), n_seed, replace=False) if n_seed < len(xs) else None
        init, _ = kmeans_plusplus(xs if seed_rows is None else xs[np.sort(seed_rows)], k, random_state=seed)
        km.train(xs, init_centroids=np.ascontiguousarray(init, dtype=np.float32))
        centroids = km.centroids.astype(np.float32)
        if sample is None:
            dist, labels = km.index.search(xs, 1)
            return centroids, labels[:, 0].astype(np.int64), float(dist.sum())
    else:
        from sklearn.cluster import KMeans

        km = KMeans(n_clusters=k, n_init=n_init, random_state=random_state).fit(xs)
        centroids = km.cluster_centers_.astype(np.float32)
        if sample is None:
            return centroids, km.labels_.astype(np.int64), float(km.inertia_)
    del xs
    labels, dist = assign_nearest(x, centroids)
    return centroids, labels, float((dist.astype(np.float64) ** 2).sum())


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
    from ._distributed import current

    comm = current()
    kw = dict(n_prototypes=n_prototypes, n_experts=n_experts, random_state=random_state, backend=backend)
    if comm is None:
        return _two_stage_kmeans(x, groups, **kw)
    # multi-process fit: rank 0 clusters, the others receive the result (errors are raised on every rank)
    res = None
    if comm.is_main:
        try:
            res = _two_stage_kmeans(x, groups, **kw)
        except Exception as e:  # noqa: BLE001 - re-raised below on every rank
            res = e
    res = comm.broadcast_object(res)
    if isinstance(res, Exception):
        raise res
    return res


def _two_stage_kmeans(
    x: np.ndarray,
    groups: np.ndarray | None,
    *,
    n_prototypes: int = 16,
    n_experts: int = 16,
    random_state: int | None = 0,
    backend: str = "sklearn",
) -> TwoStageClustering:
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
        xg = x if len(rows) == n else RowSubset(x, rows)  # no copy of the group's features
        n_distinct = len(np.unique(_dense_rows(xg), axis=0)) if len(xg) <= 4 * n_prototypes else len(xg)
        k = min(n_prototypes, n_distinct)
        if k < n_prototypes:
            warnings.warn(
                f"group {str(name)!r} has only {n_distinct} distinct spots, fewer than `n_prototypes={n_prototypes}`; "
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
