"""Each expert's best-validation weights, kept in memory or, for large models, in a temporary file.

Model selection keeps, per expert, the weights of its best validation epoch. A copy in memory costs as much
as the model (157 MB for 16 experts on 7,968 genes); at HEST scale that is the difference between fitting
under 4 GB or not. :class:`BestWeights` therefore writes the selected experts' rows to a temporary file when
the stacked parameters are larger than :data:`SPILL_MIN_BYTES` (and no checkpoint needs them in memory).
Writing happens only in epochs where an expert improves, one expert row at a time, so it costs a fraction of
an epoch; reading happens once, at the end of training.
"""

from __future__ import annotations

import os
import tempfile

import numpy as np
import torch

from .._logging import logger

__all__ = ["SPILL_MIN_BYTES", "BestWeights"]

#: Stacked parameters at least this large are kept on disk rather than as a second copy in memory.
SPILL_MIN_BYTES = 64 * 2**20


class BestWeights:
    """Per-expert copy of a stacked ``state_dict`` (every tensor ``[n_experts, ...]``).

    Parameters
    ----------
    state
        The current ``state_dict``; the copy starts equal to it.
    spill
        ``True``: keep the copy in a temporary file; ``False``: in memory; ``None``: on disk when the state
        holds at least :data:`SPILL_MIN_BYTES`. If the temporary file cannot be written, the copy falls back to
        memory (logged).
    """

    def __init__(self, state: dict[str, torch.Tensor], *, spill: bool | None = None):
        nbytes = sum(v.numel() * v.element_size() for v in state.values())
        if spill is None:
            spill = nbytes >= SPILL_MIN_BYTES
        spill = spill and hasattr(os, "pwrite") and hasattr(os, "preadv")  # POSIX positional I/O
        self._mem: dict[str, torch.Tensor] | None = None
        self._file = None
        if spill:
            try:
                self._file = tempfile.TemporaryFile(prefix="spade_sc_best_")  # noqa: SIM115 - closed in close()
                self._layout = {}
                offset = 0
                for k, v in state.items():
                    row = v[0].numel() * v.element_size()
                    self._layout[k] = (offset, row, v.shape, v.dtype)
                    offset += row * v.shape[0]
                os.ftruncate(self._file.fileno(), offset)
            except OSError as e:
                logger.warning(
                    "could not create a temporary file for the best weights (%s); keeping them in memory", e
                )
                self._close()
        if self._file is None:
            self._mem = {k: v.detach().clone() for k, v in state.items()}
        else:
            self.update(state, np.arange(next(iter(state.values())).shape[0]))

    @property
    def on_disk(self) -> bool:
        return self._file is not None

    def update(self, state: dict[str, torch.Tensor], experts: np.ndarray) -> None:
        """Copy experts ``experts`` of ``state`` into the kept weights."""
        experts = np.asarray(experts, dtype=np.int64)
        with torch.no_grad():
            for k, v in state.items():
                if self._mem is not None:
                    if len(experts) == v.shape[0]:
                        self._mem[k].copy_(v)
                    else:  # expert by expert (views): no temporary copy of the selected experts
                        for e in experts:
                            self._mem[k][e].copy_(v[e])
                    continue
                offset, row, _, _ = self._layout[k]
                for e in experts:
                    _write_all(
                        self._file.fileno(), _bytes(v[e].detach().contiguous().cpu()), offset + int(e) * row
                    )

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The kept weights as tensors (read from disk when spilled: for checkpoints and tests)."""
        if self._mem is not None:
            return self._mem
        out = {}
        for k, (offset, row, shape, dtype) in self._layout.items():
            t = torch.empty(shape, dtype=dtype)
            _read_all(self._file.fileno(), _bytes(t), offset)
            out[k] = t
        return out

    def load_into(self, module: torch.nn.Module) -> None:
        """Write the kept weights into ``module``'s parameters (in place; no full-size temporary)."""
        if self._mem is not None:
            module.load_state_dict(self._mem)
            return
        with torch.no_grad():
            for k, v in module.state_dict().items():
                offset, row, shape, dtype = self._layout[k]
                if tuple(v.shape) != tuple(shape) or v.dtype != dtype:
                    raise RuntimeError(
                        f"best weights of {k!r} have shape {tuple(shape)}, the module {tuple(v.shape)}"
                    )
                if v.device.type == "cpu" and v.is_contiguous():
                    _read_all(self._file.fileno(), _bytes(v), offset)
                    continue
                for e in range(shape[0]):  # other devices: one expert row at a time through host memory
                    buf = torch.empty(shape[1:], dtype=dtype)
                    _read_all(self._file.fileno(), _bytes(buf), offset + e * row)
                    v[e].copy_(buf)

    def close(self) -> None:
        """Delete the temporary file (if any); the object is unusable afterwards."""
        self._close()
        self._mem = None

    def __del__(self):  # an interrupted fit still removes its temporary file
        self._close()

    def _close(self) -> None:
        if getattr(self, "_file", None) is not None:
            self._file.close()
            self._file = None


def _bytes(t: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor of any dtype, as a writable view (no copy)."""
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def _write_all(fd: int, data: memoryview, offset: int) -> None:
    while len(data):
        n = os.pwrite(fd, data, offset)
        data, offset = data[n:], offset + n


def _read_all(fd: int, out: memoryview, offset: int) -> None:
    while len(out):
        n = os.preadv(fd, [out], offset)
        if n == 0:
            raise OSError("unexpected end of the best-weights file")
        out, offset = out[n:], offset + n
