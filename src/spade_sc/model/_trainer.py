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
from ._data import ExpressionSource, expert_batches
from ._heads import ExpertPairs
from ._loss import soft_clip_loss
from ._optim import StackedAdamW, cosine_lr

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


def _fmt_mean(x: np.ndarray) -> str:
    x = x[np.isfinite(x)]
    return f"{x.mean():.3f}" if len(x) else "n/a"


def _seed(random_state: int, epoch: int, salt: int) -> int:
    return int(np.random.SeedSequence([random_state, epoch, salt]).generate_state(1)[0])


class _Batcher:
    """Builds the ``[E, B, ·]`` input tensors of one step."""

    def __init__(self, feats: np.ndarray, expr: ExpressionSource, device: torch.device):
        self.device = device
        self.expr = expr
        # features live on the device once (float16 stays float16 there; cast per batch)
        self.feats = torch.from_numpy(np.ascontiguousarray(feats)).to(device)

    def __call__(self, idx: np.ndarray, experts: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        e, b = idx.shape
        flat = idx.reshape(-1)
        x_img = self.feats[torch.from_numpy(flat).to(self.device)].float().view(e, b, -1)
        x_expr = self.expr.batch(flat, self.device).view(e, b, -1)
        return x_img, x_expr


def _forward_loss(pairs, x_img, x_expr, mask, experts, temperature, generator, autocast):
    with autocast:
        e_img = pairs.image(x_img, experts, generator)
        e_expr = pairs.expression(x_expr, experts, generator)
    return soft_clip_loss(e_img, e_expr, temperature, mask)


@torch.no_grad()
def evaluate_experts(
    pairs: ExpertPairs, batcher, spots_per_expert: list[np.ndarray], batch_size: int, temperature: float, autocast
) -> np.ndarray:
    """Mean loss of each expert over fixed minibatches of its spots (NaN for an expert without spots)."""
    was_training = pairs.training
    pairs.eval()
    idx, mask, active = expert_batches(spots_per_expert, batch_size, np.random.default_rng(0), shuffle=False)
    total = np.zeros(pairs.n_experts)
    count = np.zeros(pairs.n_experts)
    for s in range(idx.shape[0]):
        act = np.flatnonzero(active[s])
        experts = None if len(act) == pairs.n_experts else torch.from_numpy(act).to(batcher.device)
        x_img, x_expr = batcher(idx[s, act], act)
        m = torch.from_numpy(mask[s, act]).to(batcher.device)
        loss = _forward_loss(pairs, x_img, x_expr, m, experts, temperature, None, autocast)
        n = mask[s, act].sum(1)
        total[act] += loss.double().cpu().numpy() * n
        count[act] += n
    pairs.train(was_training)
    with np.errstate(invalid="ignore"):
        return total / np.where(count > 0, count, np.nan)


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
    n_experts = pairs.n_experts
    bs = config.batch_size
    pairs.to(device).train()
    batcher = _Batcher(feats, expr, device)
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
    best_state = {k: v.detach().clone() for k, v in pairs.state_dict().items()}
    bad_epochs = np.zeros(n_experts, dtype=np.int64)
    stopped = np.zeros(n_experts, dtype=bool)
    rows: list[dict] = []
    start_epoch = 0

    ckpt = Path(checkpoint_dir) if checkpoint_dir is not None else None
    if ckpt is not None and ckpt.exists() and not ckpt.is_dir():
        raise NotADirectoryError(
            f"`checkpoint_dir={str(ckpt)!r}` is a file, not a directory; pass a directory (it is created if missing)."
        )
    if ckpt is not None:
        loaded = _load_checkpoint(ckpt, fingerprint)
        if loaded is not None:
            meta, state = loaded
            pairs.load_state_dict({k[6:]: v.to(device) for k, v in state.items() if k.startswith("model.")})
            best_state = {k[5:]: v.to(device) for k, v in state.items() if k.startswith("best.")}
            opt.load_state_dict({k[4:]: v.to(device) if k != "opt.steps" else v for k, v in state.items() if k.startswith("opt.")})
            opt.steps = opt.steps.cpu()
            best_loss = np.array(meta["best_loss"], dtype=np.float64)
            bad_epochs = np.array(meta["bad_epochs"], dtype=np.int64)
            stopped = np.array(meta["stopped"], dtype=bool)
            rows = meta["history"]
            start_epoch = meta["epoch"] + 1
            logger.info("resumed from checkpoint in %s at epoch %d", ckpt, start_epoch)

    bar = progress(range(start_epoch, config.max_epochs), desc="fit_spade", unit="epoch", initial=start_epoch,
                   total=config.max_epochs)
    for epoch in bar:
        if stopped.all():
            break
        rng = np.random.default_rng(_seed(config.random_state, epoch, 1))
        gen = torch.Generator(device=device)
        gen.manual_seed(_seed(config.random_state, epoch, 2))
        idx, mask, active = expert_batches(train_spots, bs, rng)
        active &= ~stopped[None]
        train_sum = np.zeros(n_experts)
        train_n = np.zeros(n_experts)
        pairs.train()
        for s in range(idx.shape[0]):
            act = np.flatnonzero(active[s])
            if len(act) == 0:
                continue
            all_on = len(act) == n_experts
            experts = None if all_on else torch.from_numpy(act).to(device)
            x_img, x_expr = batcher(idx[s, act], act)
            m = torch.from_numpy(mask[s, act]).to(device)
            loss = _forward_loss(pairs, x_img, x_expr, m, experts, config.temperature, gen, autocast)
            opt.zero_grad()
            loss.sum().backward()
            act_mask = torch.zeros(n_experts, dtype=torch.bool)
            act_mask[act] = True
            lr = cosine_lr(config.lr, opt.steps, total_steps)
            opt.step(lr, None if all_on else act_mask)
            n = mask[s, act].sum(1)
            train_sum[act] += loss.detach().double().cpu().numpy() * n
            train_n[act] += n
        with np.errstate(invalid="ignore"):
            train_loss = train_sum / np.where(train_n > 0, train_n, np.nan)
        val_loss = evaluate_experts(pairs, batcher, val_spots, bs, config.temperature, autocast)
        # model selection per expert: validation loss where the expert has validation spots, else last epoch
        with np.errstate(invalid="ignore"):
            improved = np.where(has_val, val_loss < best_loss, True) & ~stopped
        if improved.any():
            sel = torch.from_numpy(np.flatnonzero(improved)).to(device)
            with torch.no_grad():
                for k, v in pairs.state_dict().items():
                    best_state[k][sel] = v[sel]
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
            tensors.update({f"best.{k}": v for k, v in best_state.items()})
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
    pairs.load_state_dict(best_state)
    pairs.eval()
    return pd.DataFrame(rows, columns=["epoch", "expert", "train_loss", "val_loss"])
