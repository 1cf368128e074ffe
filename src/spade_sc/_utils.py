"""Small shared helpers: torch device choice, SpatialData tables, progress bars."""

from __future__ import annotations

from typing import TYPE_CHECKING

from anndata import AnnData

from ._settings import settings

if TYPE_CHECKING:
    import torch


def resolve_device(device: str | None = None) -> torch.device:
    """``device`` → ``torch.device``; ``None`` → ``settings.device`` → CUDA → MPS → CPU."""
    import torch

    device = device if device is not None else settings.device
    if device is None:
        if torch.cuda.is_available():
            device = "cuda"
        elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            device = "mps"
        else:
            device = "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"`device={device!r}` was asked for but CUDA is not available; use `device='cpu'`.")
    return dev


def is_spatialdata(data) -> bool:
    """True if ``data`` is a :class:`spatialdata.SpatialData` (without importing spatialdata eagerly)."""
    return type(data).__name__ == "SpatialData" and hasattr(data, "tables")


def get_table(data, table_key: str | None = None) -> AnnData:
    """Return the AnnData to work on: ``data`` itself, or ``data.tables[table_key]`` for SpatialData.

    The table is returned by reference, so writes land in the SpatialData object.
    """
    if isinstance(data, AnnData):
        return data
    if is_spatialdata(data):
        tables = data.tables
        if table_key is None:
            if len(tables) == 1:
                return next(iter(tables.values()))
            raise ValueError(
                f"this SpatialData has {len(tables)} tables ({', '.join(map(repr, tables))}); "
                "pass `table_key=` to say which one to use."
            )
        if table_key not in tables:
            raise KeyError(f"`table_key={table_key!r}` is not a table of this SpatialData (tables: {list(tables)}).")
        return tables[table_key]
    raise TypeError(f"expected AnnData or SpatialData, got {type(data).__name__}.")


def copy_data(data):
    """Deep copy of AnnData or SpatialData."""
    if isinstance(data, AnnData):
        return data.copy()
    from spatialdata import deepcopy

    return deepcopy(data)


def progress(iterable=None, **kwargs):
    """A tqdm progress bar that respects ``settings.progress_bar``."""
    from tqdm.auto import tqdm

    kwargs.setdefault("disable", not settings.progress_bar)
    kwargs.setdefault("leave", False)
    return tqdm(iterable, **kwargs)
