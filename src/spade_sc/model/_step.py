"""The training step's hot path: minibatch building (with prefetch), the heads on sparse input, fused AdamW.

What makes a step fast (see ``docs/performance.md``):

- **No parameter gathering when the active experts are contiguous.** Experts are numbered by size (largest
  first), so at step ``s`` the experts that still have a minibatch are a prefix ``0..k-1``: the step works on
  views ``w[:k]`` of the stacked parameters (no copy, no full-size gradient). Other sets (early stopping)
  gather a copy for the forward pass; the update always goes straight into the stacked tensors.
- **Sparse expression input.** With CSR counts the minibatch stays CSR; the first expression layer
  ``x @ W1[e]`` and its weight gradient ``x_eᵀ @ dOut_e`` are computed over the non-zeros only
  (:mod:`._kernels`), ≈ ``1/density`` fewer FLOPs than the dense product. On CUDA the CSR minibatch is moved
  to the device (small) and densified there.
- **Fused AdamW.** One pass over parameters, gradients and moments (``torch._fused_adamw_``), per expert
  with its own step count and learning rate, instead of ~8 passes of separate tensor ops.
- **Prefetch.** The next step's inputs are built in a background thread while the current step runs (the
  kernels release the GIL).

The arithmetic is exactly :class:`~._heads.StackedHeads` / :class:`~._optim.StackedAdamW`'s, up to float
summation order.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as F

from ._heads import _dropout

__all__ = ["SparseRows", "BatchBuilder", "head_forward", "select_params", "adamw_step", "prefetch"]


@dataclass
class SparseRows:
    """A CSR minibatch of ``n_experts · rows_per_expert`` rows (``rows_per_expert`` rows per expert)."""

    indptr: np.ndarray
    indices: np.ndarray
    data: np.ndarray
    n_cols: int
    rows_per_expert: int
    #: if True, backward keeps the output gradient in ``grad_out`` and leaves the weight gradient to
    #: :func:`adamw_step` (fused with the update, never stored at full size)
    defer_wgrad: bool = False
    grad_out: np.ndarray | None = None
    _columns: tuple | None = None

    def columns(self) -> tuple:
        """Column-major copy of each expert's rows (:func:`._kernels.expert_columns`), built once and kept."""
        if self._columns is None:
            from ._kernels import expert_columns

            self._columns = expert_columns(self.indptr, self.indices, self.data, self.rows_per_expert, self.n_cols)
        return self._columns

    @property
    def n_experts(self) -> int:
        return (len(self.indptr) - 1) // self.rows_per_expert

    def to_dense(self, device: torch.device) -> torch.Tensor:
        """Dense ``[E, B, n_cols]`` on ``device`` (scattered there: only the non-zeros travel)."""
        n = len(self.indptr) - 1
        if device.type == "cpu":
            from ._kernels import densify

            out = torch.from_numpy(densify(self.indptr, self.indices, self.data, self.n_cols))
        else:
            counts = torch.from_numpy(np.diff(self.indptr)).to(device, non_blocking=True)
            rows = torch.repeat_interleave(torch.arange(n, device=device), counts)
            cols = torch.from_numpy(self.indices.astype(np.int64)).to(device, non_blocking=True)
            vals = torch.from_numpy(self.data).to(device, non_blocking=True)
            out = torch.zeros(n, self.n_cols, device=device)
            out[rows, cols] = vals
        return out.view(self.n_experts, self.rows_per_expert, self.n_cols)


class _SparseFirstLayer(torch.autograd.Function):
    """``out[e, i] = x[e·B + i] @ w[e]`` for a CSR ``x``; gradient for ``w`` only."""

    @staticmethod
    def forward(ctx, w: torch.Tensor, x: SparseRows) -> torch.Tensor:
        from ._kernels import stacked_spmm

        ctx.x = x
        ctx.n_cols = w.shape[1]
        out = stacked_spmm(x.indptr, x.indices, x.data, w.detach().contiguous().numpy(), x.rows_per_expert,
                           columns=x.columns())
        return torch.from_numpy(out).view(x.n_experts, x.rows_per_expert, -1)

    @staticmethod
    def backward(ctx, dout: torch.Tensor):
        from ._kernels import stacked_spmm_wgrad

        if not ctx.needs_input_grad[0]:
            return None, None
        x = ctx.x
        d = dout.contiguous().view(-1, dout.shape[-1]).numpy()
        if x.defer_wgrad:
            x.grad_out = d
            return None, None
        dw = stacked_spmm_wgrad(x.indptr, x.indices, x.data, d, x.rows_per_expert, ctx.n_cols)
        return torch.from_numpy(dw), None


