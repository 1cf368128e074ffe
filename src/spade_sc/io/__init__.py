"""Readers of HEST-1k, her2st, Visium and SpatialData."""

__all__: list[str] = []
