"""Plots: what SPADE learned, drawn on the H&E (each function takes ``ax=`` and returns Axes or Figure)."""

from ._elbow import elbow
from ._embedding import embedding
from ._expert_genes import expert_genes
from ._experts import experts
from ._gene_maps import gene_maps
from ._training import training_curves

__all__ = ["experts", "elbow", "training_curves", "gene_maps", "embedding", "expert_genes"]
