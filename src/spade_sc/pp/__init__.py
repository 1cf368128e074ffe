"""Preprocessing: gene panel selection, spot patches and image features."""

from ._select_genes import select_genes

__all__ = ["select_genes"]
