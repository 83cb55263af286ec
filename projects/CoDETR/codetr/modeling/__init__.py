"""codetr.modeling: the Co-DETR meta-architecture, the query heads, their criterion and post-processor."""
from .denoising import CdnQueryGenerator, build_dn_attn_mask, inverse_sigmoid
from .collaborative import CollaborativeBranch, CollaborativeQueryHead
from .criterion import DETRCriterion, validate_targets
from .dab_detr_head import DABDETRHead
from .dab_transformer import DABTransformer
from .dino_head import DINOHead
from .losses import all_reduce_normalizer, quality_focal_loss
from .matcher import HungarianMatcher
from .meta_arch import CoDETR
from .neck import ChannelMapper, InputProjection
from .postprocess import DETRPostProcessor
from .position_encoding import PositionEmbeddingSine, box_sine_embed
from .soft_nms import batched_soft_nms
from .transformer import DINOTransformer

__all__ = [
    "CoDETR",
    "CollaborativeBranch",
    "CollaborativeQueryHead",
    "DETRCriterion",
    "DETRPostProcessor",
    "DINOHead",
    "DINOTransformer",
    "ChannelMapper",
    "DABDETRHead",
    "DABTransformer",
    "InputProjection",
    "HungarianMatcher",
    "CdnQueryGenerator",
    "PositionEmbeddingSine",
    "all_reduce_normalizer",
    "batched_soft_nms",
    "box_sine_embed",
    "build_dn_attn_mask",
    "inverse_sigmoid",
    "quality_focal_loss",
    "validate_targets",
]
