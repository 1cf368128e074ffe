"""AdamW for stacked expert parameters: one step updates every active expert with its own step count and lr.

Each expert's update is exactly :class:`torch.optim.AdamW`'s (same formula, same order of operations), so
training all experts at once equals training them one after another.
"""

from __future__ import annotations

import math

import torch

__all__ = ["StackedAdamW", "cosine_lr"]


def cosine_lr(base_lr: float, step: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """Cosine annealing from ``base_lr`` to 0 over ``total`` steps (``CosineAnnealingLR`` in closed form)."""
    frac = step.double() / total.double().clamp_min(1)
    return base_lr * 0.5 * (1.0 + torch.cos(math.pi * frac.clamp(max=1.0)))


class StackedAdamW:
    """AdamW over parameters whose first dimension indexes experts.

    Parameters
    ----------
    params
        Parameters, each of shape ``[n_experts, ...]``.
    n_experts
        Size of the first dimension.
    betas, eps, weight_decay
        As :class:`torch.optim.AdamW`.
    """

    def __init__(self, params, n_experts: int, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2):
        self.params = [p for p in params if p.requires_grad]
        for p in self.params:
            if p.shape[0] != n_experts:
                raise ValueError(f"parameter of shape {tuple(p.shape)} is not stacked over {n_experts} experts")
        self.n_experts = n_experts
        self.beta1, self.beta2 = betas
        self.eps, self.weight_decay = eps, weight_decay
        self.exp_avg = [torch.zeros_like(p) for p in self.params]
        self.exp_avg_sq = [torch.zeros_like(p) for p in self.params]
        self.steps = torch.zeros(n_experts, dtype=torch.long)

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self, lr: torch.Tensor, active: torch.Tensor | None = None) -> None:
        """Update the experts in ``active`` (bool ``[E]``; all when ``None``) with per-expert ``lr`` ``[E]``."""
        if active is None:
            active = torch.ones(self.n_experts, dtype=torch.bool)
        active = active.cpu()
        self.steps += active.long()
        t = self.steps.clamp_min(1).double()
        bc1 = 1 - self.beta1**t
        bc2_sqrt = (1 - self.beta2**t).sqrt()
        lr = lr.double().cpu()
        all_active = bool(active.all())
        idx = None if all_active else active.nonzero().squeeze(1)
        for p, m, v in zip(self.params, self.exp_avg, self.exp_avg_sq, strict=True):
            if p.grad is None:
                continue
            shape = (-1,) + (1,) * (p.dim() - 1)
            decay = (1 - lr * self.weight_decay).to(p.dtype)
            step_size = (lr / bc1).to(p.dtype)
            bc2s = bc2_sqrt.to(p.dtype)
            if all_active:
                # in place, on the whole stacked tensor
                d, s, b = (x.to(p.device).view(shape) for x in (decay, step_size, bc2s))
                p.mul_(d)
                m.lerp_(p.grad, 1 - self.beta1)
                v.mul_(self.beta2).addcmul_(p.grad, p.grad, value=1 - self.beta2)
                p.addcdiv_(m * -s, (v.sqrt() / b).add_(self.eps))
            else:
                # gather the active experts, update, scatter back
                dev_idx = idx.to(p.device)
                d, s, b = (x[idx].to(p.device).view(shape) for x in (decay, step_size, bc2s))
                g = p.grad[dev_idx]
                pp = p[dev_idx].mul_(d)
                mm = m[dev_idx].lerp_(g, 1 - self.beta1)
                vv = v[dev_idx].mul_(self.beta2).addcmul_(g, g, value=1 - self.beta2)
                pp.addcdiv_(mm * -s, (vv.sqrt() / b).add_(self.eps))
                p[dev_idx] = pp
                m[dev_idx] = mm
                v[dev_idx] = vv

    def state_dict(self) -> dict[str, torch.Tensor]:
        out = {"steps": self.steps.clone()}
        for i, (m, v) in enumerate(zip(self.exp_avg, self.exp_avg_sq, strict=True)):
            out[f"exp_avg.{i}"] = m.detach().clone()
            out[f"exp_avg_sq.{i}"] = v.detach().clone()
        return out

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.steps.copy_(state["steps"])
        for i, (m, v) in enumerate(zip(self.exp_avg, self.exp_avg_sq, strict=True)):
            m.copy_(state[f"exp_avg.{i}"])
            v.copy_(state[f"exp_avg_sq.{i}"])
