"""Losses of the query heads: quality focal loss, L1 and GIoU helpers, and the all-reduced loss normaliser (the
sigmoid focal loss is fvcore's, re-exported)."""
from typing import Optional, Union

import torch
import torch.distributed as dist
import torch.nn.functional as F
from fvcore.nn import giou_loss, sigmoid_focal_loss
from torchvision.ops import box_convert

__all__ = [
    "all_reduce_normalizer",
    "quality_focal_loss",
    "sigmoid_focal_loss",
    "weighted_l1_loss",
    "weighted_giou_loss",
]


def all_reduce_normalizer(num: Union[int, float, torch.Tensor], device: Optional[torch.device] = None) -> torch.Tensor:
    """
    A loss normaliser: the mean of ``num`` over all processes (as the official ``reduce_mean``),
    clamped to >= 1.

    Args:
        num: a count on this process (Python number or tensor).
        device: where to put the result when ``num`` is a Python number (with NCCL it must be the
            process's GPU).

    Returns:
        0-dim float32 tensor.
    """
    if isinstance(num, torch.Tensor):
        t = num.detach().to(dtype=torch.float32).reshape(())
        if device is not None:
            t = t.to(device)
    else:
        t = torch.tensor(float(num), dtype=torch.float32, device=device)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        t = t.clone()
        dist.all_reduce(t)
        t = t / dist.get_world_size()
    return t.clamp(min=1.0)


def quality_focal_loss(
    logits: torch.Tensor, labels: torch.Tensor, quality: torch.Tensor, beta: float = 2.0
) -> torch.Tensor:
    """
    Quality focal loss (Generalized Focal Loss): sigmoid BCE whose target for the labelled class is
    the quality score (IoU), modulated by ``|target - sigmoid|^beta``; every other class has target 0.

    Args:
        logits: (N, K) class logits.
        labels: (N,) int64 in [0, K]; K means background (all targets 0).
        quality: (N,) float, the target score of the labelled class (ignored for background).

    Returns:
        (N,) loss per sample, summed over classes.
    """
    logits = logits.float()
    prob = logits.sigmoid()
    num_classes = logits.shape[1]
    target = torch.zeros_like(logits)
    pos = labels < num_classes
    pos_idx = pos.nonzero(as_tuple=True)[0]
    target[pos_idx, labels[pos_idx]] = quality[pos_idx].float().to(target.dtype)
    loss = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    return (loss * (target - prob).abs().pow(beta)).sum(dim=1)


def weighted_l1_loss(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Sum over boxes and coordinates of ``weights * |pred - target|``; pred/target (N, 4), weights (N,)."""
    return ((pred.float() - target.float()).abs().sum(-1) * weights).sum()


def weighted_giou_loss(pred_cxcywh: torch.Tensor, target_cxcywh: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Sum over boxes of ``weights * (1 - GIoU)``; boxes (N, 4) normalised cxcywh, weights (N,).

    GIoU is invariant to separate x/y scaling, so normalised boxes give the same loss as boxes in pixels.
    """
    keep = weights > 0
    if not bool(keep.any()):
        return pred_cxcywh.sum() * 0.0
    p = box_convert(pred_cxcywh[keep].float(), "cxcywh", "xyxy")
    t = box_convert(target_cxcywh[keep].float(), "cxcywh", "xyxy")
    return (giou_loss(p, t, reduction="none") * weights[keep]).sum()
