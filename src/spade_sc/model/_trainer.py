"""Training loop: every expert's pair of heads in one optimizer step, each on a minibatch of its own spots."""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .._logging import logger
from .._utils import progress
from ._best_weights import BestWeights
from ._data import ExpressionSource, expert_batches
from ._heads import ExpertPairs
from ._loss import soft_clip_loss
from ._optim import StackedAdamW, cosine_lr
from ._step import _NAMES, BatchBuilder, SparseRows, adamw_step, head_forward, prefetch, select_params

__all__ = ["TrainConfig", "train_experts"]

_CKPT_STATE = "trainer_state.safetensors"
_CKPT_META = "trainer_state.json"  # readable copy of the state; never read back
_CKPT_KEY = "spade_sc_trainer_state"  # safetensors metadata entry holding the training state


@dataclass
class TrainConfig:
    max_epochs: int = 100
    batch_size: int = 128
    lr: float = 1e-4
    weight_decay: float = 1e-2
    temperature: float = 1.0
    patience: int | None = None
    random_state: int = 0
    precision: str = "32"  # "32" or "bf16" (CUDA only)
    sparse_input: bool | None = None  # CSR minibatches for the expression heads; None: when it pays off
    prefetch: bool = True  # build the next minibatch in a background thread


def _fmt_mean(x: np.ndarray) -> str:
    x = x[np.isfinite(x)]
    return f"{x.mean():.3f}" if len(x) else "n/a"


def _seed(random_state: int, epoch: int, salt: int) -> int:
    return int(np.random.SeedSequence([random_state, epoch, salt]).generate_state(1)[0])


def _step_seed(random_state: int, epoch: int, step: int) -> int:
    return int(np.random.SeedSequence([random_state, epoch, 2, step]).generate_state(1)[0])


def _forward_loss(pairs, x_img, x_expr, mask, act, act_global, temperature, generator, autocast, *, train: bool):
    """Per-expert loss of experts ``act`` (a subset of ``act_global``, the experts active at this step).

    Returns the loss and the parameter leaves (views of the stacked parameters, or copies) it depends on.
    Dropout masks are drawn for all of ``act_global`` (as one process would) and sliced to ``act``.
    """
    local = None if len(act) == len(act_global) else np.searchsorted(act_global, act)
    p_img = select_params(pairs.image, act, requires_grad=train)
    p_expr = select_params(pairs.expression, act, requires_grad=train)
    kw = dict(training=train, generator=generator, n_global=len(act_global), local=local)
    with autocast:
        e_img = head_forward(x_img, p_img, dropout=pairs.image.dropout, **kw)
        e_expr = head_forward(x_expr, p_expr, dropout=pairs.expression.dropout, **kw)
    return soft_clip_loss(e_img, e_expr, temperature, mask), p_img, p_expr


@torch.no_grad()
def evaluate_experts(
    pairs: ExpertPairs, builder, spots_per_expert: list[np.ndarray], batch_size: int, temperature: float, autocast,
    mine: np.ndarray | None = None, prefetch_batches: bool = True,
) -> np.ndarray:
    """Mean loss of each expert (of ``mine``) over fixed minibatches of its spots (NaN without spots)."""
    mine = np.ones(pairs.n_experts, dtype=bool) if mine is None else mine
    idx, mask, active = expert_batches(spots_per_expert, batch_size, np.random.default_rng(0), shuffle=False)
    active &= mine[None]
    total = torch.zeros(pairs.n_experts, dtype=torch.float64, device=builder.device)
    count = np.zeros(pairs.n_experts)
    steps = [s for s in range(idx.shape[0]) if active[s].any()]

    def build(s):
        act = np.flatnonzero(active[s])
        return act, builder(idx[s, act], mask[s, act])

    for s, (act, (x_img, x_expr, m)) in prefetch(build, steps, enabled=prefetch_batches):
        loss, _, _ = _forward_loss(pairs, x_img, x_expr, m, act, act, temperature, None, autocast, train=False)
        n = mask[s, act].sum(1)
        total.index_add_(0, torch.from_numpy(act).to(total.device), loss.double() * torch.from_numpy(n).to(total.device))
        count[act] += n
    with np.errstate(invalid="ignore"):
        return total.cpu().numpy() / np.where(count > 0, count, np.nan)


def _train_step(pairs, opt, inputs, act, act_global, config, total_steps, gen, autocast) -> torch.Tensor:
    x_img, x_expr, m = inputs
    deferred = None
    if isinstance(x_expr, SparseRows):  # first expression layer: gradient fused into the update
        x_expr.defer_wgrad = True
        deferred = {len(_NAMES) + _NAMES.index("w1"): x_expr}
    loss, p_img, p_expr = _forward_loss(pairs, x_img, x_expr, m, act, act_global, config.temperature, gen, autocast,
                                        train=True)
    loss.sum().backward()
    lr = cosine_lr(config.lr, opt.steps, total_steps)
    params = [getattr(pairs.image, k) for k in _NAMES] + [getattr(pairs.expression, k) for k in _NAMES]
    grads = [p_img[k].grad for k in _NAMES] + [p_expr[k].grad for k in _NAMES]
    adamw_step(opt, params, grads, act, lr, deferred)
    return loss.detach()


