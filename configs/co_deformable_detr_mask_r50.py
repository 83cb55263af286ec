"""Co-Deformable-DETR-mask R50, 12 epochs (official co_deformable_detr_mask_r50_1x_coco, HEAD 2665352).

configs/co_deformable_detr_r50.py with the auxiliary Faster R-CNN branch (aux head 0) turned into Mask R-CNN, as the
official config's ``roi_head`` (a ``CoStandardRoIHead`` with ``mask_roi_extractor`` + ``FCNMaskHead``):

- mask RoIAlign 14 (sampling ratio 0, aligned) on the encoder maps of strides 8..64, levels by sqrt(area) / 112
  (the box pooler's mapping);
- detectron2's ``MaskRCNNConvUpsampleHead``: 4 3x3 convs of 256 + ReLU, a 2x2 stride-2 deconv + ReLU, per-class 1x1
  logits (28 x 28) = mmdet's ``FCNMaskHead`` (num_convs 4, 256 channels, 80 classes);
- mask loss: mean BCE of the GT class's logits against the GT masks cropped to each positive RoI (28 px grid,
  binarised at 0.5) on the sampled positive RoIs, weight 1.0 x 6 x 2 = 12 (``loss_mask0``).

Test: the query head's top-100 boxes (its final detections) go through the mask head on the encoder maps; masks are
pasted at the original image size (threshold 0.5) and ranked by the box scores in the ``segm`` evaluation.
``model.eval_module=rcnn`` evaluates the Mask R-CNN branch alone (its own RoI boxes and their masks; the official
'two-stage' mode). The official ``co_detr.py`` looks for a top-level ``mask_head`` in its 'detr' test path, so the
official code with this config returns boxes only there (docs/differences.md).

Data: the DETR augmentation with instance masks (``use_instance_mask``, rasterised masks, as the official
``LoadAnnotations(with_mask=True)``; boxes are not recomputed after the crop, as the official ``RandomCrop``);
training keeps the images without objects (official ``filter_empty_gt=False``); bbox + segm evaluation with up to
100 detections per image. No official checkpoint of this model is released:
``model_zoo.get_config("co_deformable_detr_mask_r50.py")`` gives the config; an official-format checkpoint of it
(``roi_head.0.mask_head.*``) converts on load (codetr.checkpoint.official).
"""
from detectron2.config import LazyCall as L
from detectron2.layers import ShapeSpec
from detectron2.modeling.roi_heads import MaskRCNNConvUpsampleHead

from .co_deformable_detr_r50 import dataloader, lr_multiplier, model, optimizer, train

NUM_DEC_LAYERS, LAMBDA_2 = 6, 2.0

model.collaborative.aux_heads[0].mask_head = L(MaskRCNNConvUpsampleHead)(
    input_shape=L(ShapeSpec)(channels=256, height=14, width=14),
    num_classes="${..num_classes}",
    conv_dims=[256, 256, 256, 256, 256],  # 4 convs + the deconv
    loss_weight=1.0 * NUM_DEC_LAYERS * LAMBDA_2,
)
model.collaborative.aux_heads[0].mask_pooler_resolution = 14

dataloader.train.dataset.filter_empty = False  # official train filter_empty_gt=False: images without objects kept
dataloader.train.mapper.use_instance_mask = True
dataloader.train.mapper.instance_mask_format = "bitmask"
dataloader.evaluator.tasks = ("bbox", "segm")
train.output_dir = "./output/co_deformable_detr_mask_r50"
