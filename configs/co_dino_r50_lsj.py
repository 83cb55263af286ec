"""Co-DINO, ResNet-50, 12 epochs, large-scale jitter 1024 (official co_dino_5scale_lsj_r50_1x_coco).

configs/co_dino_r50.py with LSJ data (common/coco_lsj_data.py: flip, scale 0.1..2.0 of 1024x1024, crop/pad to
1024 with 114, boxes recomputed from the cropped masks, copy-paste of up to 99 objects from a second image) and
``with_attn_mask=False``: every image counts as its padded 1024x1024 size (no padding masks; boxes of the
one-to-one head and the positive queries normalised by the padded size; aux-head anchors valid and proposals
clipped over the whole padded image), as the official LSJ configs. The masks serve copy-paste only. At test
time images are resized to fit 1024x1024 and the model pads them to 1024x1024 with 114 (``model.square_pad``), as the official LSJ test pipeline;
detections are rescaled by the resize factor.

Documented overrides:
- 9-encoder-layer variant (co_dino_5scale_9encoder_lsj_r50_1x_coco, 52.6 AP):
  ``model.query_head.transformer.num_encoder_layers=9``
- 3x schedule (36 epochs, lr step at 30): see ``lr_multiplier`` / ``train.max_iter`` in common/co_dino_schedule.py.
- DINO baseline: ``model.collaborative=null model.query_head.transformer.num_co_heads=0``.
- LSJ without copy-paste: ``dataloader.train.dataset.max_num_pasted=1``.
"""
from .co_dino_r50 import lr_multiplier, model, optimizer, train
from .common.coco_lsj_data import dataloader

model.with_attn_mask = False
model.square_pad = 1024  # test images (resized to fit 1024x1024) padded to 1024x1024 with 114, as officially
model.pad_value = 114.0
train.output_dir = "./output/co_dino_r50_lsj"
