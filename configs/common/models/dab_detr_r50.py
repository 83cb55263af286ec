# DAB-DETR R50, the one-to-one branch of Co-DAB-DETR (facts as detrex projects/dab_detr, the code ours): ResNet-50
# C5 only (stride 32) through a 1x1 conv to 256 channels, sine PE (T=20, normalised), 6 encoder + 6 decoder layers
# (8 heads, FFN 2048 with PReLU, dropout 0), 300 queries with learned 4-D anchors (x, y random uniform at init),
# width/height-modulated conditional cross-attention, anchor refinement by one box MLP shared by all layers;
# sigmoid focal 1 / L1 5 / GIoU 2, Hungarian costs 2 / 5 / 2; test: top-100 of 300 x 80, no NMS.
# As detrex's DAB-DETR only the stem is frozen (freeze_at=1).
from detectron2.config import LazyCall as L
from detectron2.modeling.backbone import BasicStem, ResNet

from codetr.modeling import CoDETR, DABDETRHead, DABTransformer, DETRCriterion, DETRPostProcessor, HungarianMatcher
from codetr.modeling import InputProjection

model = L(CoDETR)(
    backbone=L(ResNet)(
        stem=L(BasicStem)(in_channels=3, out_channels=64, norm="FrozenBN"),
        stages=L(ResNet.make_default_stages)(depth=50, stride_in_1x1=False, norm="FrozenBN"),
        out_features=["res5"],
        freeze_at=1,
    ),
    neck=L(InputProjection)(in_feature="res5", in_channels=2048, out_channels=256),
    query_head=L(DABDETRHead)(
        transformer=L(DABTransformer)(
            embed_dim=256,
            num_heads=8,
            num_encoder_layers=6,
            num_decoder_layers=6,
            ffn_dim=2048,
            dropout=0.0,
            num_queries=300,
            modulate_hw_attn=True,
            pos_temperature=20.0,
            random_refpoints_xy=True,
        ),
        num_classes=80,
        criterion=L(DETRCriterion)(
            num_classes="${..num_classes}",
            matcher=L(HungarianMatcher)(cost_class=2.0, cost_bbox=5.0, cost_giou=2.0),
            loss_cls_weight=1.0,
            loss_bbox_weight=5.0,
            loss_giou_weight=2.0,
            cls_loss="focal",
            focal_alpha=0.25,
            focal_gamma=2.0,
            lambda_1=1.0,
        ),
        num_co_heads=0,  # positive-query projections: one per auxiliary head (Co-DAB-DETR: 2)
    ),
    postprocessor=L(DETRPostProcessor)(max_per_img=100, soft_nms=False),
    pixel_mean=[123.675, 116.28, 103.53],
    pixel_std=[58.395, 57.12, 57.375],
    input_format="RGB",
    with_attn_mask=True,
    size_divisibility=32,
    collaborative=None,
)
