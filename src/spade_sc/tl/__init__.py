"""Tools: fit SPADE, embed spots."""

from ._elbow import elbow
from ._embed import embed
from ._few_shot import few_shot
from ._fit import fit_spade
from ._predict import predict_expression
from ._probe import expression_probe

__all__ = ["fit_spade", "embed", "elbow", "predict_expression", "expression_probe", "few_shot"]
