"""``tl.elbow``: within-cluster sum of squares against k for SPADE's two clustering stages."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .. import _keys
from .._logging import log_added
from .._utils import copy_data, get_table
from .._validate import check_anndata, check_choice, check_positive, get_obs_column, get_rep

__all__ = ["elbow", "knee"]

ELBOW_KEY = "spade_elbow"


def knee(ks: Sequence[int], wcss: Sequence[float]) -> int:
    """The elbow of a decreasing curve: the ``k`` farthest below the chord from its first to its last point.

    Both axes are scaled to [0, 1] first, with ``k`` on a log scale (as it is drawn, and as ``ks`` is
    usually a doubling series). Returns ``-1`` when fewer than three finite points exist or when the curve
    never dips below the chord by more than 2 % of its range (no elbow: a straight or concave curve).
    """
    ks = np.asarray(ks, dtype=float)
    y = np.asarray(wcss, dtype=float)
    ok = np.isfinite(y) & (ks > 0)
    if ok.sum() < 3:
        return -1
    kk, yy = ks[ok], y[ok]
    x = np.log(kk)
    x = (x - x[0]) / (x[-1] - x[0]) if x[-1] != x[0] else np.zeros_like(x)
    span = yy[0] - yy[-1]
    if span <= 0:
        return -1
    yy = (yy - yy[-1]) / span
    # chord from (0, 1) to (1, 0): y = 1 - x; the elbow is the interior point farthest below it. A curve that
    # never dips below the chord by 2 % of its range (a straight or concave one) has no elbow.
    below = ((1 - x) - yy)[1:-1]
    if below.max() <= 0.02:
        return -1
    return int(kk[1 + int(np.argmax(below))])


def elbow(
    adata,
    *,
    ks: Sequence[int] = (4, 8, 16, 32, 64),
    stage2_ks: Sequence[int] | None = None,
    use_rep: str = _keys.IMAGE_REP,
    group_key: str | None = None,
    n_prototypes: int | None = None,
    max_spots_per_group: int | None = None,
    random_state: int | None = 0,
    backend: str = "auto",
    key_added: str = ELBOW_KEY,
    table_key: str | None = None,
    copy: bool = False,
):
    """Within-cluster sum of squares (WCSS) of k-means against ``k`` for both of SPADE's clustering stages.

    SPADE chose its numbers of clusters with elbow plots: stage 1 clusters the image features of each group
    (organ) separately, stage 2 clusters the stage-1 centroids of all groups into experts. This computes
    both curves so that :func:`spade_sc.pl.elbow` can draw them:

    - stage 1: for each group, WCSS of k-means of its spots' features for each ``k`` in ``ks`` (``NaN``
      where the group has fewer distinct spots than ``k``);
    - stage 2: k-means with ``n_prototypes`` clusters per group gives the stage-1 centroids (as in
      :func:`spade_sc.tl.fit_spade`); WCSS of k-means of those centroids for each ``k`` in ``stage2_ks``.

    Each curve's elbow (the ``k`` farthest below the chord from its first to its last point, with ``k`` on
    a log scale) and total sum of squares (the WCSS at ``k = 1``) are stored too.

    Parameters
    ----------
    adata
        AnnData (or SpatialData with ``table_key``) with image features in ``.obsm[use_rep]``.
    ks
        Numbers of stage-1 clusters to try.
    stage2_ks
        Numbers of experts to try (default: the values of ``ks`` up to the number of stage-1 centroids).
    use_rep
        ``.obsm`` key of the image features.
    group_key
        ``.obs`` column of the groups clustered separately in stage 1 (SPADE: organ); one group when ``None``.
    n_prototypes
        Stage-1 clusters per group that give the centroids of stage 2 (default: the ``n_prototypes`` of a
        previous :func:`~spade_sc.tl.fit_spade` in ``.uns['spade']['params']``, else 16).
    max_spots_per_group
        Cluster a random subset of at most this many spots per group (``None``: all). At HEST-1k scale
        (hundreds of thousands of spots) 20,000 gives the same curve shape in a fraction of the time.
    random_state
        Seed of the k-means and of the subsets.
    backend
        ``"sklearn"``, ``"faiss"`` (optional dependency) or ``"auto"`` (faiss for large inputs when it is
        installed) for the k-means.
    key_added
        ``.uns`` key written.
    table_key
        Table to use when ``adata`` is a SpatialData.
    copy
        Return a modified copy instead of writing in place.

    Returns
    -------
    ``None``, or the copy when ``copy=True``. Writes ``.uns['{key_added}']`` (h5ad-safe), a dict with

    - ``ks`` (int array), ``groups`` (str array), ``stage1_wcss`` (float ``groups × ks``),
      ``stage1_tss`` (float per group), ``stage1_n_spots`` (int per group), ``stage1_knee`` (int per group,
      -1 when undefined);
    - ``stage2_ks``, ``stage2_wcss``, ``stage2_tss``, ``stage2_knee``, ``n_prototypes``;
    - ``params``: the arguments.

    Examples
    --------
    >>> import spade_sc as ss
    >>> adata = ss.datasets.toy()
    >>> ss.tl.elbow(adata, ks=(2, 4, 8, 16, 32), group_key="slide", n_prototypes=8)
    >>> fig = ss.pl.elbow(adata)
    """
    from ..model import two_stage_kmeans, wcss_curve

    # ---------------------------------------------------------------- validate everything first
    ks = _check_ks("ks", ks)
    if stage2_ks is not None:
        stage2_ks = _check_ks("stage2_ks", stage2_ks)
    check_choice("backend", backend, ("auto", "sklearn", "faiss"))
    if max_spots_per_group is not None:
        check_positive("max_spots_per_group", max_spots_per_group, integer=True)
    table = check_anndata(get_table(adata, table_key))
    feats = get_rep(table, use_rep)
    groups = (
        get_obs_column(table, group_key, what="group_key")
        if group_key is not None
        else np.full(table.n_obs, "all", dtype=object).astype(str)
    )
    if n_prototypes is None:
        prev = table.uns.get(_keys.uns_key(), {})
        prev = prev.get("params", {}) if isinstance(prev, dict) else {}
        n_prototypes = int(prev.get("n_prototypes", 16))
    check_positive("n_prototypes", n_prototypes, integer=True)
    max_centroids = sum(min(n_prototypes, int((groups == g).sum())) for g in np.unique(groups))
    if stage2_ks is not None and stage2_ks.max() > max_centroids:
        raise ValueError(
            f"stage 2 clusters at most {max_centroids} stage-1 centroids (groups × `n_prototypes={n_prototypes}`), "
            f"so every k of `stage2_ks` must be ≤ {max_centroids}; got {stage2_ks.tolist()}."
        )

    # ---------------------------------------------------------------- compute
    rng = np.random.default_rng(random_state)
    names = np.array(sorted(np.unique(groups)), dtype=str)
    rows_used = []
    wcss1 = np.full((len(names), len(ks)), np.nan)
    tss1, n_spots, knee1 = np.zeros(len(names)), np.zeros(len(names), dtype=np.int64), np.zeros(len(names), np.int64)
    for gi, name in enumerate(names):
        rows = np.flatnonzero(groups == name)
        if max_spots_per_group is not None and len(rows) > max_spots_per_group:
            rows = np.sort(rng.choice(rows, max_spots_per_group, replace=False))
        rows_used.append(rows)
        x = feats[rows].astype(np.float64)
        n_spots[gi] = len(rows)
        tss1[gi] = float(((x - x.mean(0)) ** 2).sum())
        n_distinct = len(np.unique(x, axis=0)) if len(rows) <= 4 * int(ks.max()) else len(rows)
        ok = ks < n_distinct
        wcss1[gi, ks == n_distinct] = 0.0  # one cluster per distinct spot
        if ok.any():
            seed = None if random_state is None else random_state + gi
            wcss1[gi, ok] = wcss_curve(feats[rows], ks[ok], random_state=seed, backend=backend)
        knee1[gi] = knee(ks, wcss1[gi])
    used = np.concatenate(rows_used)
    clus = two_stage_kmeans(
        feats[used], groups[used], n_prototypes=n_prototypes, n_experts=1, random_state=random_state,
        backend=backend,
    )
    cents = clus.centroids
    k2 = ks[ks <= len(cents)] if stage2_ks is None else stage2_ks
    if (k2 > len(cents)).any() or len(k2) == 0:
        raise ValueError(
            f"stage 2 clusters {len(cents)} stage-1 centroids ({len(names)} group(s) × `n_prototypes="
            f"{n_prototypes}`), so every k of `stage2_ks` must be ≤ {len(cents)}; got {k2.tolist()}."
        )
    n_distinct = len(np.unique(cents, axis=0))
    wcss2 = np.zeros(len(k2))  # 0 once every distinct centroid has its own cluster
    wcss2[k2 > n_distinct] = np.nan
    if (k2 < n_distinct).any():
        wcss2[k2 < n_distinct] = wcss_curve(cents, k2[k2 < n_distinct], random_state=random_state, backend="sklearn")
    c64 = cents.astype(np.float64)
    result = {
        "ks": ks,
        "groups": names,
        "stage1_wcss": wcss1,
        "stage1_tss": tss1,
        "stage1_n_spots": n_spots,
        "stage1_knee": knee1,
        "stage2_ks": k2,
        "stage2_wcss": np.asarray(wcss2, dtype=float),
        "stage2_tss": float(((c64 - c64.mean(0)) ** 2).sum()),
        "stage2_knee": knee(k2, wcss2),
        "n_prototypes": int(n_prototypes),
        "params": {
            "use_rep": use_rep,
            "group_key": group_key or "",
            "max_spots_per_group": int(max_spots_per_group or 0),
            "random_state": -1 if random_state is None else int(random_state),
            "backend": backend,
        },
    }
    # ---------------------------------------------------------------- write
    data = copy_data(adata) if copy else adata
    get_table(data, table_key).uns[key_added] = result
    log_added("uns", key_added)
    return data if copy else None


def _check_ks(name: str, ks) -> np.ndarray:
    if isinstance(ks, (int, np.integer)):
        ks = [ks]
    try:
        arr = np.asarray(list(ks))
    except TypeError:
        raise TypeError(f"`{name}` must be a sequence of integers, got {ks!r}.") from None
    if arr.size == 0 or not np.issubdtype(arr.dtype, np.integer) or (arr < 1).any():
        raise ValueError(f"`{name}` must be a non-empty sequence of integers ≥ 1, got {list(ks)!r}.")
    if len(np.unique(arr)) != len(arr) or (np.diff(arr) < 0).any():
        raise ValueError(f"`{name}` must be increasing without repeats, got {arr.tolist()}.")
    return arr.astype(np.int64)
