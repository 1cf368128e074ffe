"""Peak resident memory of ``ss.tl.fit_spade`` on 534,000 spots × 7,968 genes (HEST-1k scale).

Data: CSR counts with ~5 % non-zeros (≈ 200 M values; ``uint16`` counts + ``int32`` indices by default,
``--counts-dtype float32`` for float32 values) and 1024-d float16 features, generated without any dense
intermediate. The fit runs the whole pipeline: input checks, stage-1/2 clustering, size factors, expert
assignment, model and optimizer state, validation and training minibatches. ``--steps N`` (default 20)
truncates every epoch to its first ``N`` steps (by wrapping ``expert_batches``): the fit's memory does not
grow after the first steps, and a full epoch on a 2-core CPU takes ~15 min (``--steps 0`` runs it).

Peak RSS is the process's ``ru_maxrss`` (the whole process: Python, torch, the data, the fit). For
comparison the authors' pipeline preloads dense float32 expression, ``n × genes × 4`` bytes.
The last line is ``peak_rss_gb=<x> dense_preload_gb=<y>``.
"""

from __future__ import annotations

import time

import numpy as np

from _common import FEATURE_DIM, N_GENES, parser, peak_rss_gb, setup_torch, synthetic_adata


def _rss_now_gb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 1e9


def main() -> None:
    ap = parser(__doc__.splitlines()[0])
    ap.add_argument("--n-spots", type=int, default=None, help="spots (default 534,000; 40,000 with --quick)")
    ap.add_argument("--steps", type=int, default=20, help="steps per epoch (0: full epochs)")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--counts-dtype", default="uint16", choices=["uint16", "float32"])
    args = ap.parse_args()
    setup_torch(args)
    import spade_sc as ss
    import spade_sc.model._trainer as trainer

    n = args.n_spots or (40_000 if args.quick else 534_000)
    if args.steps:
        orig = trainer.expert_batches

        def truncated(*a, **k):
            idx, mask, active = orig(*a, **k)
            return idx[: args.steps], mask[: args.steps], active[: args.steps]

        trainer.expert_batches = truncated
    t = time.perf_counter()
    adata = synthetic_adata(n, feature_dtype=np.float16, counts_dtype=np.dtype(args.counts_dtype))
    x = adata.X
    data_gb = (x.data.nbytes + x.indices.nbytes + x.indptr.nbytes + adata.obsm["X_image"].nbytes) / 1e9
    print(f"data: {n:,} spots × {N_GENES} genes, {x.nnz / 1e6:.0f} M non-zeros ({x.data.dtype} values, "
          f"{x.indices.dtype} indices), {FEATURE_DIM}-d float16 features: {data_gb:.2f} GB in arrays; "
          f"built in {time.perf_counter() - t:.0f} s")
    base = _rss_now_gb()
    peak_before = peak_rss_gb()
    print(f"RSS before the fit: {base:.2f} GB (peak so far {peak_before:.2f} GB)")
    t = time.perf_counter()
    ss.tl.fit_spade(adata, n_prototypes=16, n_experts=16, max_epochs=args.epochs, device=args.device)
    peak = peak_rss_gb()
    dense = n * N_GENES * 4 / 1e9
    steps = f"{args.steps} steps per epoch" if args.steps else "full epochs"
    print(f"fit ({args.epochs} epoch(s), {steps}) took {time.perf_counter() - t:.0f} s; peak RSS {peak:.2f} GB "
          f"(fit's own peak above the data: {peak - base:.2f} GB)")
    print(f"authors' dense float32 preload of the expression alone: {dense:.1f} GB")
    print(f"peak_rss_gb={peak:.2f} dense_preload_gb={dense:.1f}")


if __name__ == "__main__":
    main()
