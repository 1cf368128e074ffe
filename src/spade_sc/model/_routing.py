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

__all__ = ["routing_weights", "sparsify_weights", "head_output_bound", "auto_routing_eps", "DEFAULT_ROUTING_ATOL"]

#: Max abs error of a sparse-routed embedding against the dense one that ``routing_eps="auto"`` guarantees.
DEFAULT_ROUTING_ATOL = 1e-4


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

    Error bound: if every expert output satisfies ``|h_e[j]| <= R`` (see :func:`head_output_bound`) and a
    row drops mass ``m`` (``m < (n_experts - 1) · eps``), the sparse embedding
    ``Σ_kept w_e h_e / (1 - m)`` differs from the dense ``Σ_e w_e h_e`` by at most
    ``(m / (1 - m)) · (1 - m) · R + m · R = 2 · m · R`` in every coordinate.
    """
    if eps <= 0:
        return w
    keep = w >= eps
    keep[torch.arange(w.shape[0], device=w.device), w.argmax(1)] = True
    w = torch.where(keep, w, torch.zeros_like(w))
    return w / w.sum(1, keepdim=True)


def head_output_bound(heads) -> float:
    """``R = max_e,j |γ_ej| · sqrt(P - 1) + |β_ej|``: a bound on every coordinate of every expert's output.

    Each head ends in a LayerNorm: ``h = γ ⊙ (z - mean(z)) / std(z) + β``. A standardised vector of length
    ``P`` has squared norm ``P`` (less with LayerNorm's ``eps``), so no coordinate exceeds ``sqrt(P - 1)``
    in absolute value; hence ``|h_j| <= |γ_j| · sqrt(P - 1) + |β_j|`` whatever the input.
    """
    g = heads.ln_weight.detach().abs().double()
    b = heads.ln_bias.detach().abs().double()
    p = g.shape[-1]
    return float((g * np.sqrt(max(p - 1, 1)) + b).max())


def auto_routing_eps(n_experts: int, bound: float, atol: float = DEFAULT_ROUTING_ATOL) -> float:
    """The largest ``eps`` whose :func:`sparsify_weights` error ``2 · (n_experts - 1) · eps · R`` is ``<= atol``."""
    if n_experts <= 1 or bound <= 0:
        return 0.0
    return float(atol / (2.0 * (n_experts - 1) * bound))


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
