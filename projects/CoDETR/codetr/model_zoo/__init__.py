"""codetr.model_zoo: the project's configs and the official Co-DETR weights (like ``detectron2.model_zoo``)."""
from .model_zoo import OFFICIAL_WEIGHTS, OfficialWeights, get, get_checkpoint_url, get_config, get_config_file

__all__ = ["OFFICIAL_WEIGHTS", "OfficialWeights", "get", "get_checkpoint_url", "get_config", "get_config_file"]
