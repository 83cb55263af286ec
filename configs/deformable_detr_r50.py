# The Deformable-DETR baseline of Co-Deformable-DETR R50: the same one-to-one detector (two-stage, box refinement,
# mixed query selection, look forward twice, 300 queries) and schedule, with no auxiliary heads.
# It imports nothing of the collaborative branch.
from .common.coco_data import dataloader
from .common.deformable_detr_schedule import lr_multiplier, optimizer, train
from .common.models.deformable_detr_r50 import model

train.output_dir = "./output/deformable_detr_r50"
dataloader.evaluator.max_dets_per_image = 100  # the model keeps its top 100
dataloader.train.dataset.filter_empty = False  # official filter_empty_gt=False: images without objects train too
