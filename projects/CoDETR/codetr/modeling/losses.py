"""Losses of the query heads: quality focal loss, L1 and GIoU helpers, and the all-reduced loss normaliser (the
sigmoid focal loss is fvcore's, re-exported)."""
from typing import Optional, Union

import torch
import torch.distributed as dist
import torch.nn.functional as F
from fvcore.nn import sigmoid_focal_loss
from torchvision.ops import box_convert

__all__ = [
    "all_reduce_normalizer",
    "quality_focal_loss",
    "sigmoid_focal_loss",
    "weighted_l1_loss",
    "weighted_giou_loss",
    "giou_loss_elementwise",
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
    # one-hot of the label (none for background) times its quality: no index with a data-dependent size
    onehot = (labels[:, None] == torch.arange(num_classes, device=labels.device)).to(logits.dtype)
    target = onehot * quality.float()[:, None]
    loss = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    return (loss * (target - prob).abs().pow(beta)).sum(dim=1)


def weighted_l1_loss(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Sum over boxes and coordinates of ``weights * |pred - target|``; pred/target (N, 4), weights (N,)."""
    return ((pred.float() - target.float()).abs().sum(-1) * weights).sum()


def giou_loss_elementwise(pred: torch.Tensor, target: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``1 - GIoU`` of corresponding rows of two (N, 4) XYXY tensors -> (N,), in the form of mmdet's ``GIoULoss``
    (the official one): union and enclosing area each clamped to >= ``eps``. Use it on boxes in pixels: on
    normalised boxes (areas ~1e-4) the eps would bias small boxes."""
    lt = torch.max(pred[:, :2], target[:, :2])
    rb = torch.min(pred[:, 2:], target[:, 2:])
    wh = (rb - lt).clamp(min=0)
    overlap = wh[:, 0] * wh[:, 1]
    area_p = (pred[:, 2] - pred[:, 0]) * (pred[:, 3] - pred[:, 1])
    area_t = (target[:, 2] - target[:, 0]) * (target[:, 3] - target[:, 1])
    union = (area_p + area_t - overlap).clamp(min=eps)
    enclose_wh = (torch.max(pred[:, 2:], target[:, 2:]) - torch.min(pred[:, :2], target[:, :2])).clamp(min=0)
    enclose = (enclose_wh[:, 0] * enclose_wh[:, 1]).clamp(min=eps)
    return 1 - (overlap / union - (enclose - union) / enclose)


def weighted_giou_loss(
    pred_cxcywh: torch.Tensor, target_cxcywh: torch.Tensor, weights: torch.Tensor, scale: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Sum over boxes of ``weights * (1 - GIoU)``; boxes (N, 4) normalised cxcywh, weights (N,).

    As the official loss, the boxes are first scaled to pixels by ``scale`` ((N, 4) or (4,): (w, h, w, h) of each
    box's image; None: left normalised) and GIoU uses eps 1e-6 (:func:`giou_loss_elementwise`).
    """
    # every box, weighted (zero weights give exact zeros: the clamps keep degenerate rows finite), so that no
    # data-dependent selection syncs the host
    p = box_convert(pred_cxcywh.float(), "cxcywh", "xyxy")
    t = box_convert(target_cxcywh.float(), "cxcywh", "xyxy")
    if scale is not None:
        s = scale.float()
        p, t = p * s, t * s
    return (giou_loss_elementwise(p, t) * weights).sum()
