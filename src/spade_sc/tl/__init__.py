"""Tools: fit SPADE, embed spots."""

from ._embed import embed
from ._fit import fit_spade

__all__ = ["fit_spade", "embed"]
