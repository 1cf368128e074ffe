"""Data sets: :func:`toy` (synthetic, offline) and public data fetched with pooch + sha256."""

from ._toy import toy

__all__ = ["toy"]
