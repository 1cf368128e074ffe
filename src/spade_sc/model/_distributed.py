"""Multi-process training and extraction on ``torch.distributed`` (``torchrun``), CPU (gloo) or GPU (nccl).

SPADE's experts are independent models, so a fit parallelises over experts without any per-step
communication: every process holds the data, the stage-1/2 clustering is computed on rank 0 and broadcast,
each rank trains a disjoint set of experts (balanced by size), and at the end (and after every epoch, for the
losses) the ranks exchange results. Random numbers are drawn exactly as in a one-process fit (per-step
dropout generators draw the masks of all experts active at that step and each rank keeps its own), so the
result equals a single-process fit up to float summation order.

Launch::

    torchrun --nproc_per_node=2 my_fit.py     # my_fit.py calls ss.tl.fit_spade(...) as usual

``fit_spade`` detects an initialised process group (it initialises one from torchrun's environment variables
when ``WORLD_SIZE > 1`` and none exists). Feature extraction is sharded by slide with
:func:`shard_by_slide` / :func:`extract_features_distributed`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

__all__ = ["Comm", "current", "init_from_env", "balanced_owners", "shard_by_slide", "extract_features_distributed"]


@dataclass
class Comm:
    """The process group as the trainer needs it."""

    rank: int
    world: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def owned_experts(self, sizes) -> np.ndarray:
        """Bool ``[E]``: the experts this rank trains (see :func:`balanced_owners`)."""
        return balanced_owners(sizes, self.world) == self.rank

    def all_reduce_sum(self, t):
        """Sum a tensor over ranks, in place (moved to the backend's device and back if needed)."""
        import torch.distributed as dist

        dev = _backend_device()
        work = t if t.device == dev else t.to(dev)
        dist.all_reduce(work, op=dist.ReduceOp.SUM)
        if work is not t:
            t.copy_(work.to(t.device))
        return t

    def all_reduce_numpy(self, x: np.ndarray) -> np.ndarray:
        import torch

        t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float64).copy())
        return self.all_reduce_sum(t).numpy()

    def broadcast_object(self, obj, src: int = 0):
        import torch.distributed as dist

        box = [obj if self.rank == src else None]
        dist.broadcast_object_list(box, src=src)
        return box[0]

    def barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier()


def _backend_device():
    import torch
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def init_from_env() -> None:
    """Initialise the default process group from torchrun's variables when ``WORLD_SIZE > 1`` (gloo on CPU,
    nccl when CUDA is available); a no-op otherwise or when one exists."""
    import torch
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available() or dist.is_initialized():
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend)


def current() -> Comm | None:
    """The active process group as a :class:`Comm`, or ``None`` for a single process."""
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover
        return None
    init_from_env()
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() <= 1:
        return None
    return Comm(dist.get_rank(), dist.get_world_size())


def balanced_owners(sizes, world: int) -> np.ndarray:
    """Rank of each expert: largest experts first, each to the least-loaded rank (deterministic)."""
    sizes = np.asarray(sizes, dtype=np.float64)
    owner = np.empty(len(sizes), dtype=np.int64)
    load = np.zeros(world)
    for e in np.argsort(-sizes, kind="stable"):
        r = int(np.argmin(load))
        owner[e] = r
        load[r] += max(sizes[e], 1.0)
    return owner


def shard_by_slide(slides, rank: int, world: int) -> np.ndarray:
    """Indices of the spots of slides ``rank, rank + world, …`` (slides in sorted order)."""
    slides = np.asarray(slides).astype(str)
    names = np.unique(slides)
    mine = names[rank::world]
    return np.flatnonzero(np.isin(slides, mine))


def extract_features_distributed(adata, *, slide_key: str = "library_id", key_added: str = "X_image", **kwargs):
    """Run :func:`spade_sc.pp.extract_features` sharded by slide over the ranks, then gather the features.

    Rank ``r`` extracts slides ``r, r + W, …`` (of ``adata.obs[slide_key]``); every rank ends with the full
    ``adata.obsm[key_added]``. Without a process group it is ``extract_features`` on everything.
    ``kwargs`` go to ``extract_features`` unchanged.
    """
    import torch

    from .. import pp

    comm = current()
    if comm is None:
        return pp.extract_features(adata, key_added=key_added, **kwargs)
    rows = shard_by_slide(adata.obs[slide_key].to_numpy(), comm.rank, comm.world)
    part = adata[rows].copy()
    if len(rows):
        pp.extract_features(part, key_added=key_added, **kwargs)
        feats = np.asarray(part.obsm[key_added], dtype=np.float32)
        dim = feats.shape[1]
    else:
        feats, dim = None, 0
    dims = comm.all_reduce_numpy(np.eye(comm.world)[comm.rank] * dim)
    dim = int(dims.max())
    full = torch.zeros(adata.n_obs, dim, dtype=torch.float32)
    if feats is not None:
        full[torch.from_numpy(rows)] = torch.from_numpy(feats)
    comm.all_reduce_sum(full)
    adata.obsm[key_added] = full.numpy()
    return None
