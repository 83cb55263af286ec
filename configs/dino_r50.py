# The DINO baseline: Co-DINO R50 (5 scales, 900 queries, DN 100) with the auxiliary heads switched off.
# It imports nothing of the collaborative branch.
from .common.co_dino_schedule import lr_multiplier, optimizer, train
from .common.coco_data import dataloader
from .common.models.dino_r50 import model
