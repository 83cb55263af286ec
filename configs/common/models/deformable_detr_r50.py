# Co-Deformable-DETR's one-to-one branch (two-stage Deformable-DETR with box refinement, mixed query selection and
# "look forward twice") with a torchvision-style ResNet-50: the official co_deformable_detr_r50_1x_coco settings,
# without the auxiliary heads. C3..C5 + one extra level (4 levels, strides 8..64), 300 queries, sine PE
# T=10000 offset -0.5, sigmoid focal loss 2.0 / L1 5 / GIoU 2, encoder loss on every token with binary labels,
# top-100 of 300 x 80 at test time, no NMS.
from detectron2.config import LazyCall as L
from detectron2.modeling.backbone import BasicStem, ResNet

from codetr.modeling import ChannelMapper, CoDETR, DETRCriterion, DETRPostProcessor, HungarianMatcher
from codetr.modeling.deformable_detr_head import DeformableDETRHead
from codetr.modeling.deformable_transformer import DeformableDETRTransformer

model = L(CoDETR)(
    backbone=L(ResNet)(
        stem=L(BasicStem)(in_channels=3, out_channels=64, norm="FrozenBN"),
        stages=L(ResNet.make_default_stages)(depth=50, stride_in_1x1=False, norm="FrozenBN"),
        out_features=["res3", "res4", "res5"],
        freeze_at=2,  # stem + res2 frozen (official frozen_stages=1)
    ),
    neck=L(ChannelMapper)(
        in_features=["res3", "res4", "res5"],
        in_channels=[512, 1024, 2048],
        out_channels=256,
        num_extra=1,  # strides 8..64
    ),
    query_head=L(DeformableDETRHead)(
        transformer=L(DeformableDETRTransformer)(
            embed_dim=256,
            num_heads=8,
            num_levels=4,
            num_points=4,
            num_encoder_layers=6,
            num_decoder_layers=6,
            ffn_dim=2048,
            dropout=0.0,
            pos_temperature=10000.0,
            pos_offset=-0.5,
            num_co_heads=0,  # positive-query projections: one per auxiliary head (Co-Deformable-DETR: 2)
        ),
        num_classes=80,
        num_queries=300,
        criterion=L(DETRCriterion)(
            num_classes="${..num_classes}",
            matcher=L(HungarianMatcher)(cost_class=2.0, cost_bbox=5.0, cost_giou=2.0),
            loss_cls_weight=2.0,
            loss_bbox_weight=5.0,
            loss_giou_weight=2.0,
            cls_loss="focal",
            focal_alpha=0.25,
            focal_gamma=2.0,
            lambda_1=1.0,
            binary_encoder_labels=True,
        ),
    ),
    postprocessor=L(DETRPostProcessor)(max_per_img=100, soft_nms=False),
    pixel_mean=[123.675, 116.28, 103.53],
    pixel_std=[58.395, 57.12, 57.375],
    input_format="RGB",
    with_attn_mask=True,
    size_divisibility=32,
    collaborative=None,
)
