"""Large backbones: the EVA-02-style ViT-L with its simple feature pyramid, Swin-L through Detectron2."""
from .layer_decay import vit_layer_id, vit_layer_decay_param_groups
from .sfp import SFP
from .swin import SwinL
from .vit_eva import COCO_GLOBAL_BLOCKS, LVIS_GLOBAL_BLOCKS, EVA02ViT

__all__ = [
    "EVA02ViT",
    "SFP",
    "SwinL",
    "COCO_GLOBAL_BLOCKS",
    "LVIS_GLOBAL_BLOCKS",
    "vit_layer_id",
    "vit_layer_decay_param_groups",
]
