"""codetr.layers: multi-scale deformable attention (op and module) and RoIAlign (op and module)."""
from .ms_deform_attn import MultiScaleDeformableAttention, ms_deform_attn, ms_deform_attn_pytorch
from .roi_align import ROIAlign, roi_align

__all__ = ["MultiScaleDeformableAttention", "ms_deform_attn", "ms_deform_attn_pytorch", "ROIAlign", "roi_align"]
