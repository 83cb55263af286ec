"""codetr.engine: trainer (AMP, clipping after unscale, gradient accumulation, EMA) and CPU-capable launch."""
from .ema import ModelEMA
from .launch import launch
from .rng import RNGState
from .trainer import CoDETRTrainer, parse_precision

__all__ = ["CoDETRTrainer", "ModelEMA", "RNGState", "launch", "parse_precision"]
