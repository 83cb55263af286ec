"""ATSS: the one-to-many dense auxiliary head of Co-DETR (head index 1 in Co-DINO).

ATSS ("Bridging the Gap Between Anchor-based and Anchor-free Detection via Adaptive Training Sample Selection",
Zhang et al., CVPR 2020) assigns each anchor to at most one ground-truth box:

1. for every GT and every pyramid level, take the ``topk`` (9) anchors whose centres are closest to the GT centre;
2. the IoU threshold of that GT is mean + std (unbiased) of the IoUs of its candidates (all levels together);
3. a candidate is positive when its IoU reaches the threshold and its centre lies inside the GT
   (every distance to a side > 0.01);
4. an anchor positive for several GTs goes to the one with the highest IoU.

Detectron2 has no ATSS, so the assigner and the head are written here. The head follows the official
``CoATSSHead`` (Sense-X/Co-DETR ``projects/models/co_atss_head.py``): one anchor per location of size
``octave_base_scale * stride``, stacked 3x3 conv + GN + ReLU towers, a per-level learned scale on the box deltas,
a centerness branch; sigmoid focal loss normalised by the (all-reduced) number of positives, GIoU on decoded boxes
weighted by the centerness targets and normalised by their (all-reduced) sum, BCE centerness.

In Co-DETR the head also hands its assignment to the query head: *all* anchors with their assigned labels
(background = ``num_classes``) and assigned GT boxes become candidate positive queries (see ``collaborative.py``).
"""
import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from fvcore.nn import giou_loss, sigmoid_focal_loss
from torch import Tensor, nn

from detectron2.layers import batched_nms, cat
from detectron2.modeling.anchor_generator import DefaultAnchorGenerator
from detectron2.modeling.box_regression import Box2BoxTransform, Box2BoxTransformLinear
from detectron2.structures import Boxes, ImageList, Instances, pairwise_iou

from .losses import all_reduce_normalizer
from .neck import conv_gn

__all__ = ["ATSSAssigner", "ATSSHead", "Scale"]


