"""Projection heads: one head as in BLEEP/SPADE, and all experts' heads stacked for batched training.

A head maps ``x`` to ``LayerNorm(Dropout(fc(GELU(p))) + p)`` with ``p = projection(x)``.
:class:`StackedHeads` holds ``n_experts`` such heads as single tensors of shape ``[n_experts, ...]``, so a
forward pass of every expert on its own minibatch is three batched matrix products.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["ProjectionHead", "StackedHeads", "ExpertPairs"]


def _dropout(x: torch.Tensor, p: float, training: bool, generator: torch.Generator | None) -> torch.Tensor:
    if not training or p == 0:
        return x
    if generator is None:
        return F.dropout(x, p, True)
    keep = torch.rand(x.shape, generator=generator, device=x.device) >= p
    return x * keep / (1 - p)


class ProjectionHead(nn.Module):
    """One projection head, with the parameter names of the authors' code (``projection``, ``fc``, ``layer_norm``)."""

    def __init__(self, in_dim: int, proj_dim: int = 256, dropout: float = 0.1):
        super().__init__()
        self.projection = nn.Linear(in_dim, proj_dim)
        self.gelu = nn.GELU()
        self.fc = nn.Linear(proj_dim, proj_dim)
        self.dropout = nn.Dropout(dropout)
        self.layer_norm = nn.LayerNorm(proj_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        projected = self.projection(x)
        x = self.dropout(self.fc(self.gelu(projected)))
        return self.layer_norm(x + projected)


class StackedHeads(nn.Module):
    """``n_experts`` projection heads stored as stacked tensors.

    Weights are stored input-major (``[E, in, out]``) so the forward pass is ``baddbmm``.

    Parameters
    ----------
    n_experts
        Number of heads.
    in_dim, proj_dim
        Input and output sizes.
    dropout
        Dropout probability after the second linear layer.
    generator
        Torch generator for the initialisation (PyTorch's default ``nn.Linear`` init, per expert).
    """

    def __init__(
        self, n_experts: int, in_dim: int, proj_dim: int, dropout: float = 0.1, generator: torch.Generator | None = None
    ):
        super().__init__()
        self.n_experts, self.in_dim, self.proj_dim, self.dropout = n_experts, in_dim, proj_dim, float(dropout)
        self.w1 = nn.Parameter(torch.empty(n_experts, in_dim, proj_dim))
        self.b1 = nn.Parameter(torch.empty(n_experts, proj_dim))
        self.w2 = nn.Parameter(torch.empty(n_experts, proj_dim, proj_dim))
        self.b2 = nn.Parameter(torch.empty(n_experts, proj_dim))
        self.ln_weight = nn.Parameter(torch.ones(n_experts, proj_dim))
        self.ln_bias = nn.Parameter(torch.zeros(n_experts, proj_dim))
        self.reset_parameters(generator)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Uniform(±1/sqrt(fan_in)) for weights and biases, as ``nn.Linear`` does."""
        for w, b, fan_in in ((self.w1, self.b1, self.in_dim), (self.w2, self.b2, self.proj_dim)):
            bound = 1.0 / math.sqrt(fan_in)
            w.uniform_(-bound, bound, generator=generator)
            b.uniform_(-bound, bound, generator=generator)
        self.ln_weight.fill_(1.0)
        self.ln_bias.zero_()

    def forward(
        self, x: torch.Tensor, experts: torch.Tensor | None = None, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Apply the heads.

        Parameters
        ----------
        x
            ``[E', B, in]`` inputs, one minibatch per selected expert.
        experts
            Indices (length ``E'``) of the experts to apply; all experts when ``None``.
        generator
            Generator for the dropout masks in training mode (reproducible without global seeding).

        Returns
        -------
        ``[E', B, proj_dim]`` embeddings.
        """
        w1, b1, w2, b2, g, beta = self.w1, self.b1, self.w2, self.b2, self.ln_weight, self.ln_bias
        if experts is not None:
            w1, b1, w2, b2, g, beta = (t[experts] for t in (w1, b1, w2, b2, g, beta))
        projected = torch.baddbmm(b1.unsqueeze(1), x, w1)
        h = torch.baddbmm(b2.unsqueeze(1), F.gelu(projected), w2)
        h = _dropout(h, self.dropout, self.training, generator) + projected
        h = F.layer_norm(h, (self.proj_dim,))
        return h * g.unsqueeze(1) + beta.unsqueeze(1)

    def forward_expert(self, x: torch.Tensor, expert: int) -> torch.Tensor:
        """Apply one expert's head to ``x`` of shape ``[N, in]`` (inference helper)."""
        projected = torch.addmm(self.b1[expert], x, self.w1[expert])
        h = torch.addmm(self.b2[expert], F.gelu(projected), self.w2[expert])
        h = F.dropout(h, self.dropout, self.training) + projected
        return F.layer_norm(h, (self.proj_dim,), self.ln_weight[expert], self.ln_bias[expert])

    # ------------------------------------------------------------------ conversion to / from single heads
    @torch.no_grad()
    def load_single(self, expert: int, head: ProjectionHead | dict) -> None:
        """Copy one :class:`ProjectionHead` (or its ``state_dict``) into slot ``expert``."""
        sd = head.state_dict() if isinstance(head, nn.Module) else head
        self.w1[expert].copy_(sd["projection.weight"].T)
        self.b1[expert].copy_(sd["projection.bias"])
        self.w2[expert].copy_(sd["fc.weight"].T)
        self.b2[expert].copy_(sd["fc.bias"])
        self.ln_weight[expert].copy_(sd["layer_norm.weight"])
        self.ln_bias[expert].copy_(sd["layer_norm.bias"])

    @torch.no_grad()
    def to_single(self, expert: int) -> ProjectionHead:
        """Return slot ``expert`` as a standalone :class:`ProjectionHead`."""
        head = ProjectionHead(self.in_dim, self.proj_dim, self.dropout)
        head.projection.weight.copy_(self.w1[expert].T)
        head.projection.bias.copy_(self.b1[expert])
        head.fc.weight.copy_(self.w2[expert].T)
        head.fc.bias.copy_(self.b2[expert])
        head.layer_norm.weight.copy_(self.ln_weight[expert])
        head.layer_norm.bias.copy_(self.ln_bias[expert])
        return head


class ExpertPairs(nn.Module):
    """The image and expression heads of every expert."""

    def __init__(
        self,
        n_experts: int,
        image_dim: int,
        expr_dim: int,
        proj_dim: int = 256,
        dropout: float = 0.1,
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        self.image = StackedHeads(n_experts, image_dim, proj_dim, dropout, generator)
        self.expression = StackedHeads(n_experts, expr_dim, proj_dim, dropout, generator)

    @property
    def n_experts(self) -> int:
        return self.image.n_experts
