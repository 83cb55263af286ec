# The auxiliary heads of the collaborative branch, one LazyCall per kind, with Co-DETR's loss weights: every loss
# x num_dec_layer * lambda_2 = 6 * 2 = 12 on the head's own base weights (Faster R-CNN: RPN CE 1 / L1 1, RoI CE 1 /
# GIoU 10; ATSS: focal 1 / GIoU 2 / centerness 1; FCOS: focal 1 / GIoU 1 / centerness 1; RetinaNet: focal 1 /
# smooth-L1 1, Detectron2's defaults). Selecting the heads is one list in a config:
#
#     model.collaborative.aux_heads = [atss(0, STRIDES), fcos(1, STRIDES)]
#     model.query_head.transformer.num_co_heads = 2        # Co-DINO; Co-DAB-DETR: model.query_head.num_co_heads
#
# ``index`` is the head's position in that list (its loss keys end in it: loss_cls0, loss_cls_aux0, ...; the
# branch checks it). Every head reads its class count from the branch (``model.collaborative.num_classes``).
from detectron2.config import LazyCall as L

from codetr.modeling.atss import ATSSHead
from codetr.modeling.dense_heads import FCOSAuxHead, RetinaNetAuxHead
from codetr.modeling.rcnn import RCNNBranch

W = 6 * 2.0  # num_dec_layer * lambda_2

CO_DINO_STRIDES = (4, 8, 16, 32, 64, 128)  # Co-DINO: the 5 encoder maps + the adapter's stride-128 map
SINGLE_SCALE_STRIDES = (8, 16, 32, 64, 128)  # a single-scale DETR: the adapter's pyramid (Co-Deformable-DETR too)


def rcnn(index, strides, num_roi_levels=None, **kwargs):
    """Faster R-CNN (RPN on every map, RoIAlign on the first ``num_roi_levels``, default all but the last)."""
    return L(RCNNBranch)(
        num_classes="${...num_classes}", strides=strides,
        num_roi_levels=len(strides) - 1 if num_roi_levels is None else num_roi_levels,
        loss_rpn_cls_weight=W, loss_rpn_bbox_weight=W, loss_cls_weight=W, loss_bbox_weight=10 * W,
        head_index=index, **kwargs,
    )


def atss(index, strides, **kwargs):
    return L(ATSSHead)(
        num_classes="${...num_classes}", strides=strides,
        loss_cls_weight=W, loss_bbox_weight=2 * W, loss_centerness_weight=W, head_index=index, **kwargs,
    )


def fcos(index, strides, **kwargs):
    """FCOS; its positive queries' reference boxes are squares of side 8 x stride on the points."""
    return L(FCOSAuxHead)(
        num_classes="${...num_classes}", strides=strides,
        loss_cls_weight=W, loss_bbox_weight=W, loss_centerness_weight=W, head_index=index, **kwargs,
    )


def retinanet(index, strides, **kwargs):
    return L(RetinaNetAuxHead)(
        num_classes="${...num_classes}", strides=strides,
        loss_cls_weight=W, loss_bbox_weight=W, head_index=index, **kwargs,
    )