class ATSSAssigner:
    """Adaptive Training Sample Selection for one image.

    Args:
        topk: number of candidates per level and GT, chosen by centre distance.
        center_eps: an anchor centre counts as inside a GT when all four distances to its sides exceed this.
    """

    def __init__(self, topk: int = 9, center_eps: float = 0.01):
        if topk < 1:
            raise ValueError(f"ATSSAssigner: topk must be >= 1, got {topk}")
        self.topk = int(topk)
        self.center_eps = float(center_eps)

    def __call__(
        self,
        anchors: Tensor,
        num_anchors_per_level: Sequence[int],
        gt_boxes: Tensor,
        valid: Optional[Tensor] = None,
    ) -> Tuple[Tensor, Tensor]:
        """
        Args:
            anchors: (A, 4) XYXY, the anchors of all levels concatenated level by level.
            num_anchors_per_level: anchors of each level; sums to A.
            gt_boxes: (G, 4) XYXY.
            valid: optional (A,) bool; invalid anchors (e.g. in batch padding) are never candidates.

        Returns:
            matched_idxs: (A,) int64, the index of the assigned GT or -1 for background.
            max_iou: (A,) IoU with the assigned GT (0 for background).
        """
        if anchors.dim() != 2 or anchors.shape[-1] != 4:
            raise ValueError(f"ATSSAssigner: anchors must be (A, 4), got {tuple(anchors.shape)}")
        if gt_boxes.dim() != 2 or gt_boxes.shape[-1] != 4:
            raise ValueError(f"ATSSAssigner: gt_boxes must be (G, 4), got {tuple(gt_boxes.shape)}")
        num_anchors_per_level = [int(n) for n in num_anchors_per_level]
        if sum(num_anchors_per_level) != anchors.shape[0]:
            raise ValueError(
                f"ATSSAssigner: num_anchors_per_level sums to {sum(num_anchors_per_level)} "
                f"but there are {anchors.shape[0]} anchors"
            )
        num_anchors, num_gt = anchors.shape[0], gt_boxes.shape[0]
        matched = torch.full((num_anchors,), -1, dtype=torch.long, device=anchors.device)
        max_iou = anchors.new_zeros(num_anchors)
        if num_gt == 0 or num_anchors == 0:
            return matched, max_iou

        ious = pairwise_iou(Boxes(anchors), Boxes(gt_boxes))  # (A, G)
        anchor_ctr = (anchors[:, :2] + anchors[:, 2:]) / 2
        gt_ctr = (gt_boxes[:, :2] + gt_boxes[:, 2:]) / 2
        dist_ = torch.cdist(anchor_ctr, gt_ctr)  # (A, G)
        if valid is not None:
            dist_ = dist_.masked_fill(~valid[:, None], float("inf"))

        # candidates: top-k closest per level (vectorised over GTs)
        cand_idxs = []
        start = 0
        for n in num_anchors_per_level:
            if n > 0:
                k = min(self.topk, n)
                _, idx = dist_[start : start + n].topk(k, dim=0, largest=False)
                cand_idxs.append(idx + start)
            start += n
        cand_idxs = cat(cand_idxs, dim=0)  # (C, G)
        gt_arange = torch.arange(num_gt, device=anchors.device)
        cand_ious = ious[cand_idxs, gt_arange[None, :]]  # (C, G)
        if valid is not None:
            cand_valid = valid[cand_idxs]
        else:
            cand_valid = torch.ones_like(cand_ious, dtype=torch.bool)

        # threshold = mean + unbiased std over the (valid) candidates of each GT
        w = cand_valid.to(cand_ious.dtype)
        n = w.sum(0)
        mean = (cand_ious * w).sum(0) / n
        var = (((cand_ious - mean[None]) ** 2) * w).sum(0) / (n - 1)
        thr = mean + var.sqrt()
        is_pos = (cand_ious >= thr[None]) & cand_valid

        # centre of the candidate inside the GT, on the candidates only: detectron2's pairwise_point_box_distance
        # would build (A, G, 4) for all anchors (68 MiB and ~1000x slower for 89k anchors x 50 GTs;
        # tools/benchmark_reuse.py)
        cand_ctr = anchor_ctr[cand_idxs]  # (C, G, 2)
        ltrb = torch.cat([cand_ctr - gt_boxes[None, :, :2], gt_boxes[None, :, 2:] - cand_ctr], dim=-1)
        is_pos = is_pos & (ltrb.min(dim=-1).values > self.center_eps)

        # an anchor positive for several GTs goes to the one with the highest IoU
        ious_masked = torch.full_like(ious, -math.inf)
        gt_of_cand = gt_arange[None, :].expand_as(cand_idxs)
        ious_masked[cand_idxs[is_pos], gt_of_cand[is_pos]] = cand_ious[is_pos]
        best_iou, best_gt = ious_masked.max(dim=1)
        assigned = best_iou > -math.inf
        matched = torch.where(assigned, best_gt, matched)
        max_iou = torch.where(assigned, best_iou, max_iou)
        return matched, max_iou


class Scale(nn.Module):
    """A learned scalar multiplier (one per level)."""

    def __init__(self, init_value: float = 1.0):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(float(init_value)))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale


# FCOS's box coder: (l, t, r, b) distances of an anchor's centre to a box's sides
_LTRB = Box2BoxTransformLinear(normalize_by_size=False)


def centerness_targets(anchors: Tensor, gt_boxes: Tensor) -> Tensor:
    """sqrt(min(l,r)/max(l,r) * min(t,b)/max(t,b)) of anchor centres inside their GT boxes; (N, 4), (N, 4) -> (N,)."""
    ltrb = _LTRB.get_deltas(anchors, gt_boxes)
    lr, tb = ltrb[:, 0::2], ltrb[:, 1::2]
    return torch.sqrt(lr.min(dim=1).values / lr.max(dim=1).values * (tb.min(dim=1).values / tb.max(dim=1).values))


