"""Soft routing of spots to experts, as SPADE does at inference.

``w_k = softmax_k(-d_k / (s * tau))`` over all stage-1 centroids ``k`` (``d_k`` Euclidean distance of the
spot's features to centroid ``k``), then summed over the centroids of each expert.

``s`` (``distance_scale``) makes ``tau`` mean the same on any encoder: it is the median distance of the
training spots to their nearest centroid, fixed at fit time. ``tau=0.1`` then means that a centroid one
tenth of a typical spot-to-prototype distance farther away than another gets ``e^-1`` of its weight.
Models imported from the authors' checkpoints use ``s = 1`` (raw distances, as in their code).
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["routing_weights", "sparsify_weights"]


def routing_weights(
    x: torch.Tensor,
    centroids: torch.Tensor,
    centroid_to_expert: torch.Tensor,
    n_experts: int,
    tau: float,
    distance_scale: float = 1.0,
) -> torch.Tensor:
    """``[n, n_experts]`` routing weights (rows sum to 1) for features ``x`` ``[n, D]``."""
    x = x.float()
    c = centroids.float()
    d2 = (x * x).sum(1, keepdim=True) - 2 * x @ c.T + (c * c).sum(1)[None]
    d = d2.clamp_min(0).sqrt()
    p = torch.softmax(-d / (distance_scale * tau), dim=1)
    w = torch.zeros(x.shape[0], n_experts, dtype=p.dtype, device=p.device)
    w.index_add_(1, centroid_to_expert.to(p.device), p)
    return w


def sparsify_weights(w: torch.Tensor, eps: float) -> torch.Tensor:
    """Zero the weights below ``eps`` and renormalise rows (the top expert is always kept).

    For unit-norm-bounded expert outputs ``||e_k|| <= R``, the error of the embedding is at most
    ``2 R · m`` where ``m`` is the dropped mass of that row (``m < (n_experts - 1) · eps``).
    """
    if eps <= 0:
        return w
    keep = w >= eps
    keep[torch.arange(w.shape[0], device=w.device), w.argmax(1)] = True
    w = torch.where(keep, w, torch.zeros_like(w))
    return w / w.sum(1, keepdim=True)


def numpy_routing(x, centroids, centroid_to_expert, n_experts, tau, distance_scale=1.0) -> np.ndarray:
    """Reference NumPy implementation of the routing formula (float64), for tests and checks."""
    x = np.asarray(x, dtype=np.float64)
    c = np.asarray(centroids, dtype=np.float64)
    d = np.sqrt(np.maximum(((x[:, None, :] - c[None]) ** 2).sum(-1), 0))
    z = -d / (distance_scale * tau)
    z -= z.max(1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(1, keepdims=True)
    w = np.zeros((len(x), n_experts))
    for k, e in enumerate(np.asarray(centroid_to_expert)):
        w[:, e] += p[:, k]
    return w
