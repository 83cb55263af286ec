# Co-DINO, ResNet-50, 12 epochs (official co_dino_5scale_r50_1x_coco).
# The auxiliary heads (collaborative branch) plug in as ``model.collaborative``; with
# ``model.collaborative = None`` and ``model.query_head.num_co_heads = 0`` this is exactly DINO
# (configs/dino_r50.py).
from .common.co_dino_schedule import lr_multiplier, optimizer, train
from .common.coco_data import dataloader
from .common.models.dino_r50 import model
