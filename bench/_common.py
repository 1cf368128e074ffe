"""Shared helpers of the benchmarks: HEST-shaped synthetic data, GEMM rate, peak RSS, timing.

Every figure a benchmark prints is a ratio of two things measured in the same run (the machine is shared
and noisy). Run a benchmark as ``python bench/<name>.py [--quick] [--device cuda]``.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time

import numpy as np
import scipy.sparse as sp

# HEST-1k shaped defaults (UNI features, SPADE's gene panel, 16 experts)
FEATURE_DIM = 1024
N_GENES = 7968
N_EXPERTS = 16
DENSITY = 0.05


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="scaled-down run (2-core CPU, < 2 minutes)")
    p.add_argument("--device", default="cpu", help="torch device (cpu, cuda)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    return p


def setup_torch(args) -> None:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import spade_sc as ss

    ss.settings.progress_bar = False


def synthetic_counts(
    n: int, n_genes: int = N_GENES, density: float = DENSITY, *, seed: int = 0, chunk: int = 16_384,
    dtype=np.float32,
) -> sp.csr_matrix:
    """CSR counts ``n × n_genes`` with about ``density`` non-zeros per row, built without a dense intermediate.

    Genes have log-normal rates (some highly expressed), counts are ``1 + Poisson(1.5)``; ``int32`` indices.
    The arrays are filled in place (peak memory ≈ the final matrix + one chunk).
    """
    rng = np.random.default_rng(seed)
    k = max(1, int(round(density * n_genes)))
    gene_p = rng.lognormal(0, 1, n_genes)
    cdf = np.cumsum(gene_p / gene_p.sum())
    indptr = np.zeros(n + 1, dtype=np.int64)
    indices = np.empty(n * k, dtype=np.int32)
    data = np.empty(n * k, dtype=dtype)
    nnz = 0
    for s in range(0, n, chunk):
        m = min(chunk, n - s)
        # draw k genes per row from the gene distribution (sorted, duplicates removed)
        idx = np.minimum(np.searchsorted(cdf, rng.random((m, k)) * cdf[-1]), n_genes - 1).astype(np.int32)
        idx.sort(axis=1)
        keep = np.ones_like(idx, dtype=bool)
        keep[:, 1:] = idx[:, 1:] != idx[:, :-1]
        counts = keep.sum(1)
        c = int(counts.sum())
        indices[nnz : nnz + c] = idx[keep]
        data[nnz : nnz + c] = 1 + rng.poisson(1.5, c)
        indptr[s + 1 : s + m + 1] = nnz + np.cumsum(counts)
        nnz += c
    indices.resize(nnz, refcheck=False)  # shrink in place
    data.resize(nnz, refcheck=False)
    if nnz < 2**31:
        indptr = indptr.astype(np.int32)
    return sp.csr_matrix((data, indices, indptr), shape=(n, n_genes), copy=False)


def synthetic_features(
    n: int, dim: int = FEATURE_DIM, n_clusters: int = 64, *, seed: int = 0, dtype=np.float32, chunk: int = 16_384
) -> np.ndarray:
    """``n × dim`` features in ``n_clusters`` well separated blobs of unequal sizes (filled in chunks)."""
    rng = np.random.default_rng(seed + 1)
    centers = rng.normal(0, 1.0, (n_clusters, dim)).astype(np.float32)
    sizes = rng.dirichlet(np.full(n_clusters, 5.0))
    out = np.empty((n, dim), dtype=dtype)
    for s in range(0, n, chunk):
        m = min(chunk, n - s)
        lab = rng.choice(n_clusters, m, p=sizes)
        out[s : s + m] = centers[lab] + rng.standard_normal((m, dim), dtype=np.float32) * 0.5
    return out


def synthetic_adata(n: int, *, n_genes: int = N_GENES, dim: int = FEATURE_DIM, density: float = DENSITY,
                    n_slides: int = 8, feature_dtype=np.float32, counts_dtype=np.float32, seed: int = 0):
    """AnnData with CSR counts in ``.X``, features in ``.obsm['X_image']`` and ``.obs['slide']``."""
    import anndata as ad
    import pandas as pd

    x = synthetic_counts(n, n_genes, density, seed=seed, dtype=counts_dtype)
    obs = pd.DataFrame({"slide": pd.Categorical([f"s{i % n_slides}" for i in range(n)])},
                       index=pd.RangeIndex(n).astype(str))
    a = ad.AnnData(X=x, obs=obs, var=pd.DataFrame(index=[f"g{i}" for i in range(n_genes)]))
    a.obsm["X_image"] = synthetic_features(n, dim, seed=seed, dtype=feature_dtype)
    return a


def gemm_rate(device: str = "cpu", n: int = 4096, repeats: int = 5, dtype=None) -> float:
    """Best-of-``repeats`` FLOP/s of an ``n × n × n`` matrix product (float32 unless ``dtype``)."""
    import torch

    dtype = dtype or torch.float32
    g = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
    b = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
    best = np.inf
    for _ in range(repeats + 1):
        sync(device)
        t = time.perf_counter()
        torch.mm(a, b)
        sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def sync(device) -> None:
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def peak_rss_gb() -> float:
    """Peak resident set size of this process so far, in GB (10^9 bytes)."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r * (1 if sys.platform == "darwin" else 1024) / 1e9


def best_time(fn, repeats: int = 3) -> float:
    best = np.inf
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best
