"""Co-DETR (DETRs with Collaborative Hybrid Assignments Training) for Detectron2."""

__version__ = "0.1.0"

from .predictor import Predictor  # noqa: E402

__all__ = ["Predictor"]
