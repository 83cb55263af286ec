"""DETRCriterion: the losses of a one-to-one DETR query head, shared by every DETR variant.

One criterion serves the four kinds of query a Co-DETR query head trains:

- the **decoder's matching queries** (:meth:`DETRCriterion.decoder_losses`): Hungarian matching per decoder
  layer, then classification + L1 + GIoU;
- the **encoder proposals** of two-stage DETRs (:meth:`DETRCriterion.encoder_losses`): the same, on the proposals
  the head passes (Co-DINO: the top-K; Deformable-DETR: every token), with the GT classes or, with
  ``binary_encoder_labels=True``, every GT labelled class 0;
- the **denoising queries** (``dn`` argument of :meth:`decoder_losses`): fixed dense targets, no matching;
- the **positive queries** of the collaborative branch (:meth:`DETRCriterion.positive_query_losses`): dense targets
  from an auxiliary head's assignment, scaled by ``lambda_1``.

All four end in :meth:`DETRCriterion.loss_from_targets`: each loss is a weighted sum divided by the number of
positives averaged over processes (``losses.all_reduce_normalizer``, clamped to >= 1). Dense targets are
``(labels (B, N) int64 with num_classes = background, label_weights (B, N), boxes (B, N, 4) normalised cxcywh,
box_weights (B, N), num_pos)``.
"""
from typing import Dict, Optional, Sequence, Tuple

import torch
from fvcore.nn import sigmoid_focal_loss
from torch import nn
from torchvision.ops import box_convert

from detectron2.structures import Boxes
from detectron2.structures.boxes import matched_pairwise_iou

from .losses import all_reduce_normalizer, quality_focal_loss, weighted_giou_loss, weighted_l1_loss
from .matcher import HungarianMatcher

__all__ = ["DETRCriterion", "validate_targets", "layer_key"]

LOSS_NAMES = ("loss_cls", "loss_bbox", "loss_iou")


def validate_targets(targets: Sequence[Dict[str, torch.Tensor]], num_classes: int) -> None:
    """
    Raise ValueError naming the image when a target has a class id outside [0, num_classes), a
    non-finite box, or a box with zero or negative width/height.

    Args:
        targets: per image ``labels`` (n,), ``boxes`` (n, 4) normalised cxcywh, optional ``name`` (str).
    """
    flags = []
    for t in targets:
        labels, boxes = t["labels"], t["boxes"]
        if boxes.ndim != 2 or boxes.shape[-1] != 4 or labels.ndim != 1 or len(labels) != len(boxes):
            raise ValueError(
                f"image {t.get('name', '?')}: expected labels (n,) and boxes (n, 4), got {tuple(labels.shape)} and {tuple(boxes.shape)}"
            )
        if len(labels) == 0:
            flags.append(labels.new_zeros(3, dtype=torch.bool))
            continue
        flags.append(
            torch.stack(
                [
                    ((labels < 0) | (labels >= num_classes)).any(),
                    (~torch.isfinite(boxes)).any(),
                    (boxes[:, 2:] <= 0).any(),
                ]
            )
        )
    if not flags:
        return
    flags = torch.stack(flags).cpu()
    if not bool(flags.any()):
        return
    for b, (t, f) in enumerate(zip(targets, flags.tolist())):
        name = t.get("name", f"#{b} of the batch")
        if f[0]:
            bad = t["labels"][(t["labels"] < 0) | (t["labels"] >= num_classes)].tolist()
            raise ValueError(f"image {name}: gt class ids {bad} are outside [0, {num_classes}) (num_classes={num_classes})")
        if f[1]:
            raise ValueError(f"image {name}: gt boxes contain NaN or Inf")
        if f[2]:
            raise ValueError(f"image {name}: gt boxes with zero or negative width/height (degenerate boxes)")


def layer_key(name: str, layer: int, num_layers: int, suffix: str = "") -> str:
    """Loss key of decoder layer ``layer``: the last layer unprefixed, earlier ones ``d{layer}.`` (official names)."""
    prefix = "" if layer == num_layers - 1 else f"d{layer}."
    return f"{prefix}{name}{suffix}"


