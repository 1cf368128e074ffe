"""Data sets: :func:`toy` (synthetic, offline) and public data fetched with pooch + sha256."""

from ._registry import her2st
from ._toy import toy

__all__ = ["toy", "her2st"]
