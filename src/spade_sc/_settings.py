"""Package-wide settings (a plain dataclass, like :mod:`spatialdata`'s).

No global random seeding happens here: every function takes ``random_state``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["SpadeSettings", "settings"]


def _default_datadir() -> Path:
    env = os.environ.get("SPADE_SC_DATADIR")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "spade_sc"


@dataclass
class SpadeSettings:
    """Settings of :mod:`spade_sc`, reachable as ``ss.settings``.

    Attributes
    ----------
    datadir
        Where :mod:`spade_sc.datasets` caches downloaded files
        (``$SPADE_SC_DATADIR`` or ``~/.cache/spade_sc``).
    device
        Default torch device for training and inference. ``None`` picks CUDA when available,
        then MPS, else CPU.
    verbosity
        Level of the ``spade_sc`` logger (``logging.INFO`` by default).
    progress_bar
        Show tqdm progress bars in long loops.
    num_threads
        Torch intra-op threads to use on CPU (``None`` leaves torch's default).
    """

    datadir: Path = field(default_factory=_default_datadir)
    device: str | None = None
    verbosity: int = logging.INFO
    progress_bar: bool = True
    num_threads: int | None = None

    def __setattr__(self, name, value):
        if name == "datadir":
            value = Path(value)
        if name == "verbosity":
            logging.getLogger("spade_sc").setLevel(value)
        super().__setattr__(name, value)


settings = SpadeSettings()