class DETRCriterion(nn.Module):
    """
    Hungarian matching and the classification / L1 / GIoU losses of a one-to-one query head.

    Args:
        num_classes: number of foreground classes (label ``num_classes`` = background).
        matcher: a :class:`HungarianMatcher` (default: costs 2 / 5 / 2, focal class cost).
        loss_cls_weight / loss_bbox_weight / loss_giou_weight: Co-DINO 1 / 5 / 2, Co-Deformable-DETR 2 / 5 / 2.
        cls_loss: "qfl" (quality focal loss with IoU targets, Co-DINO) or "focal" (sigmoid focal loss).
        qfl_beta, focal_alpha, focal_gamma: their parameters.
        lambda_1: weight of the positive-query losses of the collaborative branch.
        binary_encoder_labels: the encoder proposals learn "object / not object" as class 0 (Deformable-DETR's
            two-stage) instead of the GT classes (DINO).
    """

    def __init__(
        self,
        *,
        num_classes: int,
        matcher: Optional[HungarianMatcher] = None,
        loss_cls_weight: float = 1.0,
        loss_bbox_weight: float = 5.0,
        loss_giou_weight: float = 2.0,
        cls_loss: str = "qfl",
        qfl_beta: float = 2.0,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        lambda_1: float = 1.0,
        binary_encoder_labels: bool = False,
    ):
        super().__init__()
        if cls_loss not in ("qfl", "focal"):
            raise ValueError(f"cls_loss must be 'qfl' or 'focal', got {cls_loss!r}")
        if num_classes <= 0:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        self.num_classes = num_classes
        self.matcher = matcher if matcher is not None else HungarianMatcher()
        self.loss_cls_weight = loss_cls_weight
        self.loss_bbox_weight = loss_bbox_weight
        self.loss_giou_weight = loss_giou_weight
        self.cls_loss = cls_loss
        self.qfl_beta = qfl_beta
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        self.lambda_1 = lambda_1
        self.binary_encoder_labels = binary_encoder_labels

    # ------------------------------------------------------------------ one layer
    def loss_from_targets(
        self,
        logits: torch.Tensor,
        boxes: torch.Tensor,
        labels: torch.Tensor,
        label_weights: torch.Tensor,
        target_boxes: torch.Tensor,
        box_weights: torch.Tensor,
        num_pos,
        image_sizes: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """
        Weighted classification, L1 and GIoU losses of one layer, each divided by the all-reduced
        number of positives (>= 1).

        Args:
            logits: (B, N, K); boxes: (B, N, 4) cxcywh; labels: (B, N) (K = background);
            label_weights: (B, N); target_boxes: (B, N, 4) cxcywh; box_weights: (B, N);
            num_pos: number of positive queries in the batch on this process (int or tensor).
            image_sizes: (B, 2) (h, w) of the normalisation: the GIoU loss is computed on boxes scaled to these
                pixels (eps 1e-6), as the official head; None: on the normalised boxes.
        """
        B, N = boxes.shape[:2]
        scale = None
        if image_sizes is not None:
            scale = image_sizes.to(boxes.device, torch.float32).flip(-1).repeat(1, 2)  # (B, 4) (w, h, w, h)
            scale = scale[:, None, :].expand(B, N, 4).reshape(-1, 4)
        K = logits.shape[-1]
        logits = logits.reshape(-1, K)
        boxes = boxes.reshape(-1, 4).float()
        labels = labels.reshape(-1)
        label_weights = label_weights.reshape(-1).float()
        target_boxes = target_boxes.reshape(-1, 4).float()
        box_weights = box_weights.reshape(-1).float()
        norm = all_reduce_normalizer(num_pos, device=logits.device)
        with torch.autocast(device_type=logits.device.type, enabled=False):
            if self.cls_loss == "qfl":
                pos = labels < K
                # the IoU of every query (no selection of the positives: no host sync), kept where positive;
                # the predictions are detached, so whatever a background slot gives is never differentiated
                q = matched_pairwise_iou(
                    Boxes(box_convert(boxes.detach(), "cxcywh", "xyxy")),
                    Boxes(box_convert(target_boxes, "cxcywh", "xyxy")),
                )
                quality = torch.where(pos, q, torch.zeros_like(q))
                cls = quality_focal_loss(logits, labels, quality, self.qfl_beta)
            else:
                onehot = (labels[:, None] == torch.arange(K, device=labels.device)).float()  # F.one_hot syncs
                cls = sigmoid_focal_loss(
                    logits.float(), onehot, alpha=self.focal_alpha, gamma=self.focal_gamma, reduction="none"
                ).sum(-1)
            loss_cls = (cls * label_weights).sum() / norm
            loss_bbox = weighted_l1_loss(boxes, target_boxes, box_weights) / norm
            loss_giou = weighted_giou_loss(boxes, target_boxes, box_weights, scale) / norm
        return loss_cls * self.loss_cls_weight, loss_bbox * self.loss_bbox_weight, loss_giou * self.loss_giou_weight

    def matched_targets(self, logits, boxes, targets):
        """Hungarian-match one layer; returns dense (labels, label_weights, target_boxes, box_weights, num_pos)."""
        B, N = logits.shape[:2]
        device = logits.device
        indices = self.matcher(logits.detach(), boxes.detach(), targets)
        labels = torch.full((B, N), self.num_classes, dtype=torch.int64, device=device)
        tboxes = torch.zeros(B, N, 4, device=device)
        bweights = torch.zeros(B, N, device=device)
        bidx = torch.cat([torch.full_like(q, b) for b, (q, _) in enumerate(indices)]).to(device)
        qidx = torch.cat([q for q, _ in indices]).to(device)
        gl = torch.cat([t["labels"][g.to(device)] for t, (_, g) in zip(targets, indices)])
        gb = torch.cat([t["boxes"][g.to(device)].float() for t, (_, g) in zip(targets, indices)])
        labels[bidx, qidx] = gl
        tboxes[bidx, qidx] = gb
        bweights[bidx, qidx] = 1.0
        return labels, torch.ones(B, N, device=device), tboxes, bweights, int(qidx.numel())

    def match_loss(self, logits, boxes, targets, image_sizes=None):
        """Hungarian matching then :meth:`loss_from_targets` for one layer (B, N, K) / (B, N, 4)."""
        return self.loss_from_targets(logits, boxes, *self.matched_targets(logits, boxes, targets), image_sizes)

    # ------------------------------------------------------------------ the query kinds
    def encoder_losses(self, logits: torch.Tensor, boxes: torch.Tensor, targets, image_sizes=None) -> Dict[str, torch.Tensor]:
        """
        Losses of the two-stage encoder proposals (keys ``enc_loss_cls``, ``enc_loss_bbox``, ``enc_loss_iou``).

        Args:
            logits: (B, S, K), boxes: (B, S, 4) normalised cxcywh: the proposals the head supervises.
            targets: per image ``labels``, ``boxes``; with ``binary_encoder_labels`` every label counts as 0.
        """
        if self.binary_encoder_labels:
            targets = [dict(t, labels=torch.zeros_like(t["labels"])) for t in targets]
        return {"enc_" + n: v for n, v in zip(LOSS_NAMES, self.match_loss(logits, boxes, targets, image_sizes))}

    def decoder_losses(
        self, logits: torch.Tensor, boxes: torch.Tensor, targets, dn=None, image_sizes=None
    ) -> Dict[str, torch.Tensor]:
        """
        Hungarian-matched losses of every decoder layer, and optionally the denoising queries' losses.

        Args:
            logits: (L, B, N, K), boxes: (L, B, N, 4) normalised cxcywh of the matching queries.
            targets: per image ``labels``, ``boxes``.
            dn: optional ``(dn_logits (L, B, P, K), dn_boxes (L, B, P, 4), dense targets)``.

        Returns:
            ``loss_cls`` / ``loss_bbox`` / ``loss_iou`` (last layer), ``d{k}.``-prefixed keys for earlier layers,
            and the same with ``dn_`` (``dn_loss_cls``, ``d0.dn_loss_cls``, ...) for the denoising queries.
        """
        losses = {}
        L = logits.shape[0]
        for lvl in range(L):
            for n, v in zip(LOSS_NAMES, self.match_loss(logits[lvl], boxes[lvl], targets, image_sizes)):
                losses[layer_key(n, lvl, L)] = v
            if dn is not None:
                dn_logits, dn_boxes, dn_targets = dn
                dn_losses = self.loss_from_targets(dn_logits[lvl], dn_boxes[lvl], *dn_targets, image_sizes)
                for n, v in zip(LOSS_NAMES, dn_losses):
                    losses[layer_key("dn_" + n, lvl, L)] = v
        return losses

    def positive_query_losses(
        self, logits: torch.Tensor, boxes: torch.Tensor, targets: Dict[str, torch.Tensor], head_idx: int,
        image_sizes: Optional[torch.Tensor] = None,
    ) -> Dict[str, torch.Tensor]:
        """
        Losses of the positive queries of auxiliary head ``head_idx`` at every decoder layer, scaled by ``lambda_1``.

        Args:
            logits: (L, B, N, K), boxes: (L, B, N, 4).
            targets: ``labels`` (B, N) int64 (num_classes = background), ``label_weights`` (B, N),
                ``boxes`` (B, N, 4) normalised cxcywh, ``box_weights`` (B, N).

        Returns:
            ``loss_cls_aux{i}``, ``loss_bbox_aux{i}``, ``loss_iou_aux{i}`` and ``d{k}.``-prefixed keys.
        """
        labels = targets["labels"]
        num_pos = (labels < self.num_classes).sum()
        dense = (labels, targets["label_weights"], targets["boxes"], targets["box_weights"], num_pos)
        losses = {}
        L = logits.shape[0]
        for lvl in range(L):
            for n, v in zip(LOSS_NAMES, self.loss_from_targets(logits[lvl], boxes[lvl], *dense, image_sizes)):
                losses[layer_key(n, lvl, L, f"_aux{head_idx}")] = v * self.lambda_1
        return losses
