# The collaborative branch of Co-Deformable-DETR R50 (official co_deformable_detr_r50_1x_coco): a Faster R-CNN head
# (aux head 0: RPN on strides 8..128, RoIAlign on 8..64 with finest_scale 112) and an ATSS head (aux head 1, strides
# 8..128) on the 4 encoder maps + the learned stride-128 map (the multi-scale adapter's identity path + one 3x3
# stride-2 conv + GN), losses x12 (num_dec_layer * lambda_2 = 6 * 2). Both
# heads return their positives' features (RoI features averaged / the map at the anchor), which Co-Deformable-DETR's
# positive queries add to their content. The query head's transformer needs ``num_co_heads=2``.
from detectron2.config import LazyCall as L

from codetr.modeling.adapter import MultiScaleAdapter
from codetr.modeling.atss import ATSSHead
from codetr.modeling.collaborative import CollaborativeBranch
from codetr.modeling.rcnn import RCNNBranch

W = 6 * 2.0  # num_dec_layer * lambda_2
STRIDES = (8, 16, 32, 64, 128)

collaborative = L(CollaborativeBranch)(
    aux_heads=[
        L(RCNNBranch)(
            num_classes="${...num_classes}",
            strides=STRIDES,
            num_roi_levels=4,
            roi_finest_scale=112,
            loss_rpn_cls_weight=W,
            loss_rpn_bbox_weight=W,
            loss_cls_weight=W,
            loss_bbox_weight=10 * W,
            head_index=0,
            return_feats=True,
        ),
        L(ATSSHead)(
            num_classes="${...num_classes}",
            strides=STRIDES,
            loss_cls_weight=W,
            loss_bbox_weight=2 * W,
            loss_centerness_weight=W,
            head_index=1,
            return_feats=True,
        ),
    ],
    num_classes=80,
    # after the heads: instantiated in this order, the initialisation draws the same numbers as before the adapter
    adapter=L(MultiScaleAdapter)(in_strides=STRIDES[:-1], out_strides=STRIDES, embed_dim=256),
)
