"""Co-DETR (DETRs with Collaborative Hybrid Assignments Training) for Detectron2."""

__version__ = "0.1.0"
