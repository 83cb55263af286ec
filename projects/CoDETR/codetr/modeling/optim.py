"""Optimizer helpers usable from LazyConfigs."""
from typing import Dict, Optional

__all__ = ["LrFactorByPrefix"]


class LrFactorByPrefix:
    """
    ``lr_factor_func`` for detectron2's ``get_default_optimizer_params``: maps a parameter name
    ("module.path.param") to the factor of the first matching prefix, else that of the first key of ``contains``
    found anywhere in the name (mmcv's ``custom_keys`` semantics), else 1.0.
    E.g. ``LrFactorByPrefix({"backbone.": 0.1})`` trains the backbone at 0.1x the base lr;
    ``LrFactorByPrefix({"backbone.": 0.1}, contains={"sampling_offsets": 0.1})`` also the deformable attentions'
    sampling offsets (Deformable-DETR).
    """

    def __init__(self, factors: Dict[str, float], contains: Optional[Dict[str, float]] = None):
        self.factors = dict(factors)
        self.contains = dict(contains or {})

    def __call__(self, name: str) -> float:
        for prefix, factor in self.factors.items():
            if name.startswith(prefix):
                return float(factor)
        for key, factor in self.contains.items():
            if key in name:
                return float(factor)
        return 1.0
