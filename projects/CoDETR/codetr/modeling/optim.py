"""Optimizer helpers usable from LazyConfigs."""
from typing import Dict

__all__ = ["LrFactorByPrefix"]


class LrFactorByPrefix:
    """
    ``lr_factor_func`` for detectron2's ``get_default_optimizer_params``: maps a parameter name
    ("module.path.param") to the factor of the first matching prefix, else 1.0.
    E.g. ``LrFactorByPrefix({"backbone.": 0.1})`` trains the backbone at 0.1x the base lr.
    """

    def __init__(self, factors: Dict[str, float]):
        self.factors = dict(factors)

    def __call__(self, name: str) -> float:
        for prefix, factor in self.factors.items():
            if name.startswith(prefix):
                return float(factor)
        return 1.0