def _dropout_rows(h, p: float, training: bool, generator, n_global: int | None, local) -> torch.Tensor:
    """Dropout with the mask drawn for ``n_global`` experts (as one process would) and rows ``local`` kept."""
    if not training or p == 0:
        return h
    if generator is None or n_global is None or local is None:
        return _dropout(h, p, training, generator)
    keep = torch.rand((n_global, *h.shape[1:]), generator=generator, device=h.device) >= p
    keep = keep[torch.from_numpy(np.asarray(local, dtype=np.int64)).to(h.device)]
    return h * keep / (1 - p)


def head_forward(x, p: dict, *, dropout: float, training: bool, generator: torch.Generator | None,
                 n_global: int | None = None, local=None) -> torch.Tensor:
    """:meth:`StackedHeads.forward` with explicit parameters ``p`` (``w1 b1 w2 b2 ln_weight ln_bias``).

    ``x`` is a dense ``[E, B, in]`` tensor or a :class:`SparseRows` (CPU). ``n_global``/``local``: see
    :func:`_dropout_rows` (multi-process training).
    """
    b1 = p["b1"].unsqueeze(1)
    if isinstance(x, SparseRows):
        projected = _SparseFirstLayer.apply(p["w1"], x) + b1
    else:
        projected = torch.baddbmm(b1, x, p["w1"])
    h = torch.baddbmm(p["b2"].unsqueeze(1), F.gelu(projected), p["w2"])
    h = _dropout_rows(h, dropout, training, generator, n_global, local) + projected
    h = F.layer_norm(h, (h.shape[-1],))
    return h * p["ln_weight"].unsqueeze(1) + p["ln_bias"].unsqueeze(1)


_NAMES = ("w1", "b1", "w2", "b2", "ln_weight", "ln_bias")


def select_params(heads, act: np.ndarray, *, requires_grad: bool) -> dict:
    """Parameters of experts ``act`` of a :class:`StackedHeads`: views for a contiguous range, else copies.

    The returned tensors are autograd leaves (when ``requires_grad``) detached from the module's parameters.
    """
    n = heads.n_experts
    if len(act) == n:
        sel = slice(None)
    elif len(act) and act[-1] - act[0] + 1 == len(act):
        sel = slice(int(act[0]), int(act[-1]) + 1)
    else:
        sel = torch.from_numpy(np.asarray(act, dtype=np.int64)).to(heads.w1.device)
    out = {}
    for name in _NAMES:
        t = getattr(heads, name).detach()[sel]
        out[name] = t.requires_grad_(True) if requires_grad else t
    return out


def _has_fused_adamw() -> bool:
    return hasattr(torch, "_fused_adamw_")


