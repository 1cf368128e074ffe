"""Expression and feature inputs for training: sparse counts stay sparse until a minibatch is built."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch

__all__ = ["ExpressionSource", "size_factors", "panel_values", "expert_batches", "take_rows"]

TARGET_SUM = 1e4


def _is_lazy(x) -> bool:
    """True for array-likes read on demand (zarr, h5py, dask, anndata backed datasets), not for NumPy/memmap."""
    return not (isinstance(x, np.ndarray) or sp.issparse(x))


def take_rows(x, idx: np.ndarray):
    """``x[idx]`` for NumPy/memmap arrays, SciPy sparse matrices, zarr and h5py arrays, dask arrays and
    AnnData backed (sparse) datasets; out-of-core stores are read in sorted order, only the rows asked for."""
    idx = np.asarray(idx, dtype=np.int64)
    if not _is_lazy(x):
        return x[idx]
    uniq, inv = np.unique(idx, return_inverse=True)
    if hasattr(x, "oindex"):  # zarr
        block = x.oindex[uniq, :] if len(getattr(x, "shape", ())) > 1 else x.oindex[uniq]
    else:  # h5py (increasing indices), anndata backed datasets, dask
        block = x[uniq]
        if hasattr(block, "compute"):
            block = block.compute()
    if sp.issparse(block):
        return sp.csr_matrix(block)[inv]
    return np.asarray(block)[inv]


def _row_totals(x, chunk: int = 65536) -> np.ndarray:
    """Float64 row sums without a converted copy of the matrix (CSR: over ``data``; others: in row chunks)."""
    if sp.issparse(x) and x.format == "csr":
        indptr, data = np.asarray(x.indptr), np.asarray(x.data)
        out = np.zeros(x.shape[0], dtype=np.float64)
        for s in range(0, x.shape[0], chunk):  # chunks: reduceat casts its input to float64 in one piece
            e = min(s + chunk, x.shape[0])
            ptr = indptr[s : e + 1]
            nonempty = np.flatnonzero(ptr[:-1] < ptr[1:])
            if len(nonempty):
                out[s + nonempty] = np.add.reduceat(data[ptr[0] : ptr[-1]], ptr[nonempty] - ptr[0], dtype=np.float64)
        return out
    if isinstance(x, np.ndarray) or sp.issparse(x):
        return np.asarray(x.sum(axis=1, dtype=np.float64)).ravel()
    out = np.empty(x.shape[0], dtype=np.float64)
    for s in range(0, x.shape[0], chunk):
        block = x[s : s + chunk]
        if hasattr(block, "compute"):
            block = block.compute()
        out[s : s + chunk] = np.asarray(block.sum(axis=1, dtype=np.float64)).ravel()
    return out


def _size_factors64(x, target_sum: float) -> np.ndarray:
    totals = _row_totals(x)
    with np.errstate(divide="ignore"):
        return np.where(totals > 0, target_sum / totals, 0.0)


def size_factors(x, target_sum: float = TARGET_SUM) -> np.ndarray:
    """``target_sum / total counts`` of each row (over all genes), 0 for empty rows."""
    return _size_factors64(x, target_sum).astype(np.float32)


def panel_values(x, col_idx: np.ndarray, *, target_sum: float | None = TARGET_SUM, log1p: bool = True) -> np.ndarray:
    """Dense float64 ``[n_obs, len(col_idx)]`` of selected genes, the one place spot-level normalisation lives.

    ``target_sum`` scales each row to that many counts (totals over *all* genes; ``None``: no scaling), then
    ``log1p`` when asked: ``target_sum=1e4, log1p=True`` is scanpy's ``normalize_total`` + ``log1p`` (SPADE's
    scale); ``target_sum=None, log1p=False`` returns the values as they are.
    """
    col_idx = np.asarray(col_idx)
    if sp.issparse(x):
        sub = sp.csr_matrix(x)[:, col_idx].toarray().astype(np.float64)
    else:
        sub = np.asarray(x)[:, col_idx].astype(np.float64)
    if target_sum is not None:
        sub *= _size_factors64(x, target_sum)[:, None]
    return np.log1p(sub) if log1p else sub


class ExpressionSource:
    """Rows of a gene panel, built into minibatches on demand; the matrix itself is never copied.

    Parameters
    ----------
    x
        ``n × n_genes_total`` counts: CSR/CSC or dense in memory, a NumPy memmap, a SciPy CSR whose arrays are
        memmaps, or an out-of-core array (zarr, h5py, dask, AnnData backed dataset) read per minibatch.
    gene_idx
        Column indices of the panel.
    normalize
        If True, ``log1p(counts * target_sum / total)`` with totals over all genes (scanpy's
        ``normalize_total(target_sum=1e4)`` + ``log1p``, computed per minibatch). If False, values as they are.
    """

    def __init__(self, x, gene_idx: np.ndarray, *, normalize: bool = True, target_sum: float = TARGET_SUM):
        self.normalize = normalize
        if sp.issparse(x) and x.format != "csr":
            x = x.tocsr()  # CSC or COO: one CSR copy (row access needs it)
        self.x = x
        self.scale = size_factors(x, target_sum) if normalize else None
        gene_idx = np.asarray(gene_idx, dtype=np.int64)
        self.gene_idx = gene_idx
        self.n_genes = len(gene_idx)
        self.all_genes = self.n_genes == x.shape[1] and bool((gene_idx == np.arange(x.shape[1])).all())
        self.col_map = np.full(x.shape[1], -1, dtype=np.int32)
        self.col_map[gene_idx] = np.arange(self.n_genes, dtype=np.int32)
        self.is_sparse = sp.issparse(x) or "csr" in str(getattr(x, "format", "")).lower()

    def __len__(self) -> int:
        return self.x.shape[0]

    @property
    def density(self) -> float:
        """Fraction of non-zero values of the whole matrix (1 for dense inputs)."""
        if sp.issparse(self.x):
            return self.x.nnz / max(1, self.x.shape[0] * self.x.shape[1])
        return 1.0

    def prefers_sparse(self) -> bool:
        """Whether sparse minibatches pay off: CSR input, ≥ 512 panel genes, ≤ 25 % non-zero."""
        return self.is_sparse and self.n_genes >= 512 and self.density <= 0.25

    def rows(self, idx: np.ndarray) -> np.ndarray:
        """Dense float32 ``[len(idx), n_genes]`` of the raw panel values."""
        out = take_rows(self.x, idx)
        if not self.all_genes:
            out = out[:, self.gene_idx]
        out = out.toarray() if sp.issparse(out) else np.asarray(out)
        return out.astype(np.float32, copy=False)

    def sparse_rows(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """CSR ``(indptr, indices, data)`` of rows ``rows`` (``-1``: empty row), normalised when ``normalize``."""
        from ._kernels import gather_rows

        rows = np.asarray(rows, dtype=np.int64)
        scale = self.scale
        if sp.issparse(self.x):
            x, local = self.x, rows
        else:  # out-of-core sparse dataset: read the rows asked for, then gather from that block
            valid = rows >= 0
            uniq, inv = np.unique(rows[valid], return_inverse=True)
            x = sp.csr_matrix(take_rows(self.x, uniq))
            local = np.full(len(rows), -1, dtype=np.int64)
            local[valid] = inv
            scale = None if scale is None else scale[uniq]
        return gather_rows(np.asarray(x.indptr), np.asarray(x.indices), np.asarray(x.data), local, self.col_map,
                           scale)

    def transform(self, dense: torch.Tensor, idx: np.ndarray) -> torch.Tensor:
        """Apply the normalisation to a minibatch already on its device."""
        if not self.normalize:
            return dense
        f = torch.from_numpy(self.scale[idx]).to(dense.device, non_blocking=True)
        return torch.log1p(dense * f.view(-1, *([1] * (dense.dim() - 1))))

    def batch(self, idx: np.ndarray, device: torch.device) -> torch.Tensor:
        """``rows`` + ``transform`` in one call, returned on ``device``."""
        t = torch.from_numpy(self.rows(idx))
        if device.type == "cuda":
            t = t.pin_memory().to(device, non_blocking=True)
        return self.transform(t, idx)


def expert_batches(
    spots_per_expert: list[np.ndarray], batch_size: int, rng: np.random.Generator, shuffle: bool = True
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One epoch's minibatches of every expert, aligned step by step.

    Returns
    -------
    idx
        ``[n_steps, E, batch_size]`` spot indices (padding repeats index 0).
    mask
        ``[n_steps, E, batch_size]`` True for real spots.
    active
        ``[n_steps, E]`` True where the expert has a minibatch at that step.
    """
    n_experts = len(spots_per_expert)
    n_batches = [-(-len(s) // batch_size) for s in spots_per_expert]
    n_steps = max(n_batches) if n_batches else 0
    idx = np.zeros((n_steps, n_experts, batch_size), dtype=np.int64)
    mask = np.zeros((n_steps, n_experts, batch_size), dtype=bool)
    for e, spots in enumerate(spots_per_expert):
        order = rng.permutation(spots) if shuffle else np.asarray(spots)
        for b in range(n_batches[e]):
            chunk = order[b * batch_size : (b + 1) * batch_size]
            idx[b, e, : len(chunk)] = chunk
            mask[b, e, : len(chunk)] = True
    return idx, mask, mask.any(2)
