"""codetr.layers: multi-scale deformable attention (op and module)."""
from .ms_deform_attn import MultiScaleDeformableAttention, ms_deform_attn, ms_deform_attn_pytorch

__all__ = ["MultiScaleDeformableAttention", "ms_deform_attn", "ms_deform_attn_pytorch"]
