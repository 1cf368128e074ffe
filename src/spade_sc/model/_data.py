"""Expression and feature inputs for training: sparse counts stay sparse until a minibatch is built."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch

__all__ = ["ExpressionSource", "size_factors", "expert_batches"]

TARGET_SUM = 1e4


def size_factors(x, target_sum: float = TARGET_SUM) -> np.ndarray:
    """``target_sum / total counts`` of each row (over all genes), 0 for empty rows."""
    totals = np.asarray(x.sum(axis=1)).ravel().astype(np.float64)
    with np.errstate(divide="ignore"):
        f = np.where(totals > 0, target_sum / totals, 0.0)
    return f.astype(np.float32)


class ExpressionSource:
    """Rows of a gene panel, built into dense minibatches on demand.

    Parameters
    ----------
    x
        ``n × n_genes_total`` counts (CSR, CSC or dense; any array-like AnnData holds).
    gene_idx
        Column indices of the panel.
    normalize
        If True, ``log1p(counts * target_sum / total)`` with totals over all genes (scanpy's
        ``normalize_total(target_sum=1e4)`` + ``log1p``, computed per minibatch). If False, values as they are.
    """

    def __init__(self, x, gene_idx: np.ndarray, *, normalize: bool = True, target_sum: float = TARGET_SUM):
        self.normalize = normalize
        self.scale = size_factors(x, target_sum) if normalize else None
        if sp.issparse(x):
            self.x = sp.csr_matrix(x)[:, gene_idx].astype(np.float32)
            self.x.sort_indices()
        else:
            self.x = np.ascontiguousarray(np.asarray(x)[:, gene_idx], dtype=np.float32)
        self.n_genes = len(gene_idx)

    def __len__(self) -> int:
        return self.x.shape[0]

    def rows(self, idx: np.ndarray) -> np.ndarray:
        """Dense float32 ``[len(idx), n_genes]`` of the raw panel values."""
        out = self.x[idx]
        return out.toarray() if sp.issparse(out) else np.asarray(out)

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
