"""Hungarian matcher between predictions and ground truth (focal class cost, L1 and GIoU box costs)."""
from typing import Dict, List, Tuple

import torch
from scipy.optimize import linear_sum_assignment
from torch import nn
from torchvision.ops import box_convert, generalized_box_iou

__all__ = ["HungarianMatcher", "focal_class_cost"]


def focal_class_cost(logits: torch.Tensor, labels: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0) -> torch.Tensor:
    """
    The focal-loss classification cost of DINO / Deformable-DETR.

    Args:
        logits: (Q, K) class logits; labels: (G,) int64 class ids.

    Returns:
        (Q, G): focal loss of "positive for that class" minus that of "negative for that class".
    """
    eps = 1e-12
    prob = logits.sigmoid()
    neg = -(1 - prob + eps).log() * (1 - alpha) * prob.pow(gamma)
    pos = -(prob + eps).log() * alpha * (1 - prob).pow(gamma)
    return pos[:, labels] - neg[:, labels]


class HungarianMatcher(nn.Module):
    """
    One-to-one assignment minimising ``w_cls * focal + w_l1 * L1(cxcywh) - w_giou * GIoU`` per image,
    solved with scipy's ``linear_sum_assignment``.

    Costs are always computed in float32 (autocast disabled); non-finite entries (from a diverged
    or overflowing model) are replaced by large finite values, so scipy never sees NaN/Inf.
    """

    def __init__(
        self, cost_class: float = 2.0, cost_bbox: float = 5.0, cost_giou: float = 2.0, alpha: float = 0.25, gamma: float = 2.0
    ):
        super().__init__()
        self.cost_class = cost_class
        self.cost_bbox = cost_bbox
        self.cost_giou = cost_giou
        self.alpha = alpha
        self.gamma = gamma

    def cost_matrix(self, logits: torch.Tensor, boxes: torch.Tensor, gt_labels: torch.Tensor, gt_boxes: torch.Tensor):
        """(Q, K) logits, (Q, 4) cxcywh boxes vs (G,) labels, (G, 4) cxcywh boxes -> (Q, G) float32 cost."""
        with torch.autocast(device_type=logits.device.type, enabled=False):
            logits = logits.float()
            boxes = boxes.float()
            gt_boxes = gt_boxes.float()
            c_cls = focal_class_cost(logits, gt_labels, self.alpha, self.gamma)
            c_l1 = torch.cdist(boxes, gt_boxes, p=1)
            c_giou = -generalized_box_iou(box_convert(boxes, "cxcywh", "xyxy"), box_convert(gt_boxes, "cxcywh", "xyxy"))
            cost = self.cost_class * c_cls + self.cost_bbox * c_l1 + self.cost_giou * c_giou
            return torch.nan_to_num(cost, nan=1e8, posinf=1e8, neginf=-1e8)

    @torch.no_grad()
    def forward(self, logits: torch.Tensor, boxes: torch.Tensor, targets: List[Dict[str, torch.Tensor]]) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        """
        Args:
            logits: (B, Q, K); boxes: (B, Q, 4) normalised cxcywh.
            targets: per image ``labels`` (G_b,) int64 and ``boxes`` (G_b, 4) normalised cxcywh.

        Returns:
            per image (query_idx, gt_idx), int64 CPU tensors of equal length min(Q, G_b),
            sorted by query index.
        """
        sizes = [len(t["labels"]) for t in targets]
        if sum(sizes) == 0:
            empty = torch.zeros(0, dtype=torch.int64)
            return [(empty, empty) for _ in targets]
        B, Q = logits.shape[:2]
        gt_labels = torch.cat([t["labels"] for t in targets])
        gt_boxes = torch.cat([t["boxes"] for t in targets])
        cost = self.cost_matrix(logits.flatten(0, 1), boxes.flatten(0, 1), gt_labels, gt_boxes)
        cost = cost.view(B, Q, -1).cpu()
        out = []
        for b, c in enumerate(cost.split(sizes, -1)):
            rows, cols = linear_sum_assignment(c[b].numpy())
            out.append((torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)))
        return out
