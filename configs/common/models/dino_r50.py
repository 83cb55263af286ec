# Co-DINO's one-to-one branch (5-scale DINO) with a torchvision-style ResNet-50: the official
# co_dino_5scale_r50_1x_coco settings, without the auxiliary heads.
from detectron2.config import LazyCall as L
from detectron2.modeling.backbone import BasicStem, ResNet

from codetr.modeling import (
    ChannelMapper,
    CoDETR,
    DETRCriterion,
    DETRPostProcessor,
    DINOHead,
    DINOTransformer,
    HungarianMatcher,
)

model = L(CoDETR)(
    backbone=L(ResNet)(
        stem=L(BasicStem)(in_channels=3, out_channels=64, norm="FrozenBN"),
        stages=L(ResNet.make_default_stages)(depth=50, stride_in_1x1=False, norm="FrozenBN"),
        out_features=["res2", "res3", "res4", "res5"],
        freeze_at=2,  # stem + res2 frozen
    ),
    neck=L(ChannelMapper)(
        in_features=["res2", "res3", "res4", "res5"],
        in_channels=[256, 512, 1024, 2048],
        out_channels=256,
        num_extra=1,  # strides 4..64
    ),
    query_head=L(DINOHead)(
        transformer=L(DINOTransformer)(
            embed_dim=256,
            num_heads=8,
            num_levels=5,
            num_points=4,
            num_encoder_layers=6,
            num_decoder_layers=6,
            ffn_dim=2048,
            dropout=0.0,
            num_queries=900,
            num_checkpoint=4,  # official with_cp=4
            num_co_heads=0,  # positive-query projections: one per auxiliary head (Co-DINO: 2)
        ),
        num_classes=80,
        num_dn_queries=100,
        label_noise_ratio=0.5,
        box_noise_scale=1.0,
        criterion=L(DETRCriterion)(
            num_classes="${..num_classes}",
            matcher=L(HungarianMatcher)(cost_class=2.0, cost_bbox=5.0, cost_giou=2.0),
            loss_cls_weight=1.0,
            loss_bbox_weight=5.0,
            loss_giou_weight=2.0,
            cls_loss="qfl",
            lambda_1=1.0,
        ),
    ),
    # class-aware linear soft-NMS (IoU 0.8) on the top 300, as every official Co-DINO config
    postprocessor=L(DETRPostProcessor)(max_per_img=300, soft_nms=True),
    pixel_mean=[123.675, 116.28, 103.53],
    pixel_std=[58.395, 57.12, 57.375],
    input_format="RGB",
    with_attn_mask=True,
    size_divisibility=32,
    collaborative=None,
)
