"""Co-DAB-DETR, ResNet-50, 12 epochs, DETR augmentation: Co-DETR's collaborative hybrid assignment on a single-scale
DETR (the paper applies it to DAB-DETR; no public implementation exists, this config is the project's own).

DAB-DETR's one-to-one branch (common/models/dab_detr_r50.py) plus the collaborative branch
(common/models/co_dab_detr_aux.py): the stride-32 encoder map -> the multi-scale adapter's simple feature pyramid
(strides 8..128) -> Faster R-CNN (aux head 0) and ATSS (aux head 1), losses x12; per aux head one extra decoder
pass whose queries have the head's assigned boxes as DAB anchors and, as content, LayerNorm_i(Linear_i(2C -> C))
of the boxes' sine embedding; losses at every decoder layer. At inference only the one-to-one head runs.

Overrides:
- DAB-DETR baseline (= configs/dab_detr_r50.py): ``model.collaborative=null model.query_head.num_co_heads=0``
- Other auxiliary heads: one list, ``model.collaborative.aux_heads = [...]`` built with the functions of
  common/models/aux_heads.py (``rcnn``, ``atss``, ``fcos``, ``retinanet``: x12 weights set there), and
  ``model.query_head.num_co_heads`` = its length.
- Another dataset: set ``model.query_head.num_classes``; the criterion and the auxiliary heads follow it.
"""
from .common.coco_data import dataloader
from .common.dab_detr_schedule import lr_multiplier, optimizer, train
from .common.models.co_dab_detr_aux import collaborative
from .common.models.dab_detr_r50 import model

model.query_head.num_co_heads = 2  # one positive-query projection per auxiliary head
model.collaborative = collaborative
model.collaborative.num_classes = "${..query_head.num_classes}"
model.eval_module = "detr"
dataloader.evaluator.max_dets_per_image = 100  # the model keeps its top 100
