"""Class-aware soft-NMS (linear or Gaussian), as used at test time by every official Co-DINO config."""
from typing import Tuple

import torch
from torchvision.ops import box_iou

__all__ = ["batched_soft_nms"]


def batched_soft_nms(
    boxes: torch.Tensor,
    scores: torch.Tensor,
    labels: torch.Tensor,
    iou_threshold: float = 0.8,
    sigma: float = 0.5,
    min_score: float = 1e-3,
    method: str = "linear",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """
    Soft-NMS within each class: repeatedly take the highest-scoring remaining box and decay the
    scores of the other boxes of its class, by ``(1 - IoU)`` where IoU > ``iou_threshold``
    ("linear") or by ``exp(-IoU^2 / sigma)`` ("gaussian"). Boxes whose decayed score falls below
    ``min_score`` are dropped.

    The IoU matrix is computed once; the N picking steps are tensor operations without host syncs.

    Args:
        boxes: (N, 4) XYXY; scores: (N,); labels: (N,) int64.

    Returns:
        keep: (M,) indices into the inputs, by decreasing new score; new_scores: (M,).
    """
    if method not in ("linear", "gaussian"):
        raise ValueError(f"method must be 'linear' or 'gaussian', got {method!r}")
    N = boxes.shape[0]
    if N == 0:
        return torch.zeros(0, dtype=torch.int64, device=boxes.device), scores.new_zeros(0)
    iou = box_iou(boxes.float(), boxes.float())
    iou = iou.masked_fill(labels[:, None] != labels[None, :], 0.0)
    if method == "linear":
        decay = torch.where(iou > iou_threshold, 1.0 - iou, torch.ones_like(iou))
    else:
        decay = torch.exp(-(iou * iou) / sigma)
    cur = scores.float().clone()
    alive = torch.ones(N, dtype=torch.bool, device=boxes.device)
    order = torch.empty(N, dtype=torch.int64, device=boxes.device)
    final = torch.empty(N, dtype=torch.float32, device=boxes.device)
    neg = torch.tensor(-1.0, device=boxes.device)
    for step in range(N):
        masked = torch.where(alive, cur, neg)
        i = masked.argmax()
        order[step] = i
        final[step] = cur[i]
        alive[i] = False
        cur = torch.where(alive, cur * decay[i], cur)
    keep = final >= min_score
    return order[keep], final[keep].to(scores.dtype)