def _combine(comm, values: np.ndarray, mine: np.ndarray) -> np.ndarray:
    """Per-expert values computed by their owning rank, made identical on all ranks (NaN preserved)."""
    if comm is None:
        return values
    nan = np.isnan(values) & mine
    out = comm.all_reduce_numpy(np.where(mine, np.nan_to_num(values), 0.0))
    isnan = comm.all_reduce_numpy(nan.astype(np.float64)) > 0
    out[isnan] = np.nan
    return out


def _fsync(path: Path) -> None:
    """Flush a file (or directory entry) to disk; a no-op where the platform does not allow it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. directories on Windows
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _atomic_save(tensors: dict, meta: dict, directory: Path) -> None:
    """Write the checkpoint atomically: temp file, fsync, ``os.replace``.

    The checkpoint is the one safetensors file; the training state (epoch, best losses, history) lives in its
    metadata, so weights and state can never come from different epochs. ``trainer_state.json`` is a
    readable copy written afterwards and never read back. A kill at any moment leaves the previous or the new
    checkpoint, never a mix.
    """
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    text = json.dumps(meta)
    tmp = directory / (_CKPT_STATE + ".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata={_CKPT_KEY: text})
    _fsync(tmp)
    os.replace(tmp, directory / _CKPT_STATE)
    _fsync(directory)
    tmp_meta = directory / (_CKPT_META + ".tmp")
    tmp_meta.write_text(text)
    os.replace(tmp_meta, directory / _CKPT_META)


def _load_checkpoint(directory: Path, fingerprint: str):
    from safetensors import safe_open

    state_path = directory / _CKPT_STATE
    if not state_path.exists():
        return None
    try:
        with safe_open(str(state_path), framework="pt") as f:
            meta = json.loads(f.metadata()[_CKPT_KEY])
            state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    except Exception as e:  # safetensors raises its own error types; any failure means an unreadable file
        raise ValueError(
            f"`checkpoint_dir={str(directory)!r}` holds a corrupt checkpoint ({type(e).__name__}: {e}); "
            f"delete {str(state_path)!r} (or the directory) to start the fit over."
        ) from e
    if meta.get("fingerprint") != fingerprint:
        raise ValueError(
            f"`checkpoint_dir={str(directory)!r}` holds a checkpoint of a different fit (other data or settings); "
            "use an empty directory, or delete it to start over."
        )
    return meta, state


def train_experts(
    pairs: ExpertPairs,
    feats: np.ndarray,
    expr: ExpressionSource,
    train_spots: list[np.ndarray],
    val_spots: list[np.ndarray],
    config: TrainConfig,
    device: torch.device,
    *,
    checkpoint_dir: str | os.PathLike | None = None,
    fingerprint: str = "",
) -> pd.DataFrame:
    """Train all experts together; leaves each expert at its best-validation weights.

    Returns the loss history (one row per epoch and expert).
    """
    from ._distributed import current

    n_experts = pairs.n_experts
    bs = config.batch_size
    pairs.to(device).train()
    builder = BatchBuilder(feats, expr, device, sparse=config.sparse_input)
    comm = current()
    mine = np.ones(n_experts, dtype=bool) if comm is None else comm.owned_experts([len(s) for s in train_spots])
    opt = StackedAdamW(pairs.parameters(), n_experts, weight_decay=config.weight_decay)
    n_batches = torch.tensor([-(-len(s) // bs) for s in train_spots], dtype=torch.long)
    total_steps = n_batches * config.max_epochs
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if (config.precision == "bf16" and device.type == "cuda")
        else contextlib.nullcontext()
    )
    has_val = np.array([len(v) > 0 for v in val_spots])
    best_loss = np.full(n_experts, np.inf)
    # each expert's best-validation weights; without any validation spots the last epoch is the best one
    track_best = bool(has_val.any())
    best = None  # created below (after a resume: from the checkpoint's copy)
    bad_epochs = np.zeros(n_experts, dtype=np.int64)
    stopped = np.zeros(n_experts, dtype=bool)
    rows: list[dict] = []
    start_epoch = 0

    ckpt = Path(checkpoint_dir) if checkpoint_dir is not None else None
    if ckpt is not None and comm is not None:  # every rank keeps (and resumes from) its own state
        ckpt = ckpt / f"rank{comm.rank}-of-{comm.world}"
    if ckpt is not None and ckpt.exists() and not ckpt.is_dir():
        raise NotADirectoryError(
            f"`checkpoint_dir={str(ckpt)!r}` is a file, not a directory; pass a directory (it is created if missing)."
        )
    if ckpt is not None:
        loaded = _load_checkpoint(ckpt, fingerprint)
        if loaded is not None:
            meta, state = loaded
            pairs.load_state_dict({k[6:]: v.to(device) for k, v in state.items() if k.startswith("model.")})
            if track_best:
                best = BestWeights({k[5:]: v.to(device) for k, v in state.items() if k.startswith("best.")},
                                   spill=False)
            opt.load_state_dict({k[4:]: v.to(device) if k != "opt.steps" else v for k, v in state.items() if k.startswith("opt.")})
            opt.steps = opt.steps.cpu()
            best_loss = np.array(meta["best_loss"], dtype=np.float64)
            bad_epochs = np.array(meta["bad_epochs"], dtype=np.int64)
            stopped = np.array(meta["stopped"], dtype=bool)
            rows = meta["history"]
            start_epoch = meta["epoch"] + 1
            logger.info("resumed from checkpoint in %s at epoch %d", ckpt, start_epoch)
            del loaded, state  # the loaded tensors were copied into the model, optimizer and best weights

    if best is None and track_best:
        # checkpoints save the copy with the model, so it stays in memory; otherwise large models keep it on disk
        best = BestWeights(pairs.state_dict(), spill=False if ckpt is not None else None)
    bar = progress(range(start_epoch, config.max_epochs), desc="fit_spade", unit="epoch", initial=start_epoch,
                   total=config.max_epochs)
    for epoch in bar:
        if stopped.all():
            break
        rng = np.random.default_rng(_seed(config.random_state, epoch, 1))
        idx, mask, active = expert_batches(train_spots, bs, rng)
        active &= ~stopped[None]
        train_sum = torch.zeros(n_experts, dtype=torch.float64, device=device)
        train_n = np.zeros(n_experts)
        pairs.train()
        steps = [s for s in range(idx.shape[0]) if (active[s] & mine).any()]

        def build(s, idx=idx, mask=mask, active=active):
            act_global = np.flatnonzero(active[s])
            act = act_global[mine[act_global]]
            return act_global, act, builder(idx[s, act], mask[s, act])

        for s, (act_global, act, inputs) in prefetch(build, steps, enabled=config.prefetch):
            gen = torch.Generator(device=device)
            gen.manual_seed(_step_seed(config.random_state, epoch, s))
            loss = _train_step(pairs, opt, inputs, act, act_global, config, total_steps, gen, autocast)
            n = mask[s, act].sum(1)
            train_sum.index_add_(0, torch.from_numpy(act).to(device), loss.double() * torch.from_numpy(n).to(device))
            train_n[act] += n
        train_sum = train_sum.cpu().numpy()
        with np.errstate(invalid="ignore"):
            train_loss = train_sum / np.where(train_n > 0, train_n, np.nan)
        val_loss = evaluate_experts(pairs, builder, val_spots, bs, config.temperature, autocast, mine,
                                    config.prefetch)
        train_loss = _combine(comm, np.where(mine, train_loss, np.nan), mine)
        val_loss = _combine(comm, np.where(mine, val_loss, np.nan), mine)
        # model selection per expert: validation loss where the expert has validation spots, else last epoch
        with np.errstate(invalid="ignore"):
            improved = np.where(has_val, val_loss < best_loss, True) & ~stopped
        if improved.any() and best is not None:
            best.update(pairs.state_dict(), np.flatnonzero(improved))
            best_loss[improved & has_val] = val_loss[improved & has_val]
        bad_epochs = np.where(improved, 0, bad_epochs + (~stopped))
        if config.patience is not None:
            stopped |= has_val & (bad_epochs >= config.patience)
        for e in range(n_experts):
            rows.append(
                {"epoch": epoch, "expert": e, "train_loss": float(train_loss[e]), "val_loss": float(val_loss[e])}
            )
        bar.set_postfix(train=_fmt_mean(train_loss), val=_fmt_mean(val_loss))
        if ckpt is not None:
            tensors = {f"model.{k}": v for k, v in pairs.state_dict().items()}
            if best is not None:  # without validation the model itself is the best state
                tensors.update({f"best.{k}": v for k, v in best.state_dict().items()})
            tensors.update({f"opt.{k}": v for k, v in opt.state_dict().items()})
            meta = {
                "fingerprint": fingerprint,
                "epoch": epoch,
                "best_loss": [float(x) for x in best_loss],
                "bad_epochs": bad_epochs.tolist(),
                "stopped": stopped.tolist(),
                "history": rows,
            }
            _atomic_save(tensors, meta, ckpt)
    bar.close()
    if best is not None:
        best.load_into(pairs)
        best.close()
    if comm is not None:  # each expert's weights from the rank that trained it
        with torch.no_grad():
            keep = torch.from_numpy(mine).to(device)
            for v in pairs.state_dict().values():
                v.mul_(keep.view(-1, *([1] * (v.dim() - 1))).to(v.dtype))
                comm.all_reduce_sum(v)
    pairs.eval()
    return pd.DataFrame(rows, columns=["epoch", "expert", "train_loss", "val_loss"])
