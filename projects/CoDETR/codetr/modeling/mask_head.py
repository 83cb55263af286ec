"""Co-DINO-Inst's mask branch: a RefineMask-style mask head and a mask-IoU head on the encoder maps.

Official facts (Sense-X/Co-DETR ``co_dino_5scale_vit_large_coco_instance.py``, ``SimpleRefineMaskHead``,
``MaskIoUHead``, ``BARCrossEntropyLoss``; spec §6):

* RoI features: RoIAlign 14x14 (aligned, adaptive sampling) on the encoder maps of strides 4..64, a box going to
  level ``floor(log2(sqrt(area) / 56))`` - detectron2's ``ROIPooler`` with canonical size 224 at level 4 is the
  same rule. The finest encoder map is the "semantic" map.
* :class:`RefineMaskHead`: 1 conv (3x3, LayerNorm, ReLU) on the RoI features, 2 on the semantic map; then 3
  refinement stages at 14, 28 and 56 px, each fusing the instance features, RoIAlign of the (1x1-projected)
  semantic map and the previous stage's mask (dilated 3x3 convs at 1, 3, 5 plus a global average), halving the
  channels (256 -> 128 -> 64 -> 32) and upsampling x2; class-specific logits at 14/28/56, a class-agnostic one at
  56 upsampled to 112.
* Loss: per stage BCE; stages 0-1 over the whole RoI, stages 2-3 only on the boundary band (width 2) of the
  previous stage's prediction and target; stage weights 0.5, 0.75, 0.75, 1.0; times 1.33 x 6 x lambda_2 (2).
* :class:`MaskIoUHead` (Mask Scoring R-CNN): from the RoI features and the 28 px mask (max-pooled to 14), 2 convs
  (the second stride 2), 1 fc of 1024, per-class sigmoid IoU; MSE against the IoU of the binarised 28 px mask
  with the whole ground-truth mask, on positives with IoU > 0, times 0.5 x 6 x 2.
* Training RoIs: the query head's top 1000 predictions of the last decoder layer (denoising queries included, no
  NMS), matched to the ground truth at IoU 0.5, 512 sampled with 25% positives, ground-truth boxes added; only the
  positives reach the heads.
* Test: the detections after soft-NMS; the 28/56/112 px predictions are refined coarse to fine (a finer stage
  replaces the coarser one only on the coarser one's 1 px boundary band), masks are pasted at 0.5; mask score =
  predicted IoU of the detected class x box score.
"""
from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from detectron2.layers import Conv2d, cat
from detectron2.layers.batch_norm import LayerNorm
from detectron2.modeling.matcher import Matcher
from detectron2.modeling.poolers import ROIPooler
from detectron2.modeling.proposal_generator.proposal_utils import add_ground_truth_to_proposals
from detectron2.modeling.sampling import subsample_labels
from detectron2.structures import BitMasks, Boxes, Instances, pairwise_iou

from .postprocess import DETRPostProcessor

__all__ = [
    "boundary_band",
    "refine_mask_loss",
    "refine_mask_inference",
    "RefineMaskHead",
    "MaskIoUHead",
    "InstanceMaskBranch",
]


