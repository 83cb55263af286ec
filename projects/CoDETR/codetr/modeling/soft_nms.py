"""Class-aware soft-NMS (linear or Gaussian), as used at test time by every official Co-DINO config.

The work is one call of ``codetr._C.soft_nms``: a C++ kernel on the CPU, one CUDA block on a GPU (every picking
step inside the kernel; the host reads only the number of kept boxes, once, to size the outputs). Without the
built extension (or on a device it was not built for) a pure-PyTorch loop over the picks is used, with a warning:
it gives the same result but reads ~3 scalars per box from the device.
"""
import warnings
from typing import Tuple

import torch
from torchvision.ops import box_iou

__all__ = ["batched_soft_nms"]

try:
    from codetr import _C
except ImportError:  # not built: the PyTorch loop is used
    _C = None

_warned = False


def _kernel_available(device: torch.device) -> bool:
    if _C is None or not hasattr(_C, "soft_nms"):
        return False
    return device.type == "cpu" or (device.type == "cuda" and _C.with_cuda())


def _soft_nms_pytorch(boxes, scores, labels, iou_threshold, sigma, min_score, gaussian):
    """Fallback without the extension: the whole IoU matrix, then one pick per step (host syncs per pick)."""
    n = boxes.shape[0]
    iou = box_iou(boxes, boxes).nan_to_num(0.0)  # 0 / 0 for two empty boxes: IoU 0, as the kernels
    iou = iou.masked_fill(labels[:, None] != labels[None, :], 0.0)
    if gaussian:
        decay = torch.exp(-(iou * iou) / sigma)
    else:
        decay = torch.where(iou > iou_threshold, 1.0 - iou, torch.ones_like(iou))
    cur = scores.clone()
    alive = torch.ones(n, dtype=torch.bool, device=boxes.device)
    order = torch.empty(n, dtype=torch.int64, device=boxes.device)
    final = torch.empty(n, dtype=torch.float32, device=boxes.device)
    for step in range(n):
        i = torch.where(alive, cur, torch.full_like(cur, -float("inf"))).argmax()
        order[step] = i
        final[step] = cur[i]
        alive[i] = False
        cur = torch.where(alive, cur * decay[i], cur)
    keep = final >= min_score
    return order[keep], final[keep]


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
    Soft-NMS within each class: repeatedly take the highest-scoring remaining box (the lowest index on ties) and
    decay the scores of the other boxes of its class, by ``(1 - IoU)`` where IoU > ``iou_threshold`` ("linear")
    or by ``exp(-IoU^2 / sigma)`` ("gaussian"). Boxes whose decayed score falls below ``min_score`` are dropped.
    IoU is computed in float32 as torchvision's ``box_iou`` (0 for two empty boxes).

    Args:
        boxes: (N, 4) XYXY; scores: (N,); labels: (N,) int64.

    Returns:
        keep: (M,) indices into the inputs, by decreasing new score; new_scores: (M,) in the dtype of ``scores``.
    """
    global _warned
    if method not in ("linear", "gaussian"):
        raise ValueError(f"method must be 'linear' or 'gaussian', got {method!r}")
    if boxes.dim() != 2 or boxes.shape[-1] != 4 or scores.shape != boxes.shape[:1] or labels.shape != boxes.shape[:1]:
        raise ValueError(f"soft-NMS needs boxes (N, 4), scores (N,), labels (N,); got {tuple(boxes.shape)}, "
                         f"{tuple(scores.shape)}, {tuple(labels.shape)}")
    args = (boxes.float().contiguous(), scores.float().contiguous(), labels.long().contiguous())
    if boxes.shape[0] == 0:
        return torch.zeros(0, dtype=torch.int64, device=boxes.device), scores.new_zeros(0)
    if _kernel_available(boxes.device):
        keep, new_scores = _C.soft_nms(*args, float(iou_threshold), float(sigma), float(min_score),
                                       method == "gaussian")
    else:
        if not _warned:
            warnings.warn("codetr._C has no soft-NMS kernel for this device: using the slow PyTorch loop "
                          "(build the extension: python setup.py build_ext --inplace)")
            _warned = True
        keep, new_scores = _soft_nms_pytorch(*args, iou_threshold, sigma, min_score, method == "gaussian")
    return keep, new_scores.to(scores.dtype)
