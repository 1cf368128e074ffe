"""Embedding throughput: dense routing (every expert on every spot) vs sparse routing (``routing_eps="auto"``).

A SPADE model of HEST-1k's shape: 1024-d features, 240 stage-1 centroids (15 organs × 16 prototypes) mapped
to 16 experts, 256-d joint space, heads at their initialisation (LayerNorm ``γ = 1, β = 0``, so the output
bound is ``R = sqrt(255)`` and ``routing_eps="auto"`` is ``1e-4 / (2 · 15 · R) ≈ 2.1e-7``). Spots lie
between prototypes: ``c_a + u · (c_b - c_a) + noise`` with ``u ~ U(0, 0.5)``, so many spots have more than
one expert with a weight that matters; and near their prototype (``u ≤ 0.05``), where one or two experts
carry all the weight. The last line reports the harder case ("between"); both are printed.

Dense evaluates all 16 experts for every spot (``routing_eps=0``); sparse evaluates only experts whose weight
is at least ``eps`` (renormalised; provably within 1e-4 of dense). Both include the routing itself.
The last line is ``speedup_sparse_vs_dense=<x> max_abs_diff=<d>``.
"""

from __future__ import annotations

import time

import numpy as np

from _common import parser, setup_torch


def build_model(dim=1024, n_centroids=240, n_experts=16, proj_dim=256, n_genes=100, seed=0):
    import torch

    from spade_sc import SpadeModel
    from spade_sc.model._heads import ExpertPairs

    rng = np.random.default_rng(seed)
    model = SpadeModel(n_experts=n_experts, proj_dim=proj_dim)
    model.pairs_ = ExpertPairs(n_experts, dim, n_genes, proj_dim, generator=torch.Generator().manual_seed(seed)).eval()
    model.centroids_ = rng.normal(0, 1, (n_centroids, dim)).astype(np.float32)
    model.centroid_to_expert_ = rng.permutation(np.arange(n_centroids) % n_experts)
    model.centroid_group_ = np.array([f"organ{i // 16}" for i in range(n_centroids)])
    model.genes_ = np.array([f"g{i}" for i in range(n_genes)])
    model.feature_dim_ = dim
    return model


def spots_between_prototypes(centroids, n, noise=0.3, seed=1, u_max=0.5):
    rng = np.random.default_rng(seed)
    a = rng.integers(0, len(centroids), n)
    b = rng.integers(0, len(centroids), n)
    u = rng.uniform(0, u_max, (n, 1)).astype(np.float32)
    out = centroids[a] + u * (centroids[b] - centroids[a])
    out += rng.standard_normal(out.shape, dtype=np.float32) * noise
    return out


def main() -> None:
    ap = parser(__doc__.splitlines()[0])
    ap.add_argument("--n-spots", type=int, default=None, help="spots (default 20,000 quick / 200,000 full)")
    args = ap.parse_args()
    setup_torch(args)
    import anndata as ad

    from spade_sc.model._clustering import assign_nearest

    n = args.n_spots or (20_000 if args.quick else 200_000)
    model = build_model()
    eps = model.resolve_routing_eps("auto")
    print(f"{n:,} spots × 1024, 240 centroids -> 16 experts, 256-d; routing_eps='auto' = {eps:.3g}")
    results = {}
    for geometry, u_max in (("near a prototype (u ≤ 0.05)", 0.05), ("between prototypes (u ≤ 0.5)", 0.5)):
        feats = spots_between_prototypes(model.centroids_, n, u_max=u_max)
        _, nearest = assign_nearest(feats, model.centroids_)
        model.distance_scale_ = float(np.median(nearest))
        adata = ad.AnnData(obsm={"X_image": feats}, shape=(n, 0))
        model.get_embedding(adata[:512].copy(), routing_eps=0.0)  # warm-up
        t = time.perf_counter()
        dense, _ = model.get_embedding(adata, routing_eps=0.0)
        t_dense = time.perf_counter() - t
        t = time.perf_counter()
        sparse, w_sparse = model.get_embedding(adata)  # default: "auto"
        t_sparse = time.perf_counter() - t
        t = time.perf_counter()
        model.route(feats)
        t_route = time.perf_counter() - t
        k = (w_sparse > 0).sum(1)
        diff = float(np.abs(sparse - dense).max())
        hist = ", ".join(f"{i}: {np.mean(k == i):.0%}" for i in range(1, 4)) + f", ≥4: {np.mean(k >= 4):.0%}"
        print(f"spots {geometry}: experts evaluated per spot {k.mean():.2f} ({hist})")
        print(f"  dense {t_dense:.2f} s ({n / t_dense:,.0f} spots/s), sparse {t_sparse:.2f} s "
              f"({n / t_sparse:,.0f} spots/s; routing alone {t_route:.2f} s): x{t_dense / t_sparse:.2f}, "
              f"max |sparse - dense| = {diff:.2e}")
        results[u_max] = (t_dense / t_sparse, diff)
    x, d = results[0.5]
    d = max(d, results[0.05][1])
    print(f"speedup_sparse_vs_dense={x:.2f} max_abs_diff={d:.2e}")

if __name__ == "__main__":
    main()