class ATSSHead(nn.Module):
    """The ATSS auxiliary head.

    Forward (training) takes the auxiliary feature maps and returns ``(losses, positives)`` as defined in
    docs/design.md; :meth:`inference` gives detections (used when the model evaluates the ATSS head).
    """

    eval_name = "atss"  # CoDETR(eval_module="atss") evaluates this head

    def __init__(
        self,
        *,
        num_classes: int,
        in_channels: int = 256,
        feat_channels: int = 256,
        strides: Sequence[int] = (4, 8, 16, 32, 64, 128),
        stacked_convs: int = 1,
        num_gn_groups: int = 32,
        octave_base_scale: float = 8.0,
        topk: int = 9,
        bbox_reg_weights: Tuple[float, float, float, float] = (10.0, 10.0, 5.0, 5.0),
        prior_prob: float = 0.01,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        loss_cls_weight: float = 1.0,
        loss_bbox_weight: float = 2.0,
        loss_centerness_weight: float = 1.0,
        head_index: int = 1,
        test_topk_per_level: int = 1000,
        test_nms_thresh: float = 0.6,
        test_score_thresh: float = 0.0,
        test_detections_per_image: int = 100,
        valid_size_divisor: int = 32,
        return_feats: bool = False,
    ):
        """
        Args:
            num_classes: number of foreground classes; background is ``num_classes``.
            strides: stride of each input map (Co-DINO: 4..128, 6 maps).
            octave_base_scale: anchor size = octave_base_scale * stride (1 anchor, ratio 1, per location).
            bbox_reg_weights: delta coder weights, 1/stds (official stds 0.1, 0.1, 0.2, 0.2).
            loss_*_weight: loss multipliers (Co-DINO configs: 12, 24, 12).
            head_index: appended to the loss keys (``loss_cls1`` ...).
            valid_size_divisor: anchors are valid (assignable, sampled, real boxes among the positive queries) at
                the feature locations inside each image's size rounded up to this multiple (mmdet's per-image
                ``pad_shape``: the official pipelines pad each image to a multiple of 32).
            return_feats: add ``feats`` (A, C), the input maps at every anchor, to the positives
                (Co-Deformable-DETR's positive queries use them).
        """
        super().__init__()
        self.valid_size_divisor = max(int(valid_size_divisor), 1)
        if num_classes < 1:
            raise ValueError(f"ATSSHead: num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.strides = [int(s) for s in strides]
        self.head_index = head_index
        self.loss_cls_weight = loss_cls_weight
        self.loss_bbox_weight = loss_bbox_weight
        self.loss_centerness_weight = loss_centerness_weight
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        self.test_topk_per_level = test_topk_per_level
        self.test_nms_thresh = test_nms_thresh
        self.test_score_thresh = test_score_thresh
        self.test_detections_per_image = test_detections_per_image
        self.return_feats = return_feats

        self.cls_convs = nn.ModuleList()
        self.reg_convs = nn.ModuleList()
        for i in range(stacked_convs):
            c = in_channels if i == 0 else feat_channels
            for towers in (self.cls_convs, self.reg_convs):
                towers.append(conv_gn(c, feat_channels, 3, num_groups=num_gn_groups, activation=F.relu))
        self.atss_cls = nn.Conv2d(feat_channels, num_classes, 3, padding=1)
        self.atss_reg = nn.Conv2d(feat_channels, 4, 3, padding=1)
        self.atss_centerness = nn.Conv2d(feat_channels, 1, 3, padding=1)
        self.scales = nn.ModuleList([Scale(1.0) for _ in self.strides])

        self.anchor_generator = DefaultAnchorGenerator(
            sizes=[[octave_base_scale * s] for s in self.strides],
            aspect_ratios=[[1.0]],
            strides=self.strides,
            offset=0.0,
        )
        self.box2box_transform = Box2BoxTransform(weights=bbox_reg_weights)
        self.assigner = ATSSAssigner(topk=topk)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                if m.bias is not None:
                    nn.init.constant_(m.bias, 0.0)
        nn.init.constant_(self.atss_cls.bias, -math.log((1 - prior_prob) / prior_prob))

    # ------------------------------------------------------------------ forward pieces
    def forward_features(self, features: List[Tensor]) -> Tuple[List[Tensor], List[Tensor], List[Tensor]]:
        """Per-level raw outputs: cls (B, K, h, w), deltas (B, 4, h, w), centerness (B, 1, h, w)."""
        if len(features) != len(self.strides):
            raise ValueError(f"ATSSHead: expected {len(self.strides)} feature maps, got {len(features)}")
        logits, deltas, ctrness = [], [], []
        for x, scale in zip(features, self.scales):
            cls_feat, reg_feat = x, x
            for conv in self.cls_convs:
                cls_feat = conv(cls_feat)
            for conv in self.reg_convs:
                reg_feat = conv(reg_feat)
            logits.append(self.atss_cls(cls_feat))
            deltas.append(scale(self.atss_reg(reg_feat)).float())
            ctrness.append(self.atss_centerness(reg_feat))
        return logits, deltas, ctrness

    @staticmethod
    def _flatten(x: Tensor) -> Tensor:
        """(B, C, h, w) -> (B, h*w, C)."""
        return x.flatten(2).transpose(1, 2)

    def _valid_mask(self, features: List[Tensor], image_sizes: Tensor) -> Tensor:
        """(B, A) bool: anchors whose grid cell lies in the image's padded size (not in the batch padding beyond
        it), as mmdet's valid flags."""
        masks = []
        d = self.valid_size_divisor
        padded = torch.ceil(image_sizes.float() / d) * d  # the per-image padded size (mmdet's pad_shape)
        for x, s in zip(features, self.strides):
            h, w = x.shape[-2:]
            vh = torch.ceil(padded[:, 0] / s)
            vw = torch.ceil(padded[:, 1] / s)
            ys = torch.arange(h, device=x.device)
            xs = torch.arange(w, device=x.device)
            m = (ys[None, :, None] < vh[:, None, None]) & (xs[None, None, :] < vw[:, None, None])
            masks.append(m.flatten(1))
        return torch.cat(masks, dim=1)

    @staticmethod
    def _image_sizes_tensor(images, device) -> Tensor:
        sizes = images.image_sizes if isinstance(images, ImageList) else images
        return torch.as_tensor([[int(h), int(w)] for h, w in sizes], device=device)

    def label_anchors(
        self, anchors: Tensor, num_per_level: List[int], gt_instances: List[Instances], valid: Tensor
    ) -> Tuple[Tensor, Tensor]:
        """Assign all anchors of every image.

        Returns:
            labels: (B, A) int64, ``num_classes`` for background.
            target_boxes: (B, A, 4) XYXY, the assigned GT box (zeros for background).
        """
        labels, targets = [], []
        for i, inst in enumerate(gt_instances):
            gt_boxes = inst.gt_boxes.tensor.to(anchors.dtype)
            matched, _ = self.assigner(anchors, num_per_level, gt_boxes, valid[i])
            fg = matched >= 0
            idx = matched.clamp(min=0)
            if gt_boxes.shape[0] > 0:
                lab = torch.where(fg, inst.gt_classes[idx], torch.full_like(matched, self.num_classes))
                tgt = gt_boxes[idx] * fg[:, None]
            else:
                lab = torch.full_like(matched, self.num_classes)
                tgt = anchors.new_zeros(anchors.shape)
            labels.append(lab)
            targets.append(tgt)
        return torch.stack(labels), torch.stack(targets)

    # ------------------------------------------------------------------ training
    def forward(
        self, features: List[Tensor], images, gt_instances: List[Instances]
    ) -> Tuple[Dict[str, Tensor], List[Dict[str, Tensor]]]:
        """
        Args:
            features: list of (B, C, h_l, w_l), one per stride.
            images: ImageList (or a list of (h, w)) giving the image sizes used for anchor validity.
            gt_instances: per image, ``gt_boxes`` (XYXY absolute) and ``gt_classes``.

        Returns:
            losses: ``loss_cls{i}``, ``loss_bbox{i}``, ``loss_centerness{i}`` (weights applied).
            positives: per image a dict ``boxes`` (A, 4) anchors (zero boxes where not valid), ``labels`` (A,),
                ``target_boxes`` (A, 4) (+ ``feats`` (A, C) with ``return_feats``).
        """
        if len(gt_instances) != features[0].shape[0]:
            raise ValueError(
                f"ATSSHead: {len(gt_instances)} gt_instances for a batch of {features[0].shape[0]} images"
            )
        logits, deltas, ctrness = self.forward_features(features)
        anchors_per_level = self.anchor_generator(features)
        num_per_level = [len(a) for a in anchors_per_level]
        anchors = Boxes.cat(anchors_per_level).tensor  # (A, 4)
        image_sizes = self._image_sizes_tensor(images, anchors.device)
        valid = self._valid_mask(features, image_sizes)

        with torch.no_grad():
            labels, target_boxes = self.label_anchors(anchors, num_per_level, gt_instances, valid)

        logits = cat([self._flatten(x) for x in logits], dim=1)  # (B, A, K)
        deltas = cat([self._flatten(x) for x in deltas], dim=1)  # (B, A, 4)
        ctrness = cat([self._flatten(x) for x in ctrness], dim=1).squeeze(-1)  # (B, A)
        losses = self.losses(anchors, logits, deltas, ctrness, labels, target_boxes, valid)

        # Anchors outside an image's valid region reach the positive queries as zero boxes (always background),
        # as the official ATSS target step, which un-maps its valid anchors with fill 0.
        pos_anchors = torch.where(valid[..., None], anchors[None], anchors.new_zeros(()))
        positives = [
            {"boxes": pos_anchors[i], "labels": labels[i], "target_boxes": target_boxes[i]} for i in range(len(labels))
        ]
        if self.return_feats:  # one anchor per location: the maps flattened in anchor order
            anchor_feats = cat([self._flatten(f) for f in features], dim=1)  # (B, A, C)
            for i, p in enumerate(positives):
                p["feats"] = anchor_feats[i]
        return losses, positives

    def losses(
        self,
        anchors: Tensor,
        logits: Tensor,
        deltas: Tensor,
        ctrness: Tensor,
        labels: Tensor,
        target_boxes: Tensor,
        valid: Tensor,
    ) -> Dict[str, Tensor]:
        """Focal + centerness-weighted GIoU + BCE centerness; shapes (A,4), (B,A,K), (B,A,4), (B,A), (B,A), (B,A,4), (B,A)."""
        pos = labels < self.num_classes  # (B, A)
        # normaliser as mmdet: sum over images of max(#pos, 1), averaged over processes, >= 1
        # (float32 whatever the autocast dtype: bf16 would round counts above 256)
        num_pos = all_reduce_normalizer(pos.sum(dim=1).clamp(min=1).sum())

        onehot = F.one_hot(labels, self.num_classes + 1)[..., : self.num_classes].to(logits.dtype)
        loss_cls = sigmoid_focal_loss(logits, onehot, alpha=self.focal_alpha, gamma=self.focal_gamma, reduction="none")
        loss_cls = (loss_cls * valid[..., None].to(loss_cls.dtype)).sum() / num_pos

        pos_anchors = anchors[None].expand_as(deltas)[pos]  # (P, 4)
        pos_targets = target_boxes[pos]
        pos_deltas = deltas[pos]
        pos_ctr_logits = ctrness[pos]
        ctr_t = centerness_targets(pos_anchors, pos_targets)
        pred_boxes = self.box2box_transform.apply_deltas(pos_deltas, pos_anchors)
        ctr_norm = all_reduce_normalizer(ctr_t.float().sum())
        if pos_deltas.shape[0] > 0:
            loss_bbox = (giou_loss(pred_boxes, pos_targets, reduction="none") * ctr_t).sum() / ctr_norm
            loss_ctr = F.binary_cross_entropy_with_logits(pos_ctr_logits, ctr_t, reduction="sum") / num_pos
        else:  # keep the graph connected
            loss_bbox = deltas.sum() * 0.0
            loss_ctr = ctrness.sum() * 0.0
        i = self.head_index
        return {
            f"loss_cls{i}": loss_cls * self.loss_cls_weight,
            f"loss_bbox{i}": loss_bbox * self.loss_bbox_weight,
            f"loss_centerness{i}": loss_ctr * self.loss_centerness_weight,
        }

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def inference(self, features: List[Tensor], images: ImageList) -> List[Instances]:
        """Detections in input-image coordinates (``images.image_sizes``): per level top-k (anchor, class) pairs by
        class score, boxes decoded and clipped, score = cls score x centerness, class-aware NMS, top
        ``test_detections_per_image``."""
        logits, deltas, ctrness = self.forward_features(features)
        anchors_per_level = self.anchor_generator(features)
        results = []
        for i, (h, w) in enumerate(images.image_sizes):
            boxes_all, scores_all, classes_all = [], [], []
            for lg, dl, ct, anc in zip(logits, deltas, ctrness, anchors_per_level):
                scores = lg[i].flatten(1).t().sigmoid().flatten()  # (HW*K,)
                keep = scores > self.test_score_thresh
                scores = scores[keep]
                idxs = keep.nonzero().squeeze(1)
                k = min(self.test_topk_per_level, idxs.numel())
                scores, order = scores.topk(k)
                idxs = idxs[order]
                loc, cls_ = idxs // self.num_classes, idxs % self.num_classes
                d = dl[i].flatten(1).t()[loc]
                boxes = self.box2box_transform.apply_deltas(d, anc.tensor[loc])
                scores = scores * ct[i].flatten()[loc].sigmoid()
                boxes_all.append(boxes)
                scores_all.append(scores)
                classes_all.append(cls_)
            boxes = Boxes(cat(boxes_all))
            boxes.clip((h, w))
            scores, classes = cat(scores_all), cat(classes_all)
            keep = batched_nms(boxes.tensor, scores, classes, self.test_nms_thresh)[: self.test_detections_per_image]
            inst = Instances((h, w))
            inst.pred_boxes = boxes[keep]
            inst.scores = scores[keep]
            inst.pred_classes = classes[keep]
            results.append(inst)
        return results
