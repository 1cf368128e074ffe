"""The SPADE model: :class:`SpadeModel` (user API) and its torch/clustering building blocks.

Torch-based pieces are imported on first use so that ``import spade_sc`` stays fast.
"""

from ._clustering import TwoStageClustering, two_stage_kmeans, wcss_curve
from ._spade_model import FORMAT_VERSION, SpadeModel

_LAZY = {
    "ProjectionHead": "._heads",
    "StackedHeads": "._heads",
    "ExpertPairs": "._heads",
    "soft_clip_loss": "._loss",
    "routing_weights": "._routing",
    "sparsify_weights": "._routing",
    "numpy_routing": "._routing",
}

__all__ = ["SpadeModel", "FORMAT_VERSION", "two_stage_kmeans", "wcss_curve", "TwoStageClustering", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
