"""DETRPostProcessor: a query head's raw outputs -> per-image detections (top-k, optional soft-NMS)."""
from typing import Dict, List

import torch
from torch import nn
from torchvision.ops import box_convert

from .soft_nms import batched_soft_nms

__all__ = ["DETRPostProcessor"]


class DETRPostProcessor(nn.Module):
    """
    Top-k over the flattened (query x class) sigmoid scores of the last decoder layer, boxes to XYXY pixels of the
    normalisation size (clamped to it), then optionally class-aware soft-NMS (every official Co-DINO config;
    Co-Deformable-DETR uses none and keeps the top 100).

    Args:
        max_per_img: detections kept per image.
        soft_nms: apply class-aware soft-NMS to the top-k, then keep ``max_per_img``.
        soft_nms_iou_threshold / soft_nms_sigma / soft_nms_min_score / soft_nms_method: its settings
            (:func:`codetr.modeling.soft_nms.batched_soft_nms`).
    """

    def __init__(
        self,
        max_per_img: int = 300,
        soft_nms: bool = True,
        soft_nms_iou_threshold: float = 0.8,
        soft_nms_sigma: float = 0.5,
        soft_nms_min_score: float = 1e-3,
        soft_nms_method: str = "linear",
    ):
        super().__init__()
        if max_per_img <= 0:
            raise ValueError(f"max_per_img must be positive, got {max_per_img}")
        self.max_per_img = max_per_img
        self.soft_nms = soft_nms
        self.soft_nms_cfg = dict(
            iou_threshold=soft_nms_iou_threshold, sigma=soft_nms_sigma, min_score=soft_nms_min_score, method=soft_nms_method
        )

    @torch.no_grad()
    def forward(self, logits: torch.Tensor, boxes: torch.Tensor, image_sizes: torch.Tensor) -> List[Dict[str, torch.Tensor]]:
        """
        Args:
            logits: (B, N, K); boxes: (B, N, 4) normalised cxcywh; image_sizes: (B, 2) (h, w) of the normalisation.

        Returns:
            per image ``boxes`` (M, 4) XYXY in pixels of the normalisation size, ``scores`` (M,), ``labels`` (M,).
        """
        B, N, K = logits.shape
        out = []
        for b in range(B):
            prob = logits[b].float().sigmoid().flatten()
            k = min(self.max_per_img, prob.numel())
            scores, idx = prob.topk(k)
            labels = idx % K
            qidx = torch.div(idx, K, rounding_mode="floor")
            h, w = image_sizes[b].tolist()
            scale = torch.tensor([w, h, w, h], dtype=torch.float32, device=logits.device)
            xyxy = box_convert(boxes[b, qidx].float(), "cxcywh", "xyxy") * scale
            xyxy[:, 0::2] = xyxy[:, 0::2].clamp(0, w)
            xyxy[:, 1::2] = xyxy[:, 1::2].clamp(0, h)
            if self.soft_nms:
                keep, scores = batched_soft_nms(xyxy, scores, labels, **self.soft_nms_cfg)
                keep, scores = keep[: self.max_per_img], scores[: self.max_per_img]
                xyxy, labels = xyxy[keep], labels[keep]
            out.append(dict(boxes=xyxy, scores=scores, labels=labels))
        return out
