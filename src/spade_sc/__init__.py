"""spade_sc: SPADE — a mixture of data experts aligning H&E and spatial transcriptomics — for scverse."""

from importlib.metadata import PackageNotFoundError, version

from . import datasets, io, pl, pp, tl
from ._settings import settings
from .model import SpadeModel

try:
    __version__ = version("spade_sc")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0"

__all__ = ["datasets", "io", "pl", "pp", "tl", "SpadeModel", "settings", "__version__"]
