"""Deployment: the detector as a tensor-in / tensor-out module for ``torch.export`` and ONNX.

:class:`DetectorForExport` wraps a :class:`codetr.modeling.CoDETR` in eval mode: it takes a batch of images
already resized by the config's test resize (no padding: every image of the batch has the tensor's size) and
returns the model's top-k detection candidates (``model.postprocessor.candidates``), with no host sync and no
data-dependent shape, so that ``torch.export.export`` captures it whole (deformable attention as the custom op
``torch.ops.codetr.ms_deform_attn``), also with dynamic batch, height and width. The rest of the model's
post-processing (soft-NMS when the config uses it) is ``model.postprocessor.merge``, run per image on the outputs.

:func:`set_deform_attn_impl` switches every deformable-attention module of a model between the compiled
kernels ("auto") and the ``grid_sample`` formulation ("pytorch", what ONNX export emits as standard ops).
"""
from typing import Tuple

import torch
from torch import nn

from codetr.layers import MultiScaleDeformableAttention

__all__ = ["DetectorForExport", "set_deform_attn_impl"]


def set_deform_attn_impl(model: nn.Module, impl: str) -> int:
    """Set ``impl`` ("auto" | "pytorch") on every :class:`MultiScaleDeformableAttention` of ``model``; returns
    how many modules were set."""
    if impl not in MultiScaleDeformableAttention.IMPLS:
        raise ValueError(f"impl must be one of {MultiScaleDeformableAttention.IMPLS}, got {impl!r}")
    n = 0
    for m in model.modules():
        if isinstance(m, MultiScaleDeformableAttention):
            m.impl = impl
            n += 1
    return n


class DetectorForExport(nn.Module):
    """
    ``forward(images) -> (boxes, scores, labels)``: the top-k candidates of :meth:`DETRPostProcessor.candidates`:
    boxes (B, k, 4) XYXY in pixels of the input, scores (B, k) decreasing, labels (B, k) int64;
    k = ``model.postprocessor.max_per_img``.

    Args:
        model: a CoDETR (its one-to-one query head makes the detections; the auxiliary heads are not run).

    ``images``: (B, 3, H, W), uint8 or float, in ``model.input_format`` channel order, already resized;
    H and W must be multiples of ``model.size_divisibility`` (the model pads to them; here nothing is padded,
    so each image counts as its full size, as :class:`CoDETR` does for an unpadded image).
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        if getattr(model, "eval_module", "detr") != "detr":
            raise ValueError(f"DetectorForExport runs the one-to-one query head; model.eval_module is {model.eval_module!r}")
        self.model = model

    def forward(self, images: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        m = self.model
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W), got shape {tuple(images.shape)}")
        d = m.size_divisibility
        if d > 1:
            torch._check(images.shape[2] % d == 0, lambda: f"image height must be a multiple of {d}")
            torch._check(images.shape[3] % d == 0, lambda: f"image width must be a multiple of {d}")
        B, _, H, W = images.shape
        x = (images.to(m.pixel_mean.dtype) - m.pixel_mean) / m.pixel_std
        masks = torch.zeros(B, H, W, dtype=torch.bool, device=x.device)
        sizes = torch.stack([torch.scalar_tensor(H), torch.scalar_tensor(W)]).to(x.device).expand(B, 2)
        logits, boxes = m.query_head(m.neck(m.backbone(x)), masks, None, sizes)
        return m.postprocessor.candidates(logits, boxes, sizes)
