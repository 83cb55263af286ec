"""DETRPostProcessor: a query head's raw outputs -> per-image detections (top-k, optional soft-NMS)."""
from typing import Dict, List, Optional, Tuple

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

    As the official head: without soft-NMS the top ``max_per_img`` (query, class) pairs are the detections; with
    soft-NMS the top ``num_candidates`` pairs (default: as many as there are queries, the official ``num_query``,
    900 for R50 / 1500 for ViT-L) go through soft-NMS and its first ``max_per_img`` are kept, so a candidate ranked
    below ``max_per_img`` before soft-NMS can survive in place of a suppressed duplicate.

    Args:
        max_per_img: detections kept per image.
        soft_nms: apply class-aware soft-NMS to the top ``num_candidates``, then keep ``max_per_img``.
        num_candidates: candidates given to soft-NMS (None: the number of queries N of the logits).
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
        num_candidates: Optional[int] = None,
    ):
        super().__init__()
        if max_per_img <= 0:
            raise ValueError(f"max_per_img must be positive, got {max_per_img}")
        if num_candidates is not None and num_candidates <= 0:
            raise ValueError(f"num_candidates must be positive or None, got {num_candidates}")
        self.max_per_img = max_per_img
        self.num_candidates = num_candidates
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
        xyxy, scores, labels = self.candidates(logits, boxes, image_sizes)
        if not self.soft_nms:
            return [dict(boxes=b, scores=s, labels=l) for b, s, l in zip(xyxy, scores, labels)]
        return [self.merge(b, s, l) for b, s, l in zip(xyxy, scores, labels)]

    def candidates(
        self, logits: torch.Tensor, boxes: torch.Tensor, image_sizes: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """
        The first step, batched and free of host syncs and data-dependent shapes (what ONNX / torch.export
        graphs end with): the top k of the flattened (query x class) sigmoid scores, boxes to XYXY pixels of
        ``image_sizes`` clamped to them; k = ``max_per_img`` without soft-NMS, ``num_candidates`` (default N) with it.

        Returns:
            boxes (B, k, 4), scores (B, k) in decreasing order, labels (B, k) int64 (k at most N * K).
        """
        B, N, K = logits.shape
        prob = logits.float().sigmoid().flatten(1)
        k = (self.num_candidates or N) if self.soft_nms else self.max_per_img
        scores, idx = prob.topk(min(k, N * K), dim=1)
        labels = idx % K
        qidx = torch.div(idx, K, rounding_mode="floor")
        picked = boxes.float().gather(1, qidx[..., None].expand(-1, -1, 4))
        scale = image_sizes.to(torch.float32).flip(-1).repeat(1, 2)[:, None]  # (B, 1, 4): w, h, w, h
        xyxy = box_convert(picked, "cxcywh", "xyxy") * scale
        xyxy = torch.minimum(xyxy.clamp(min=0), scale)
        return xyxy, scores, labels

    def merge(self, boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor) -> Dict[str, torch.Tensor]:
        """
        The second step, for one image: class-aware soft-NMS when configured, then the best ``max_per_img``.
        Also what merges the candidates of several test-time augmentations (concatenated, in one coordinate
        frame) and what deployment runs after an exported graph's :meth:`candidates`.

        Args:
            boxes: (M, 4) XYXY; scores: (M,); labels: (M,) int64.

        Returns:
            ``boxes``, ``scores`` (decreasing), ``labels``, at most ``max_per_img`` of them.
        """
        if self.soft_nms:
            keep, scores = batched_soft_nms(boxes, scores, labels, **self.soft_nms_cfg)
        else:
            scores, keep = scores.topk(min(self.max_per_img, scores.numel()))
        keep, scores = keep[: self.max_per_img], scores[: self.max_per_img]
        return dict(boxes=boxes[keep], scores=scores, labels=labels[keep])
