# The DAB-DETR baseline of Co-DAB-DETR R50: the same one-to-one detector (C5, 6 + 6 layers, 300 learned anchor
# queries) and 12-epoch schedule, with no auxiliary heads. It imports nothing of the collaborative branch.
from .common.coco_data import dataloader
from .common.dab_detr_schedule import lr_multiplier, optimizer, train
from .common.models.dab_detr_r50 import model

train.output_dir = "./output/dab_detr_r50"
dataloader.evaluator.max_dets_per_image = 100  # the model keeps its top 100
