"""Co-DINO, ResNet-50, 12 epochs, DETR augmentation (official co_dino_5scale_r50_1x_coco).

DINO's one-to-one branch (common/models/dino_r50.py) plus the collaborative hybrid assignment
(common/models/co_dino_aux.py, codetr/modeling/collaborative.py): the encoder memory cut back into its 5 maps plus
a learned stride-128 map (3x3 s2 conv + GN), a Faster R-CNN branch (aux head 0) and an ATSS branch (aux head 1)
trained with one-to-many assignment on them, and one extra decoder pass per aux head on its customised positive
queries. Every aux-head loss is scaled by num_decoder_layers * lambda_2 = 6 * 2 = 12 (RoI GIoU base 10, ATSS GIoU
base 2); lambda_1 = 1 is ``model.query_head.criterion.lambda_1``. At inference only the one-to-one head runs.

Documented overrides (command line ``key=value`` or in a derived config):
- DINO baseline (no collaborative branch, same everything else; = configs/dino_r50.py):
  ``model.collaborative=null model.query_head.transformer.num_co_heads=0``
- 9-encoder-layer variant (official co_dino_5scale_9encoder_*): ``model.query_head.transformer.num_encoder_layers=9``
- Evaluate an auxiliary head instead of the one-to-one head (debugging): ``model.eval_module=atss`` or
  ``model.eval_module=rcnn`` (official 'one-stage' / 'two-stage' eval modes).
- Another dataset: set ``model.query_head.num_classes`` (the only class count: the collaborative branch and its
  auxiliary heads read it by interpolation); see configs/demo/coco_format_template.py.
"""
from .common.co_dino_schedule import lr_multiplier, optimizer, train
from .common.coco_data import dataloader
from .common.models.co_dino_aux import collaborative as _collaborative  # '_': not a top-level config key
from .common.models.dino_r50 import model

model.query_head.transformer.num_co_heads = 2  # one positive-query projection per auxiliary head
model.collaborative = _collaborative
model.eval_module = "detr"
