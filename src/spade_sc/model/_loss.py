"""BLEEP's soft-target contrastive loss, as SPADE uses it, for every expert at once."""

from __future__ import annotations

import torch
from torch.nn import functional as F

__all__ = ["soft_clip_loss"]

_NEG = -1e9  # finite "minus infinity": keeps 0 * log-prob at masked entries equal to 0, not NaN


def soft_clip_loss(
    e_img: torch.Tensor, e_expr: torch.Tensor, temperature: float = 1.0, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-expert BLEEP loss.

    For each expert's minibatch (the ``B`` valid rows of ``[E, B, P]``)::

        logits  = e_expr @ e_img.T / T
        targets = softmax((e_img @ e_img.T + e_expr @ e_expr.T) / 2 * T, dim=-1)
        loss    = mean_i( (CE_row(logits, targets) + CE_row(logits.T, targets.T)) / 2 )

    with ``CE_row(p, t)_i = -sum_j t_ij log_softmax(p)_ij``, exactly as BLEEP's ``cross_entropy``.

    Parameters
    ----------
    e_img, e_expr
        ``[E, B, P]`` image and expression embeddings.
    temperature
        ``T``.
    mask
        ``[E, B]`` bool, ``True`` for real spots; padding rows/columns are ignored.

    Returns
    -------
    ``[E]`` loss of each expert (0 for an expert without valid spots).
    """
    e_img = e_img.float()
    e_expr = e_expr.float()
    logits = torch.bmm(e_expr, e_img.transpose(1, 2)) / temperature
    sim = (torch.bmm(e_img, e_img.transpose(1, 2)) + torch.bmm(e_expr, e_expr.transpose(1, 2))) / 2 * temperature
    if mask is not None:
        pair = mask.unsqueeze(2) & mask.unsqueeze(1)
        col = mask.unsqueeze(1).expand_as(logits)
        sim = sim.masked_fill(~col, _NEG)
        logits = logits.masked_fill(~pair, _NEG)
    targets = F.softmax(sim, dim=-1)
    if mask is not None:
        targets = targets * mask.unsqueeze(2)  # rows of padding spots carry no target mass
    spots_loss = -(targets * F.log_softmax(logits, dim=-1)).sum(-1)
    images_loss = -(targets.transpose(1, 2) * F.log_softmax(logits.transpose(1, 2), dim=-1)).sum(-1)
    per_spot = (spots_loss + images_loss) / 2
    if mask is None:
        return per_spot.mean(-1)
    m = mask.to(per_spot.dtype)
    return (per_spot * m).sum(-1) / m.sum(-1).clamp_min(1)
