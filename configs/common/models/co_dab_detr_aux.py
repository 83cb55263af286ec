# The collaborative branch of Co-DAB-DETR R50: the multi-scale adapter builds a simple feature pyramid (strides
# 8..128: two / one transposed conv for 8 / 16, the encoder map at 32, two chained 3x3 stride-2 convs for 64 / 128,
# GroupNorm after each) from the one stride-32 encoder map; a Faster R-CNN head (aux head 0, RoIAlign on 8..64,
# finest_scale 112 as Co-Deformable-DETR) and an ATSS head (aux head 1) on it, losses x12. The query head needs
# ``num_co_heads`` = the number of auxiliary heads (2).
from detectron2.config import LazyCall as L

from codetr.modeling.adapter import MultiScaleAdapter
from codetr.modeling.collaborative import CollaborativeBranch

from .aux_heads import SINGLE_SCALE_STRIDES, atss, rcnn

collaborative = L(CollaborativeBranch)(
    aux_heads=[rcnn(0, SINGLE_SCALE_STRIDES, roi_finest_scale=112), atss(1, SINGLE_SCALE_STRIDES)],
    num_classes=80,
    adapter=L(MultiScaleAdapter)(in_strides=(32,), out_strides=SINGLE_SCALE_STRIDES, embed_dim=256),
)
