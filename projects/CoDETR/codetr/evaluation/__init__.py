"""codetr.evaluation: COCO/LVIS box and mask evaluators with an explicit number of detections per image."""
from .evaluator import build_detection_evaluator, lvis_numpy_compat

__all__ = ["build_detection_evaluator", "lvis_numpy_compat"]