def _conv_ln_relu(cin: int, cout: int, k: int = 3) -> Conv2d:
    # mmcv ConvModule(norm_cfg=LN2d): no bias, LayerNorm over channels (eps 1e-5 from build_norm_layer), ReLU
    return Conv2d(cin, cout, k, padding=k // 2, bias=False, norm=LayerNorm(cout, eps=1e-5), activation=F.relu)


def boundary_band(masks: torch.Tensor, width: int) -> torch.Tensor:
    """Pixels within ``width`` of a mask edge, on either side (the official ``generate_block_target(...) == 1``).

    A pixel is in the band when more than 10% of its (2w+1)^2 window differs from it (foreground pixels next to
    background, and background next to foreground); the image border counts as background.

    Args:
        masks: (N, H, W) binary (bool or 0/1 float).
    Returns:
        (N, H, W) bool.
    """
    m = masks.float()[:, None]
    k = 2 * width + 1
    pad = F.pad(m, (width,) * 4, value=0.0)
    # window sums of the foreground; the Laplacian of the official code is (k^2 - 1) * centre - others
    ones = torch.ones(1, 1, k, k, dtype=m.dtype, device=m.device)
    fg = F.conv2d(pad, ones)
    area = float(k * k)
    pos = (area * m - fg).clamp(min=0) / area > 0.1  # foreground with enough background around
    neg = (area * (1 - m) - (area - fg)).clamp(min=0) / area > 0.1  # background with enough foreground
    return (pos | neg)[:, 0]


def refine_mask_loss(stage_logits: Sequence[torch.Tensor], stage_targets: Sequence[torch.Tensor],
                     stage_weights: Sequence[float], boundary_width: int = 2, start_stage: int = 1) -> torch.Tensor:
    """The boundary-aware multi-stage BCE of RefineMask (official ``BARCrossEntropyLoss``).

    Args:
        stage_logits: per stage (R, 1, s, s) mask logits, s doubling from stage to stage.
        stage_targets: per stage (R, s, s) float 0/1 targets.
        stage_weights: per stage weight.
        boundary_width: band width for the stages after ``start_stage``.
        start_stage: stages ``<= start_stage`` use a plain mean BCE over the RoI.
    Returns:
        scalar loss.
    """
    total = 0.0
    pre_pred = None
    for i, (logit, target, w) in enumerate(zip(stage_logits, stage_targets, stage_weights)):
        logit = logit[:, 0]
        if i <= start_stage:
            loss = F.binary_cross_entropy_with_logits(logit, target, reduction="mean")
            pre_pred = logit.sigmoid() >= 0.5
        else:
            size = logit.shape[-2:]
            band = boundary_band(pre_pred, boundary_width) | boundary_band(stage_targets[i - 1], boundary_width)
            band = F.interpolate(band[:, None].float(), size, mode="bilinear", align_corners=True)[:, 0] >= 0.5
            loss = F.binary_cross_entropy_with_logits(logit, target, reduction="none")
            loss = (loss * band).sum() / band.sum().clamp(min=1)
            # the refined prediction so far, as at test time (band of width 1)
            pre_pred = _refine_step(stage_logits[i - 1], stage_logits[i], pre_pred)[:, 0].sigmoid() >= 0.5
        total = total + w * loss
    return total


def _refine_step(coarse: torch.Tensor, fine: torch.Tensor, coarse_binary: torch.Tensor) -> torch.Tensor:
    """The finer logits on the coarse prediction's 1 px boundary band, the upsampled coarse logits elsewhere."""
    size = fine.shape[-2:]
    band = boundary_band(coarse_binary, 1)[:, None].float()
    band = F.interpolate(band, size, mode="bilinear", align_corners=True) >= 0.5
    up = F.interpolate(coarse, size, mode="bilinear", align_corners=True)
    return torch.where(band, fine, up)


def refine_mask_inference(stage_logits: Sequence[torch.Tensor]) -> torch.Tensor:
    """Test-time coarse-to-fine refinement from the second stage on (official ``simple_test_mask``).

    Args:
        stage_logits: per stage (R, 1, s, s) logits.
    Returns:
        (R, 1, S, S) logits at the finest size.
    """
    logits = stage_logits[1]
    for fine in stage_logits[2:]:
        logits = _refine_step(logits, fine, logits[:, 0].sigmoid() >= 0.5)
    return logits


class _MultiBranchFusion(nn.Module):
    """Dilated 3x3 convs (ReLU) summed with the global average, then a 1x1 conv (official MultiBranchFusionAvg)."""

    def __init__(self, dim: int, dilations=(1, 3, 5)):
        super().__init__()
        self.num_branches = len(dilations)
        for i, d in enumerate(dilations):
            self.add_module(f"dilation_conv_{i + 1}", Conv2d(dim, dim, 3, padding=d, dilation=d, activation=F.relu))
        self.merge_conv = Conv2d(dim, dim, 1)

    def forward(self, x):
        out = F.adaptive_avg_pool2d(x, 1)
        for i in range(self.num_branches):
            out = out + getattr(self, f"dilation_conv_{i + 1}")(x)
        return self.merge_conv(out)


class _RefineStage(nn.Module):
    """One refinement stage (official SimpleSFMStage): fuse instance features, the RoI of the semantic map and
    the stage's mask; ``out_channels - 1`` channels plus the mask again; optionally upsample x2."""

    def __init__(self, semantic_in: int, in_channels: int, out_channels: int, out_size: int, semantic_stride: int,
                 dilations=(1, 3, 5)):
        super().__init__()
        self.semantic_transform_in = Conv2d(semantic_in, in_channels, 1)
        self.semantic_pooler = ROIPooler(out_size, (1.0 / semantic_stride,), 0, "ROIAlignV2")
        self.fuse_conv = nn.ModuleList([Conv2d(2 * in_channels + 1, in_channels, 1),
                                        _MultiBranchFusion(in_channels, dilations)])
        self.fuse_transform_out = Conv2d(in_channels, out_channels - 1, 1)
        for m in (self.semantic_transform_in, self.fuse_transform_out, self.fuse_conv[0]):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(m.bias)

    def forward(self, inst_feats, inst_logits, semantic, boxes: List[Boxes], upsample: bool):
        semantic = F.relu(self.semantic_transform_in(semantic))
        sem_roi = self.semantic_pooler([semantic], boxes)
        prob = inst_logits.sigmoid()
        x = torch.cat([inst_feats, sem_roi, prob], 1)
        for conv in self.fuse_conv:
            x = F.relu(conv(x))
        x = torch.cat([F.relu(self.fuse_transform_out(x)), prob], 1)
        if upsample:
            x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
        return x


class RefineMaskHead(nn.Module):
    """The RefineMask-style mask head of Co-DINO-Inst (official ``SimpleRefineMaskHead``).

    Args:
        in_channels: channels of the RoI features and of the semantic map.
        num_classes: classes of the class-specific stages.
        num_convs_instance / num_convs_semantic: 3x3 conv + LayerNorm + ReLU layers on each input.
        conv_dim: their channels.
        stage_sizes: supervision size of each stage's output (official 14, 28, 56, 112).
        class_agnostic_last: the last stage predicts one class-agnostic mask (official: yes).
        semantic_stride: stride of the semantic map (the finest encoder map).
        dilations: of the fusion convs.
        loss_weight, stage_loss_weights, boundary_width, start_stage: see :func:`refine_mask_loss`.
    """

    def __init__(self, *, in_channels: int = 256, num_classes: int = 80, num_convs_instance: int = 1,
                 num_convs_semantic: int = 2, conv_dim: int = 256, stage_sizes=(14, 28, 56, 112),
                 class_agnostic_last: bool = True, semantic_stride: int = 4, dilations=(1, 3, 5),
                 loss_weight: float = 1.33 * 6 * 2.0, stage_loss_weights=(0.5, 0.75, 0.75, 1.0),
                 boundary_width: int = 2, start_stage: int = 1):
        super().__init__()
        stage_sizes = tuple(stage_sizes)
        if len(stage_sizes) < 2 or any(b != 2 * a for a, b in zip(stage_sizes, stage_sizes[1:])):
            raise ValueError(f"stage_sizes must double from stage to stage, got {stage_sizes}")
        if len(stage_loss_weights) != len(stage_sizes):
            raise ValueError("stage_loss_weights needs one weight per stage")
        self.num_classes = num_classes
        self.stage_sizes = stage_sizes
        self.loss_weight = loss_weight
        self.stage_loss_weights = tuple(stage_loss_weights)
        self.boundary_width = boundary_width
        self.start_stage = start_stage
        self.instance_convs = nn.ModuleList(
            [_conv_ln_relu(in_channels if i == 0 else conv_dim, conv_dim) for i in range(num_convs_instance)])
        self.semantic_convs = nn.ModuleList(
            [_conv_ln_relu(in_channels if i == 0 else conv_dim, conv_dim) for i in range(num_convs_semantic)])
        self.stages = nn.ModuleList()
        channels = [conv_dim]
        for size in stage_sizes[:-1]:
            self.stages.append(_RefineStage(conv_dim, channels[-1], channels[-1] // 2, size, semantic_stride, dilations))
            channels.append(channels[-1] // 2)
        stage_classes = [num_classes] * (len(stage_sizes) - 1) + [1 if class_agnostic_last else num_classes]
        self.stage_instance_logits = nn.ModuleList([Conv2d(c, k, 1) for c, k in zip(channels, stage_classes)])
        for m in self.stage_instance_logits:
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(m.bias)

    @staticmethod
    def _pick(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if logits.shape[1] == 1:
            return logits
        return logits[torch.arange(len(labels), device=labels.device), labels][:, None]

    def forward(self, roi_feats: torch.Tensor, semantic: torch.Tensor, boxes: List[Boxes],
                labels: torch.Tensor) -> List[torch.Tensor]:
        """
        Args:
            roi_feats: (R, C, 14, 14) RoI features of all images' boxes (in ``boxes`` order).
            semantic: (B, C, H/s, W/s) the semantic (finest encoder) map.
            boxes: per image the RoIs (XYXY pixels of the padded input).
            labels: (R,) the class of each RoI (ground truth in training, detected at test).
        Returns:
            per stage (R, 1, s, s) mask logits of the RoI's class.
        """
        x = roi_feats
        for conv in self.instance_convs:
            x = conv(x)
        for conv in self.semantic_convs:
            semantic = conv(semantic)
        preds = []
        last = len(self.stages) - 1
        for i, stage in enumerate(self.stages):
            logits = self._pick(self.stage_instance_logits[i](x), labels)
            preds.append(logits)
            x = stage(x, logits, semantic, boxes, upsample=i < last)
        logits = self._pick(self.stage_instance_logits[-1](x), labels)
        preds.append(F.interpolate(logits, scale_factor=2, mode="bilinear", align_corners=True))
        return preds

    def losses(self, stage_logits: List[torch.Tensor], stage_targets: List[torch.Tensor]) -> torch.Tensor:
        if stage_logits[0].shape[0] == 0:  # no positive RoI: zero, but every parameter stays in the graph
            return sum(p.sum() * 0.0 for p in stage_logits) + sum(p.sum() * 0.0 for p in self.parameters())
        loss = refine_mask_loss(stage_logits, stage_targets, self.stage_loss_weights, self.boundary_width,
                                self.start_stage)
        return loss * self.loss_weight


class MaskIoUHead(nn.Module):
    """Predicts the IoU of a predicted mask with its ground truth (Mask Scoring R-CNN; official ``MaskIoUHead``).

    Args:
        in_channels: channels of the RoI features.
        num_classes: one IoU per class.
        roi_size: RoI feature size (14); the mask input is max-pooled to it.
        num_convs: 3x3 conv + LayerNorm + ReLU layers (the last one stride 2).
        conv_dim, fc_dim, num_fcs: layer sizes.
        loss_weight: MSE loss weight (official 0.5 x 6 x 2).
    """

    def __init__(self, *, in_channels: int = 256, num_classes: int = 80, roi_size: int = 14, num_convs: int = 2,
                 conv_dim: int = 256, num_fcs: int = 1, fc_dim: int = 1024, loss_weight: float = 0.5 * 6 * 2.0):
        super().__init__()
        self.loss_weight = loss_weight
        self.convs = nn.ModuleList()
        for i in range(num_convs):
            stride = 2 if i == num_convs - 1 else 1
            cin = in_channels + 1 if i == 0 else conv_dim
            self.convs.append(Conv2d(cin, conv_dim, 3, stride=stride, padding=1, bias=False,
                                     norm=LayerNorm(conv_dim, eps=1e-5), activation=F.relu))
        area = (roi_size // 2) ** 2
        self.fcs = nn.ModuleList([nn.Linear(conv_dim * area if i == 0 else fc_dim, fc_dim) for i in range(num_fcs)])
        self.fc_mask_iou = nn.Linear(fc_dim, num_classes)
        for fc in self.fcs:  # Caffe2Xavier
            nn.init.kaiming_uniform_(fc.weight, a=1)
            nn.init.zeros_(fc.bias)
        nn.init.normal_(self.fc_mask_iou.weight, std=0.01)
        nn.init.zeros_(self.fc_mask_iou.bias)

    def forward(self, roi_feats: torch.Tensor, mask_logits: torch.Tensor) -> torch.Tensor:
        """roi_feats (R, C, s, s), mask_logits (R, 2s, 2s) -> (R, num_classes) predicted IoU in [0, 1]."""
        x = torch.cat([roi_feats, F.max_pool2d(mask_logits.sigmoid()[:, None], 2, 2)], 1)
        for conv in self.convs:
            x = conv(x)
        x = x.flatten(1)
        for fc in self.fcs:
            x = F.relu(fc(x))
        return self.fc_mask_iou(x).sigmoid()

    def losses(self, iou_pred: torch.Tensor, iou_target: torch.Tensor) -> torch.Tensor:
        """MSE on the RoIs whose target IoU is positive (mean over them), times the weight."""
        pos = (iou_target > 0).float()
        return self.loss_weight * ((iou_pred - iou_target) ** 2 * pos).sum() / pos.sum().clamp(min=1)


def _masks_as_bitmasks(masks, image_size) -> torch.Tensor:
    if isinstance(masks, BitMasks):
        return masks.tensor
    return BitMasks.from_polygon_masks(masks, *image_size).tensor


def mask_iou_targets(mask_logits: torch.Tensor, mask_targets: torch.Tensor, boxes: torch.Tensor,
                     gt_masks: torch.Tensor, gt_idx: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """IoU of each binarised predicted RoI mask with its whole ground-truth mask (official MaskIoUHead targets).

    The ground-truth area outside the RoI is accounted for through the ratio (gt area inside the RoI's integer
    box) / (whole gt area), computed here with an integral image instead of a crop per RoI.

    Args:
        mask_logits: (R, s, s) predicted logits; mask_targets: (R, s, s) 0/1 targets of the same RoIs.
        boxes: (R, 4) XYXY RoIs; gt_masks: (G, H, W) bool full-image masks; gt_idx: (R,) matched gt of each RoI.
    Returns:
        (R,) float targets (no gradient).
    """
    with torch.no_grad():
        H, W = gt_masks.shape[-2:]
        integral = F.pad(gt_masks.float().cumsum(1).cumsum(2), (1, 0, 1, 0))  # (G, H+1, W+1)
        b = boxes.floor().long()  # official: astype(int32) of non-negative boxes
        x1, y1 = b[:, 0].clamp(0, W), b[:, 1].clamp(0, H)
        x2 = (x1 + (b[:, 2].clamp(0, W) - x1).clamp(min=1)).clamp(max=W)
        y2 = (y1 + (b[:, 3].clamp(0, H) - y1).clamp(min=1)).clamp(max=H)
        I = integral[gt_idx]
        r = torch.arange(len(gt_idx), device=b.device)
        inside = I[r, y2, x2] - I[r, y1, x2] - I[r, y2, x1] + I[r, y1, x1]
        ratio = inside / (I[r, -1, -1] + 1e-7)
        pred = (mask_logits.sigmoid() > threshold).float()
        pred_area = pred.sum((-1, -2))
        overlap = (pred * mask_targets).sum((-1, -2))
        gt_area = mask_targets.sum((-1, -2)) / (ratio + 1e-7)
        return overlap / (pred_area + gt_area - overlap)


class InstanceMaskBranch(nn.Module):
    """The mask branch of Co-DINO-Inst: RoIs from the query head, RoI features from the encoder maps, the mask
    head and (optionally) the mask-IoU head.

    Args:
        mask_head: :class:`RefineMaskHead`.
        mask_iou_head: :class:`MaskIoUHead` or None.
        strides: strides of the encoder maps it reads (official 4, 8, 16, 32, 64); the first is the semantic map.
        roi_size: RoIAlign output (14).
        num_proposals: training RoIs per image: the query head's top-k (1000), no NMS.
        iou_threshold: RoI / ground-truth IoU for a positive (0.5).
        batch_size_per_image, positive_fraction: RoI sampling (512, 0.25); ground-truth boxes are added as RoIs.
        test_chunk: RoIs per mask-head call at test time (memory bound; official 150).
        mask_threshold: binarisation of the predicted masks for the IoU targets (official mask_thr_binary 0.5);
            at test the masks are pasted and binarised at 0.5 by detectron2's ``detector_postprocess``.
    """

    def __init__(self, *, mask_head: nn.Module, mask_iou_head=None, strides=(4, 8, 16, 32, 64), roi_size: int = 14,
                 num_proposals: int = 1000, iou_threshold: float = 0.5, batch_size_per_image: int = 512,
                 positive_fraction: float = 0.25, test_chunk: int = 150, mask_threshold: float = 0.5):
        super().__init__()
        self.mask_head = mask_head
        self.mask_iou_head = mask_iou_head
        self.strides = tuple(strides)
        self.pooler = ROIPooler(roi_size, tuple(1.0 / s for s in self.strides), 0, "ROIAlignV2",
                                canonical_box_size=224, canonical_level=4)
        self.proposals = DETRPostProcessor(max_per_img=num_proposals, soft_nms=False)
        self.matcher = Matcher([iou_threshold], [0, 1], allow_low_quality_matches=False)
        self.batch_size_per_image = batch_size_per_image
        self.positive_fraction = positive_fraction
        self.test_chunk = test_chunk
        self.mask_threshold = mask_threshold

    def _maps(self, features: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        if len(features) < len(self.strides):
            raise ValueError(f"the mask branch reads {len(self.strides)} encoder maps, got {len(features)}")
        return list(features[: len(self.strides)])

    def _sample_positives(self, proposals: Boxes, gt: Instances) -> Tuple[Boxes, torch.Tensor]:
        """Detectron2's RoI labelling: add gt boxes, match at the IoU threshold, sample; keep the positives."""
        boxes = Boxes(cat([proposals.tensor, gt.gt_boxes.tensor.to(proposals.tensor.dtype)]))
        if len(gt) == 0:
            return boxes[:0], torch.zeros(0, dtype=torch.long, device=boxes.device)
        idx, labels = self.matcher(pairwise_iou(gt.gt_boxes, boxes))
        classes = torch.where(labels == 1, gt.gt_classes[idx], torch.full_like(idx, self.mask_head.num_classes))
        pos, _ = subsample_labels(classes, self.batch_size_per_image, self.positive_fraction,
                                  self.mask_head.num_classes)
        return boxes[pos], idx[pos]

    def losses(self, features: Sequence[torch.Tensor], logits: torch.Tensor, boxes: torch.Tensor,
               norm_sizes: torch.Tensor, gt_instances: List[Instances]) -> Dict[str, torch.Tensor]:
        """
        Args:
            features: the encoder maps (B, C, h, w), finest first.
            logits, boxes: the query head's last-layer (B, N, K) logits and (B, N, 4) normalised cxcywh boxes
                (no gradient needed).
            norm_sizes: (B, 2) (h, w) the boxes are normalised by.
            gt_instances: per image ``gt_boxes``, ``gt_classes``, ``gt_masks`` (BitMasks or PolygonMasks).
        Returns:
            ``loss_mask`` and, with the IoU head, ``loss_mask_iou``.
        """
        maps = self._maps(features)
        props = self.proposals(logits.detach(), boxes.detach(), norm_sizes)
        pos_boxes, labels, targets, full_masks = [], [], [[] for _ in self.mask_head.stage_sizes], []
        for p, gt in zip(props, gt_instances):
            if not gt.has("gt_masks"):
                raise ValueError("the instance model needs gt_masks (the mapper's use_instance_mask=True)")
            b, i = self._sample_positives(Boxes(p["boxes"]), gt)
            pos_boxes.append(b)
            labels.append(gt.gt_classes[i])
            for t, size in zip(targets, self.mask_head.stage_sizes):
                t.append(gt.gt_masks[i].crop_and_resize(b.tensor, size).float() if len(i) else
                         b.tensor.new_zeros((0, size, size)))
            if self.mask_iou_head is not None:
                full_masks.append((_masks_as_bitmasks(gt.gt_masks, gt.image_size).to(b.device), i))
        labels = cat(labels)
        roi_feats = self.pooler(maps, pos_boxes)
        preds = self.mask_head(roi_feats, maps[0], pos_boxes, labels)
        targets = [cat(t) for t in targets]
        out = {"loss_mask": self.mask_head.losses(preds, targets)}
        if self.mask_iou_head is not None:
            iou_pred = self.mask_iou_head(roi_feats, preds[1][:, 0])
            iou_pred = iou_pred[torch.arange(len(labels), device=labels.device), labels]
            iou_t = [mask_iou_targets(p[:, 0], t, b.tensor, m, i, self.mask_threshold) for p, t, b, (m, i) in
                     zip(preds[1].split([len(b) for b in pos_boxes]), targets[1].split([len(b) for b in pos_boxes]),
                         pos_boxes, full_masks)]
            out["loss_mask_iou"] = self.mask_iou_head.losses(iou_pred, cat(iou_t))
        return out

    @torch.no_grad()
    def inference(self, features: Sequence[torch.Tensor], detections: List[Instances]) -> List[Instances]:
        """Add ``pred_masks`` (R, 1, S, S) mask probabilities in the box (detectron2's ROIMasks layout, pasted
        by ``detector_postprocess``) and, with the IoU head, ``mask_scores`` (IoU x box score) to each image's
        detections (``pred_boxes`` in pixels of the padded input, ``scores``, ``pred_classes``)."""
        maps = self._maps(features)
        boxes = [d.pred_boxes for d in detections]
        counts = [len(b) for b in boxes]
        starts = [sum(counts[:i]) for i in range(len(counts))]
        total = sum(counts)
        flat = Boxes(cat([b.tensor for b in boxes]))
        labels = cat([d.pred_classes for d in detections])
        masks, ious = [], []
        for s in range(0, total, self.test_chunk):
            e = min(s + self.test_chunk, total)
            # the chunk as per-image box lists (images with no box in it get empty ones); host-side indices only
            per_image = [b[min(max(s - st, 0), n): min(max(e - st, 0), n)] for b, st, n in zip(boxes, starts, counts)]
            roi_feats = self.pooler(maps, per_image)
            preds = self.mask_head(roi_feats, maps[0], per_image, labels[s:e])
            masks.append(refine_mask_inference(preds).sigmoid())
            if self.mask_iou_head is not None:
                iou = self.mask_iou_head(roi_feats, preds[1][:, 0])
                ious.append(iou[torch.arange(iou.shape[0], device=iou.device), labels[s:e]])
        size = self.mask_head.stage_sizes[-1]
        masks = cat(masks) if masks else flat.tensor.new_zeros((0, 1, size, size))
        for d, m in zip(detections, masks.split(counts)):
            d.pred_masks = m
        if self.mask_iou_head is not None:
            ious = cat(ious) if ious else flat.tensor.new_zeros((0,))
            for d, iou in zip(detections, ious.split(counts)):
                d.mask_scores = iou * d.scores
        return detections
