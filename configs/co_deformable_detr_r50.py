"""Co-Deformable-DETR, ResNet-50, 12 epochs, DETR augmentation (official co_deformable_detr_r50_1x_coco, 49.5 AP).

Deformable-DETR's one-to-one branch (common/models/deformable_detr_r50.py) plus the collaborative hybrid assignment
(common/models/co_deformable_detr_aux.py, codetr/modeling/collaborative.py): the 4 encoder maps plus a learned
stride-128 map, a Faster R-CNN branch (aux head 0) and an ATSS branch (aux head 1) trained with one-to-many
assignment on them (losses x12), and one extra decoder pass per aux head on its positive queries, built by
Linear(2C -> 2C) + LayerNorm split into (query_pos, query), plus LayerNorm(Linear(box features)) on the content and
the learned per-head scalar ``head_pos_embed`` on the position. At inference only the one-to-one head runs.

Overrides:
- Deformable-DETR baseline (= configs/deformable_detr_r50.py):
  ``model.collaborative=null model.query_head.transformer.num_co_heads=0``
- Evaluate an auxiliary head (debugging): ``model.eval_module=atss`` or ``model.eval_module=rcnn``.
- Another dataset: set ``model.query_head.num_classes``; the criterion and the auxiliary heads follow it.
"""
from .common.coco_data import dataloader
from .common.deformable_detr_schedule import lr_multiplier, optimizer, train
from .common.models.co_deformable_detr_aux import collaborative
from .common.models.deformable_detr_r50 import model

model.query_head.transformer.num_co_heads = 2  # one positive-query projection per auxiliary head
model.collaborative = collaborative
model.collaborative.num_classes = "${..query_head.num_classes}"
model.eval_module = "detr"
dataloader.evaluator.max_dets_per_image = 100  # the model keeps its top 100
dataloader.train.dataset.filter_empty = False  # official filter_empty_gt=False: images without objects train too
