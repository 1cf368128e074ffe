"""Plots."""

from ._experts import experts

__all__ = ["experts"]
