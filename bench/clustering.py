"""Stage-1/2 clustering time on 534,000 × 1024 features: scikit-learn vs faiss, all points vs spade_sc's sample.

Stage 1 is k-means with ``k = 16`` prototypes (per group; one group here); stage 2 clusters the stage-1
centroids of 15 organs (240 centroids, as SPADE's HEST-1k fit) into 16 experts. Methods:

- ``sklearn-all`` / ``faiss-all``: k-means on every point (``max_points=None``);
- ``sklearn-sampled`` / ``faiss-sampled``: spade_sc's default, the centroids fitted on a random sample of
  ``MAX_KMEANS_POINTS`` rows, then every point assigned to its nearest centroid (chunked).

Each reports seconds and its inertia relative to ``sklearn-all`` (lower is better; 1.00 = same quality).
``--quick`` runs on 65,536 points and extrapolates the all-point methods linearly to 534,000 (marked ``~``).
The last line is ``faiss_speedup_vs_sklearn=<x> sampled_speedup_vs_sklearn_all=<y>``.
"""

from __future__ import annotations

import time

import numpy as np

from _common import parser, setup_torch, synthetic_features


def main() -> None:
    ap = parser(__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=None, help="points (default 534,000; 65,536 with --quick)")
    args = ap.parse_args()
    setup_torch(args)
    from spade_sc.model._clustering import MAX_KMEANS_POINTS, kmeans, resolve_backend

    full_n = 534_000
    n = args.n or (65_536 if args.quick else full_n)
    scale = full_n / n
    x = synthetic_features(n, 1024, n_clusters=64, seed=0, dtype=np.float16)  # float16, as stored at scale
    print(f"features: {n} × 1024 float16 ({x.nbytes / 1e9:.2f} GB); MAX_KMEANS_POINTS={MAX_KMEANS_POINTS}")
    have_faiss = resolve_backend("auto") == "faiss"
    backends = ["sklearn", "faiss"] if have_faiss else ["sklearn"]
    if not have_faiss:
        print("faiss-cpu is not installed: `pip install 'spade_sc[faiss]'` to compare")
    from spade_sc.model._clustering import assign_nearest

    t = time.perf_counter()
    assign_nearest(x, np.zeros((16, x.shape[1]), np.float32))
    t_assign = time.perf_counter() - t  # nearest-centroid labelling of all n points
    res = {}
    for backend in backends:
        for sampled in (False, True):
            if sampled and n <= MAX_KMEANS_POINTS:
                # at full size the sampled method fits on MAX_KMEANS_POINTS rows (timed here as the all-point
                # fit when n == MAX_KMEANS_POINTS) and labels all points: add the assignment of the rest
                dt, _, inertia = res[f"{backend}-all"]
                est = res[f"{backend}-all"][0] * MAX_KMEANS_POINTS / n + t_assign * scale
                res[f"{backend}-sampled"] = (float("nan"), est, inertia)
                continue
            t = time.perf_counter()
            _, _, inertia = kmeans(x, 16, random_state=0, backend=backend,
                                   max_points=MAX_KMEANS_POINTS if sampled else None)
            dt = time.perf_counter() - t
            est = dt * scale if not sampled else dt + t_assign * (scale - 1)
            res[f"{backend}-{'sampled' if sampled else 'all'}"] = (dt, est, inertia)
    ref_inertia = res["sklearn-all"][2]
    for name, (dt, est, inertia) in res.items():
        extra = f" (~{est:.1f} s at {full_n:,})" if n != full_n else ""
        q = "" if (name.endswith("sampled") and n <= MAX_KMEANS_POINTS) else \
            f"   inertia / sklearn-all = {inertia / ref_inertia:.4f}"
        print(f"  {name:16s} {dt:7.2f} s{extra}{q}")

    # stage 2: 240 stage-1 centroids of 15 groups -> 16 experts (scikit-learn, n_init=10, as in the fit)
    cents = synthetic_features(240, 1024, n_clusters=16, seed=1)
    t = time.perf_counter()
    kmeans(cents, 16, random_state=0, n_init=10, backend="sklearn")
    print(f"  stage 2 (240 centroids -> 16 experts, sklearn n_init=10): {time.perf_counter() - t:.2f} s")

    key = 1 if n != full_n else 0
    sk = res["sklearn-all"][key]
    fa = res["faiss-all"][key] if have_faiss else float("nan")
    best_sampled = min(v[key] for k, v in res.items() if k.endswith("sampled"))
    print(f"faiss_speedup_vs_sklearn={sk / fa:.2f} sampled_speedup_vs_sklearn_all={sk / best_sampled:.2f}")


if __name__ == "__main__":
    main()