@torch.no_grad()
def adamw_step(opt, params: list[torch.Tensor], grads: list, act: np.ndarray, lr: torch.Tensor,
               deferred: dict | None = None) -> None:
    """Update experts ``act`` of the stacked ``params`` with ``grads`` (``[len(act), ...]`` each).

    Same update as :meth:`StackedAdamW.step` (AdamW, each expert with its own step count and ``lr[e]``),
    written into ``params`` and ``opt``'s moments in place. ``deferred`` maps the position of a parameter
    whose gradient was left to this step (``grads[i] is None``) to the :class:`SparseRows` input of its
    first layer: its gradient is built expert by expert and applied at once (:func:`sparse_wgrad_adamw`).
    """
    act = np.asarray(act, dtype=np.int64)
    act_t = torch.from_numpy(act)
    opt.steps[act_t] += 1
    state = {id(p): (m, v) for p, m, v in zip(opt.params, opt.exp_avg, opt.exp_avg_sq, strict=True)}
    for i, x in (deferred or {}).items():
        from ._kernels import sparse_wgrad_adamw

        t = opt.steps[act_t].double().numpy()
        lr_a = lr.double()[act_t].numpy()
        m, v = state[id(params[i])]
        sparse_wgrad_adamw(x.indptr, x.indices, x.data, x.grad_out, x.rows_per_expert, act,
                           params[i].detach().numpy(), m.numpy(), v.numpy(), lr_a, 1 - opt.beta1**t,
                           np.sqrt(1 - opt.beta2**t), beta1=opt.beta1, beta2=opt.beta2,
                           weight_decay=opt.weight_decay, eps=opt.eps, columns=x.columns())
        x.grad_out = None
    keep = [i for i in range(len(params)) if grads[i] is not None]
    params, grads = [params[i] for i in keep], [grads[i] for i in keep]
    fused = _has_fused_adamw() and params[0].device.type in ("cpu", "cuda")
    for j, e in enumerate(act.tolist()):
        ps = [p.detach()[e] for p in params]
        gs = [g[j] for g in grads]
        ms = [state[id(p)][0][e] for p in params]
        vs = [state[id(p)][1][e] for p in params]
        t = int(opt.steps[e])
        lr_e = float(lr[e])
        if fused:
            steps = [torch.tensor(float(t), device=ps[0].device) for _ in ps]
            torch._fused_adamw_(ps, gs, ms, vs, [], steps, lr=lr_e, beta1=opt.beta1, beta2=opt.beta2,
                                weight_decay=opt.weight_decay, eps=opt.eps, amsgrad=False, maximize=False)
            continue
        bc1 = 1 - opt.beta1**t
        bc2_sqrt = (1 - opt.beta2**t) ** 0.5
        for p, g, m, v in zip(ps, gs, ms, vs, strict=True):
            p.mul_(1 - lr_e * opt.weight_decay)
            m.lerp_(g, 1 - opt.beta1)
            v.mul_(opt.beta2).addcmul_(g, g, value=1 - opt.beta2)
            p.addcdiv_(m, (v.sqrt() / bc2_sqrt).add_(opt.eps), value=-lr_e / bc1)


class BatchBuilder:
    """Builds one step's inputs: features ``[E, B, D]`` float32 and expression (dense or :class:`SparseRows`).

    Features held in memory as a NumPy array are put on the device once; any other array-like (memmap, zarr,
    h5py, dask) is read per minibatch (out of core).
    """

    def __init__(self, feats, expr, device: torch.device, *, sparse: bool | None = None):
        self.device = device
        self.expr = expr
        # in-memory (writable) arrays go to the device once; memmaps opened read-only, zarr, h5py, dask: per batch
        in_memory = isinstance(feats, torch.Tensor) or (type(feats) is np.ndarray and feats.flags.writeable)
        self.feats_t = torch.as_tensor(np.ascontiguousarray(feats)).to(device) if in_memory else None
        self.feats = feats
        if sparse is None:
            sparse = expr.prefers_sparse()
        self.sparse = bool(sparse) and expr.is_sparse

    def features(self, flat: np.ndarray) -> torch.Tensor:
        if self.feats_t is not None:
            return self.feats_t[torch.from_numpy(flat).to(self.device)].float()
        from ._data import take_rows

        return torch.from_numpy(np.asarray(take_rows(self.feats, flat), dtype=np.float32)).to(self.device)

    def __call__(self, idx: np.ndarray, mask: np.ndarray):
        e, b = idx.shape
        flat = idx.reshape(-1)
        x_img = self.features(flat).view(e, b, -1)
        if self.sparse:
            rows = np.where(mask.reshape(-1), flat, -1)
            indptr, indices, data = self.expr.sparse_rows(rows)
            x_expr = SparseRows(indptr, indices, data, self.expr.n_genes, b)
            if self.device.type != "cpu":
                x_expr = x_expr.to_dense(self.device)
            else:
                x_expr.columns()  # built here, in the prefetch thread, for the step's forward and update
        else:
            x_expr = self.expr.batch(flat, self.device).view(e, b, -1)
        m = torch.from_numpy(mask).to(self.device)
        return x_img, x_expr, m


def prefetch(fn, items, *, enabled: bool = True):
    """Yield ``(item, fn(item))`` with ``fn`` of the next item computed in a background thread."""
    items = list(items)
    if not enabled or len(items) < 2:
        for it in items:
            yield it, fn(it)
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="spade-prefetch") as ex:
        fut = ex.submit(fn, items[0])
        for i, it in enumerate(items):
            res = fut.result()
            if i + 1 < len(items):
                fut = ex.submit(fn, items[i + 1])
            yield it, res
