# A small Co-Deformable-DETR-mask (boxes + instance masks) trained from scratch on the embedded synthetic dataset,
# on a CPU:
#
#   python tools/lazyconfig_train_net.py --config-file configs/demo/co_deformable_detr_mask_synthetic.py
#
# configs/demo/co_dino_synthetic.py (backbone, neck, data, schedule) with the query head of configs/
# co_deformable_detr_mask_r50.py at demo size: Deformable-DETR's two-stage head with box refinement, mixed query
# selection and look-forward-twice (128-d, 2 encoder / 2 decoder layers, 100 queries; focal 2 / L1 5 / GIoU 2,
# binary encoder labels; top-100 without NMS), the aux heads returning their positives' features, and the Faster
# R-CNN aux head turned into Mask R-CNN (RoIAlign 14 on strides 8..64, detectron2's MaskRCNNConvUpsampleHead at 128
# channels, mask loss x12). Test: the query head's boxes go through the mask head. The synthetic annotations carry
# exact RLE masks (instance_mask_format="bitmask"); evaluation scores bbox and segm. README "Instance segmentation"
# gives the measured time and AP.
from fvcore.common.param_scheduler import MultiStepParamScheduler
from detectron2.config import LazyCall as L
from detectron2.layers import ShapeSpec
from detectron2.modeling.roi_heads import MaskRCNNConvUpsampleHead

from codetr.modeling import DETRCriterion, HungarianMatcher
from codetr.modeling.deformable_detr_head import DeformableDETRHead
from codetr.modeling.deformable_transformer import DeformableDETRTransformer

from .co_dino_synthetic import DIM, dataloader, model, optimizer, train

model.query_head = L(DeformableDETRHead)(
    transformer=L(DeformableDETRTransformer)(
        embed_dim=DIM,
        num_heads=4,
        num_levels=4,
        num_points=4,
        num_encoder_layers=2,
        num_decoder_layers=2,
        ffn_dim=512,
        dropout=0.0,
        pos_temperature=10000.0,
        pos_offset=-0.5,
        num_co_heads=2,
    ),
    num_classes=20,
    num_queries=100,
    criterion=L(DETRCriterion)(
        num_classes="${..num_classes}",
        matcher=L(HungarianMatcher)(cost_class=2.0, cost_bbox=5.0, cost_giou=2.0),
        loss_cls_weight=2.0,
        loss_bbox_weight=5.0,
        loss_giou_weight=2.0,
        cls_loss="focal",
        focal_alpha=0.25,
        focal_gamma=2.0,
        binary_encoder_labels=True,
    ),
)
model.postprocessor.soft_nms = False  # Co-Deformable-DETR: top-100 of queries x classes, no NMS
model.collaborative.aux_heads[0].return_feats = True  # Co-Deformable-DETR's positive queries add their features
model.collaborative.aux_heads[1].return_feats = True
model.collaborative.aux_heads[0].roi_finest_scale = 112  # RoI levels from stride 8, as co_deformable_detr_r50.py
model.collaborative.aux_heads[0].mask_head = L(MaskRCNNConvUpsampleHead)(
    input_shape=L(ShapeSpec)(channels=DIM, height=14, width=14),
    num_classes="${..num_classes}",
    conv_dims=[DIM] * 5,  # 4 convs + the deconv
    loss_weight=12.0,
)
model.collaborative.aux_heads[0].mask_pooler_resolution = 14

dataloader.train.mapper.use_instance_mask = True
dataloader.train.mapper.instance_mask_format = "bitmask"
dataloader.evaluator.tasks = ("bbox", "segm")
train.output_dir = "./output/demo_co_deformable_detr_mask_synthetic"

# The data and schedule README's measured run used (the demo's settings before its tuning; kept here so that the
# figures stay true): images at a short side of 192..256 (test 224, long side <= 384), 600 iterations of batch 2,
# lr x0.1 after 500, evaluated every 200.
dataloader.train.mapper.augmentations[1].short_edge_length = (192, 224, 256)
dataloader.train.mapper.augmentations[1].max_size = 384
dataloader.test.mapper.augmentations[0].short_edge_length = 224
dataloader.test.mapper.augmentations[0].max_size = 384
lr_multiplier = L(MultiStepParamScheduler)(values=[1.0, 0.1], milestones=[500], num_updates=600)
train.max_iter = 600
train.checkpointer.period = 200
train.eval_period = 200
