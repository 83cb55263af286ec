# The collaborative branch of Co-DINO (spec §1.4-1.6): a Faster R-CNN head (aux head 0) and an ATSS head (aux head 1)
# on the encoder maps + the learned stride-128 map (strides 4..128: the multi-scale adapter's identity path on the 5
# encoder levels + one 3x3 stride-2 conv + GN), their losses scaled by
# num_dec_layer * lambda_2 = 6 * 2 = 12 as in every official Co-DINO config (RPN CE/L1 12, RoI CE 12 / GIoU 120,
# ATSS focal 12 / GIoU 24 / centerness 12). The query head's transformer needs ``num_co_heads=2`` for the positive queries.
# Defaults are the R50/Swin-L heads (Shared2FC RoI head, class-specific regression, stds 0.1/0.1/0.2/0.2).
# Class count: set as ``model.collaborative``, every head here reads ``model.query_head.num_classes`` (the one value
# to set for another dataset).
from detectron2.config import LazyCall as L

from codetr.modeling.adapter import MultiScaleAdapter
from codetr.modeling.atss import ATSSHead
from codetr.modeling.collaborative import CollaborativeBranch
from codetr.modeling.rcnn import RCNNBranch

W = 6 * 2.0  # num_dec_layer * lambda_2

collaborative = L(CollaborativeBranch)(
    aux_heads=[
        L(RCNNBranch)(
            num_classes="${...num_classes}",
            strides=(4, 8, 16, 32, 64, 128),
            num_roi_levels=5,
            loss_rpn_cls_weight=W,
            loss_rpn_bbox_weight=W,
            loss_cls_weight=W,
            loss_bbox_weight=10 * W,
            head_index=0,
        ),
        L(ATSSHead)(
            num_classes="${...num_classes}",
            strides=(4, 8, 16, 32, 64, 128),
            loss_cls_weight=W,
            loss_bbox_weight=2 * W,
            loss_centerness_weight=W,
            head_index=1,
        ),
    ],
    num_classes="${..query_head.num_classes}",  # resolved once this is model.collaborative
    # after the heads: instantiated in this order, the initialisation draws the same numbers as before the adapter
    adapter=L(MultiScaleAdapter)(in_strides=(4, 8, 16, 32, 64), out_strides=(4, 8, 16, 32, 64, 128), embed_dim=256),
)
