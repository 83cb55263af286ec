"""The Faster R-CNN auxiliary branch of Co-DETR (head index 0 in Co-DINO), on detectron2's RPN and StandardROIHeads.

Nothing of Faster R-CNN is rewritten here: :class:`RCNNBranch` builds detectron2's ``RPN`` (``StandardRPNHead``,
``DefaultAnchorGenerator``) and ``StandardROIHeads`` (``ROIPooler``, ``FastRCNNConvFCHead``,
``FastRCNNOutputLayers``) with the official Co-DINO hyper-parameters, and only adds what Co-DETR needs on top:

- RoIAlign on the CPU runs ``codetr.layers.ROIAlign`` (multi-threaded C++ kernels of ``codetr._C``, same values as
  torchvision's, which detectron2 calls): the per-level ``level_poolers`` of the pooler are swapped, with the same
  output size, scale, sampling ratio and alignment; on a GPU (or without the extension) the module calls torchvision
  as before. The pooler is :class:`LevelConcatROIPooler`, detectron2's ``ROIPooler`` (level assignment, output
  layout, values) with the levels combined by one row permutation instead of per-level ``index_put_`` (a cheaper
  backward). Neither has parameters: state-dict keys are unchanged;
- loss keys carrying the head index (``loss_rpn_cls0``, ``loss_rpn_bbox0``, ``loss_cls0``, ``loss_bbox0``, with a
  mask head ``loss_mask0``);
- the *positives* handed to the query head: the RoIs sampled by ``StandardROIHeads.label_and_sample_proposals``
  (512 per image, GT boxes appended as proposals, positives first), truncated to the smallest per-image count
  (cap 2000), with their labels (background = ``num_classes``) and GT boxes (the decoded regression targets).

Correspondences with the official mmdet config (``co_dino_5scale_r50_1x_coco.py``):

- anchors ``octave_base_scale=4, scales_per_octave=3`` -> sizes ``4 * stride * 2**(k/3)``, k = 0, 1, 2, ratios
  0.5/1/2, centre offset 0 (both mmdet 2.x and detectron2 put anchor centres at ``stride * index``);
- mmdet's RoI level mapping ``floor(log2(sqrt(area) / finest_scale + 1e-6))`` equals detectron2's
  ``floor(canonical_level + log2(sqrt(area) / canonical_box_size)) - min_level`` with ``canonical_box_size =
  finest_scale = 56`` and ``canonical_level = min_level = 2`` (stride 4); RoIAlign with ``aligned=True`` and
  adaptive sampling is detectron2's ``ROIAlignV2`` with ``sampling_ratio=0``;
- ``DeltaXYWHBBoxCoder`` with stds (0.1, 0.1, 0.2, 0.2) is ``Box2BoxTransform((10, 10, 5, 5))``;
- RoI GIoU on decoded boxes and CE are both averaged over the sampled RoIs in mmdet and detectron2.

Mask R-CNN (Co-Deformable-DETR-mask, official ``co_deformable_detr_mask_r50_1x_coco``): with ``mask_head`` (e.g.
detectron2's ``MaskRCNNConvUpsampleHead``: 4 3x3 convs, a 2x deconv, per-class 1x1 logits = mmdet's
``FCNMaskHead``) the ``StandardROIHeads`` get a second ``ROIPooler`` (RoIAlign ``mask_pooler_resolution`` = 14, the
same levels and level mapping as the box pooler, as the official ``mask_roi_extractor``) and train the mask head on
the positive sampled RoIs against ``gt_masks`` cropped to the 28 px RoI grid (detectron2's ``mask_rcnn_loss``: mean
BCE of the GT class's logits, as mmdet's ``CrossEntropyLoss(use_mask=True)``; its x12 weight is the head's
``loss_weight``). :meth:`RCNNBranch.mask_inference` runs the mask head on boxes given from outside (the query
head's detections at test time); ``inference`` (``eval_module="rcnn"``) gives the RoI head's own boxes with masks.

Anchors in the batch padding: detectron2's RPN (``anchor_boundary_thresh=-1``) samples every anchor, so an image
smaller than the batch gets negatives from the padding; mmdet skips anchors whose feature location lies outside the
image's own padded size (``valid_flags`` with the pipeline's ``size_divisor`` 32). :class:`ValidAnchorRPN` (detectron2's
``RPN`` with one step added) labels those anchors "ignore" before sampling, as the official code.

Known difference: mmdet's RPN low-quality matches require IoU >= 0.3 (``min_pos_iou``); detectron2's Matcher
accepts a GT's best anchors at any IoU > 0. The anchor order inside a location also differs (mmdet: ratio-major,
detectron2: size-major), which matters only when converting official RPN weights.

Detectron2's RPN and ROI heads log to the event storage in training: run them under ``EventStorage`` (the
trainers do).
"""
import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from detectron2.layers import ShapeSpec
from detectron2.modeling.anchor_generator import DefaultAnchorGenerator
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.modeling.matcher import Matcher
from detectron2.modeling.poolers import ROIPooler, assign_boxes_to_levels, convert_boxes_to_pooler_format
from detectron2.modeling.proposal_generator import RPN, StandardRPNHead
from detectron2.modeling.roi_heads import FastRCNNConvFCHead, FastRCNNOutputLayers, StandardROIHeads
from detectron2.structures import ImageList, Instances

from codetr.layers import ROIAlign

__all__ = ["LevelConcatROIPooler", "RCNNBranch", "ValidAnchorRPN"]


def _use_codetr_roi_align(pooler: ROIPooler) -> None:
    """Replace each detectron2 ``ROIAlign`` in ``pooler.level_poolers`` by codetr's, with the same settings."""
    for i, level_pooler in enumerate(pooler.level_poolers):
        pooler.level_poolers[i] = ROIAlign(
            level_pooler.output_size,
            spatial_scale=level_pooler.spatial_scale,
            sampling_ratio=level_pooler.sampling_ratio,
            aligned=level_pooler.aligned,
        )


class LevelConcatROIPooler(ROIPooler):
    """detectron2's :class:`ROIPooler` (same constructor, level assignment, per-level poolers and output), combining
    the levels differently: the boxes are grouped by level, each level's RoIAlign output is concatenated and the rows
    are put back in box order by one permutation, instead of being written level by level into a zero tensor with
    ``index_put_``. The values are the same; in training the backward of those ``index_put_`` calls clones the whole
    (K, C, R, R) gradient once per level (4 copies of 51 MB for Co-Deformable-DETR's 2 x 512 RoIs), the permutation's
    backward is one zero fill and one scatter. One host sync (the per-level counts) replaces detectron2's one
    ``nonzero`` per level.

    Tracing and scripting (and a single level) use detectron2's forward unchanged.
    """

    def forward(self, x: List[Tensor], box_lists) -> Tensor:
        """
        Args:
            x: one (N, C, H_l, W_l) map per level, finest first.
            box_lists: N ``Boxes``, one per image, in the input image's coordinates.

        Returns:
            (sum n_i, C, R, R): the pooled features, image-major in the order of ``box_lists``.
        """
        num_levels = len(self.level_poolers)
        if num_levels == 1 or len(box_lists) == 0 or torch.jit.is_tracing() or torch.jit.is_scripting():
            return super().forward(x, box_lists)
        if len(x) != num_levels:
            raise ValueError(f"ROIPooler: {num_levels} levels but {len(x)} feature maps")
        if len(box_lists) != x[0].size(0):
            raise ValueError(f"ROIPooler: {len(box_lists)} box lists for a batch of {x[0].size(0)} maps")
        boxes = convert_boxes_to_pooler_format(box_lists)
        levels = assign_boxes_to_levels(
            box_lists, self.min_level, self.max_level, self.canonical_box_size, self.canonical_level
        )
        order = torch.argsort(levels, stable=True)
        counts = torch.bincount(levels, minlength=num_levels).tolist()
        grouped = boxes.index_select(0, order).split(counts)
        pooled = torch.cat([pooler(f, b) for pooler, f, b in zip(self.level_poolers, x, grouped)])
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        return pooled.index_select(0, inverse)


class ValidAnchorRPN(RPN):
    """detectron2's :class:`RPN` whose anchor sampling skips anchors outside each image's valid region.

    An anchor is valid when its feature location (y, x) on level l satisfies ``y < ceil(H_i / stride_l)`` and
    ``x < ceil(W_i / stride_l)``, with (H_i, W_i) image i's size (``images.image_sizes``) rounded up to
    ``valid_size_divisor`` (mmdet's per-image ``pad_shape``; official pipelines pad to 32). Invalid anchors get the
    label -1 (ignored: neither positive nor sampled negative) before detectron2 samples the 256 anchors per image.
    Everything else is detectron2's (matching, sampling, losses, proposals).

    Args:
        valid_size_divisor: the per-image padding multiple of the official pipeline (32).
        everything else: :class:`detectron2.modeling.proposal_generator.RPN`'s arguments.
    """

    def __init__(self, *args, valid_size_divisor: int = 32, **kwargs):
        super().__init__(*args, **kwargs)
        self.valid_size_divisor = int(valid_size_divisor)
        self._valid_per_image = None

    def valid_anchors(self, grid_sizes: Sequence[Tuple[int, int]], image_sizes, device) -> Tensor:
        """(B, R) bool over the anchors of every level in detectron2's order (location-major, A per location)."""
        d = max(self.valid_size_divisor, 1)
        sizes = torch.as_tensor([[h, w] for h, w in image_sizes], device=device)
        sizes = torch.div(sizes + d - 1, d, rounding_mode="floor") * d
        num_cell = self.anchor_generator.num_cell_anchors
        masks = []
        for (h, w), stride, a in zip(grid_sizes, self.anchor_generator.strides, num_cell):
            vh = torch.div(sizes[:, 0] + stride - 1, stride, rounding_mode="floor")
            vw = torch.div(sizes[:, 1] + stride - 1, stride, rounding_mode="floor")
            ys = torch.arange(h, device=device)
            xs = torch.arange(w, device=device)
            m = (ys[None, :, None] < vh[:, None, None]) & (xs[None, None, :] < vw[:, None, None])  # (B, h, w)
            masks.append(m.flatten(1).repeat_interleave(a, dim=1))
        return torch.cat(masks, dim=1)

    def forward(self, images: ImageList, features: Dict[str, Tensor], gt_instances: Optional[List[Instances]] = None):
        if self.training and gt_instances is not None:
            grid = [tuple(features[f].shape[-2:]) for f in self.in_features]
            device = features[self.in_features[0]].device
            self._valid_per_image = iter(self.valid_anchors(grid, images.image_sizes, device))
        try:
            return super().forward(images, features, gt_instances)
        finally:
            self._valid_per_image = None

    def _subsample_labels(self, label: Tensor) -> Tensor:
        # called once per image, in batch order, by RPN.label_and_sample_anchors
        if self._valid_per_image is not None:
            label = label.masked_fill(~next(self._valid_per_image), -1)
        return super()._subsample_labels(label)


class RCNNBranch(nn.Module):
    """RPN + RoI head on the auxiliary maps; returns ``(losses, positives)`` (docs/design.md)."""

    eval_name = "rcnn"  # CoDETR(eval_module="rcnn") evaluates this branch

    def __init__(
        self,
        *,
        num_classes: int,
        in_channels: int = 256,
        strides: Sequence[int] = (4, 8, 16, 32, 64, 128),
        num_roi_levels: int = 5,
        anchor_octave_base_scale: float = 4.0,
        anchor_scales_per_octave: int = 3,
        anchor_ratios: Sequence[float] = (0.5, 1.0, 2.0),
        rpn_iou_thresholds: Tuple[float, float] = (0.3, 0.7),
        rpn_batch_size_per_image: int = 256,
        rpn_positive_fraction: float = 0.5,
        rpn_pre_nms_topk: Tuple[int, int] = (4000, 1000),
        rpn_post_nms_topk: Tuple[int, int] = (1000, 1000),
        rpn_nms_thresh: float = 0.7,
        roi_iou_threshold: float = 0.5,
        roi_batch_size_per_image: int = 512,
        roi_positive_fraction: float = 0.25,
        roi_pooler_resolution: int = 7,
        roi_finest_scale: int = 56,
        fc_dim: int = 1024,
        num_fc: int = 2,
        num_conv: int = 0,
        conv_norm: str = "",
        bbox_reg_weights: Tuple[float, float, float, float] = (10.0, 10.0, 5.0, 5.0),
        cls_agnostic_bbox_reg: bool = False,
        loss_rpn_cls_weight: float = 1.0,
        loss_rpn_bbox_weight: float = 1.0,
        loss_cls_weight: float = 1.0,
        loss_bbox_weight: float = 10.0,
        test_score_thresh: float = 0.0,
        test_nms_thresh: float = 0.5,
        test_detections_per_image: int = 100,
        max_positives: int = 2000,
        head_index: int = 0,
        return_feats: bool = False,
        mask_head: Optional[nn.Module] = None,
        mask_pooler_resolution: int = 14,
    ):
        """
        Args:
            num_classes: foreground classes (background = ``num_classes``).
            strides: strides of the input maps; the RPN runs on all of them.
            num_roi_levels: RoIAlign reads the first ``num_roi_levels`` maps.
            roi_finest_scale: mmdet's ``finest_scale`` (Co-DINO 56, Co-Deformable-DETR 112).
            num_conv, conv_norm: 3x3 convs (``conv_norm``: e.g. "GN") before the FCs of the box head (the ViT-L
                COCO config's ConvFCBBoxHead: 4 convs + GN, 1 FC).
            loss_*_weight: multipliers (Co-DINO configs: RPN CE 12, RPN L1 12, RoI CE 12, RoI GIoU 120).
            max_positives: cap of the per-image positive-query candidates (official 2000).
            head_index: appended to the loss keys.
            return_feats: add ``feats`` (M, C), each sampled RoI's 7x7 RoIAlign features averaged, to the
                positives (Co-Deformable-DETR's positive queries use them).
            mask_head: optional mask head of detectron2's ``BaseMaskRCNNHead`` interface (``MaskRCNNConvUpsampleHead``
                with ``input_shape`` (in_channels, R, R), R = ``mask_pooler_resolution``; its ``loss_weight`` is the
                mask loss weight): the branch becomes Mask R-CNN and training needs ``gt_masks``.
            mask_pooler_resolution: RoIAlign output size of the mask pooler (official 14).
        """
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"RCNNBranch: num_classes must be >= 1, got {num_classes}")
        strides = [int(s) for s in strides]
        if not 1 <= num_roi_levels <= len(strides):
            raise ValueError(f"RCNNBranch: num_roi_levels must be in [1, {len(strides)}], got {num_roi_levels}")
        self.num_classes = num_classes
        self.strides = strides
        self.head_index = head_index
        self.max_positives = max_positives
        self.return_feats = return_feats
        self.in_features = [f"p{int(round(math.log2(s)))}" for s in strides]

        sizes = [
            [anchor_octave_base_scale * s * 2 ** (k / anchor_scales_per_octave) for k in range(anchor_scales_per_octave)]
            for s in strides
        ]
        anchor_generator = DefaultAnchorGenerator(
            sizes=sizes, aspect_ratios=[list(anchor_ratios)], strides=strides, offset=0.0
        )
        num_anchors = anchor_scales_per_octave * len(anchor_ratios)
        self.rpn = ValidAnchorRPN(
            in_features=self.in_features,
            head=StandardRPNHead(in_channels=in_channels, num_anchors=num_anchors, box_dim=4),
            anchor_generator=anchor_generator,
            anchor_matcher=Matcher(list(rpn_iou_thresholds), [0, -1, 1], allow_low_quality_matches=True),
            box2box_transform=Box2BoxTransform(weights=(1.0, 1.0, 1.0, 1.0)),
            batch_size_per_image=rpn_batch_size_per_image,
            positive_fraction=rpn_positive_fraction,
            pre_nms_topk=tuple(rpn_pre_nms_topk),
            post_nms_topk=tuple(rpn_post_nms_topk),
            nms_thresh=rpn_nms_thresh,
            min_box_size=0.0,
            anchor_boundary_thresh=-1.0,
            loss_weight={"loss_rpn_cls": float(loss_rpn_cls_weight), "loss_rpn_loc": float(loss_rpn_bbox_weight)},
            box_reg_loss_type="smooth_l1",
            smooth_l1_beta=0.0,  # L1, as the official L1Loss
        )

        roi_features = self.in_features[:num_roi_levels]
        min_level = int(round(math.log2(strides[0])))
        pooler = LevelConcatROIPooler(
            output_size=roi_pooler_resolution,
            scales=[1.0 / s for s in strides[:num_roi_levels]],
            sampling_ratio=0,
            pooler_type="ROIAlignV2",
            canonical_box_size=roi_finest_scale,
            canonical_level=min_level,
        )
        _use_codetr_roi_align(pooler)
        box_head = FastRCNNConvFCHead(
            ShapeSpec(channels=in_channels, height=roi_pooler_resolution, width=roi_pooler_resolution),
            conv_dims=[in_channels] * num_conv,
            fc_dims=[fc_dim] * num_fc,
            conv_norm=conv_norm,
        )
        box_predictor = FastRCNNOutputLayers(
            box_head.output_shape,
            box2box_transform=Box2BoxTransform(weights=bbox_reg_weights),
            num_classes=num_classes,
            test_score_thresh=test_score_thresh,
            test_nms_thresh=test_nms_thresh,
            test_topk_per_image=test_detections_per_image,
            cls_agnostic_bbox_reg=cls_agnostic_bbox_reg,
            box_reg_loss_type="giou",
            loss_weight={"loss_cls": float(loss_cls_weight), "loss_box_reg": float(loss_bbox_weight)},
        )
        mask_args = {}
        if mask_head is not None:
            predictor = getattr(mask_head, "predictor", None)
            if predictor is not None and predictor.out_channels not in (1, num_classes):
                raise ValueError(
                    f"RCNNBranch: the mask head predicts {predictor.out_channels} classes, the branch has {num_classes}"
                )
            mask_pooler = LevelConcatROIPooler(
                output_size=mask_pooler_resolution,
                scales=[1.0 / s for s in strides[:num_roi_levels]],
                sampling_ratio=0,
                pooler_type="ROIAlignV2",
                canonical_box_size=roi_finest_scale,
                canonical_level=min_level,
            )
            _use_codetr_roi_align(mask_pooler)
            mask_args = dict(mask_in_features=roi_features, mask_pooler=mask_pooler, mask_head=mask_head)
        self.roi_heads = StandardROIHeads(
            num_classes=num_classes,
            batch_size_per_image=roi_batch_size_per_image,
            positive_fraction=roi_positive_fraction,
            proposal_matcher=Matcher([roi_iou_threshold], [0, 1], allow_low_quality_matches=False),
            proposal_append_gt=True,
            box_in_features=roi_features,
            box_pooler=pooler,
            box_head=box_head,
            box_predictor=box_predictor,
            **mask_args,
        )

    @property
    def with_mask(self) -> bool:
        """Whether the RoI head has a mask head (Mask R-CNN)."""
        return self.roi_heads.mask_on

    def _feature_dict(self, features: List[Tensor]) -> Dict[str, Tensor]:
        if len(features) != len(self.in_features):
            raise ValueError(f"RCNNBranch: expected {len(self.in_features)} feature maps, got {len(features)}")
        return dict(zip(self.in_features, features))

    def forward(
        self, features: List[Tensor], images: ImageList, gt_instances: List[Instances]
    ) -> Tuple[Dict[str, Tensor], List[Dict[str, Tensor]]]:
        """
        Args:
            features: list of (B, C, h_l, w_l), one per stride.
            images: ImageList; its ``image_sizes`` clip the proposals.
            gt_instances: per image ``gt_boxes`` (XYXY absolute) and ``gt_classes``.

        Returns:
            losses: ``loss_rpn_cls{i}``, ``loss_rpn_bbox{i}``, ``loss_cls{i}``, ``loss_bbox{i}`` (and ``loss_mask{i}``
                with a mask head; then every image with objects needs ``gt_masks``).
            positives: per image ``boxes`` (M, 4) the sampled RoIs (positives first), ``labels`` (M,),
                ``target_boxes`` (M, 4) their GT boxes (zeros for background), with ``return_feats`` also ``feats``
                (M, C); M is the same for every image.
        """
        if len(gt_instances) != features[0].shape[0]:
            raise ValueError(
                f"RCNNBranch: {len(gt_instances)} gt_instances for a batch of {features[0].shape[0]} images"
            )
        if self.with_mask:
            for k, gt in enumerate(gt_instances):
                # an image without objects has no gt_masks field (detectron2's annotations_to_instances): none needed
                if len(gt) > 0 and not gt.has("gt_masks"):
                    raise ValueError(
                        f"RCNNBranch: the mask head needs gt_masks, image {k} of the batch has none (set "
                        "dataloader.train.mapper.use_instance_mask=True)"
                    )
        feats = self._feature_dict(features)
        proposals, rpn_losses = self.rpn(images, feats, gt_instances)
        pooled: List[Tensor] = []
        hook = None
        if self.return_feats:
            # the box head's own RoIAlign output (B * 512 sampled RoIs, image-major): the positives' features are
            # read from it rather than pooled a second time (same values; one RoIAlign forward and backward less)
            hook = self.roi_heads.box_pooler.register_forward_hook(lambda _m, _inp, out: pooled.append(out))
        try:
            sampled, roi_losses = self.roi_heads(images, feats, proposals, gt_instances)
        finally:
            if hook is not None:
                hook.remove()
        i = self.head_index
        losses = {
            f"loss_rpn_cls{i}": rpn_losses["loss_rpn_cls"],
            f"loss_rpn_bbox{i}": rpn_losses["loss_rpn_loc"],
            f"loss_cls{i}": roi_losses["loss_cls"],
            f"loss_bbox{i}": roi_losses["loss_box_reg"],
        }
        if self.with_mask:
            losses[f"loss_mask{i}"] = roi_losses["loss_mask"]
        positives = self.positives(sampled)
        if self.return_feats:
            if len(pooled) != 1:
                raise RuntimeError(f"RCNNBranch: the box pooler ran {len(pooled)} times in one training forward")
            m = positives[0]["boxes"].shape[0]
            # mean over the RoI grid first, then split: slicing the (K, C, R, R) output would make the backward
            # allocate and copy a zero tensor of each image's share and concatenate them
            per_image = pooled[0].mean(dim=(2, 3)).split([len(p) for p in sampled])  # (n_i, C) each
            for p, f in zip(positives, per_image):
                p["feats"] = f[:m]
        return losses, positives

    @torch.no_grad()
    def positives(self, sampled: List[Instances]) -> List[Dict[str, Tensor]]:
        """Sampled RoIs -> positive-query candidates, truncated to the smallest per-image count (cap)."""
        m = min([self.max_positives] + [len(p) for p in sampled])
        out = []
        for p in sampled:
            boxes = p.proposal_boxes.tensor[:m]
            labels = p.gt_classes[:m]
            fg = (labels >= 0) & (labels < self.num_classes)
            if p.has("gt_boxes"):
                targets = p.gt_boxes.tensor[:m] * fg[:, None]
            else:
                targets = torch.zeros_like(boxes)
            out.append({"boxes": boxes.detach(), "labels": labels, "target_boxes": targets})
        return out

    @torch.no_grad()
    def mask_inference(self, features: Sequence[Tensor], detections: List[Instances]) -> List[Instances]:
        """Masks of given detections, by the RoI mask head (eval mode).

        Args:
            features: (B, C, h_l, w_l) maps, finest first, at least the ``num_roi_levels`` RoI levels (the encoder
                maps: the extra map is not needed).
            detections: per image ``pred_boxes`` (XYXY pixels of the input image) and ``pred_classes``.

        Returns:
            ``detections`` with ``pred_masks`` (R, 1, M, M): each box's mask probabilities on its M x M grid
            (M = 28; detectron2's ``mask_rcnn_inference``, the channel of its class), pasted at the output size by
            ``detector_postprocess``.
        """
        if not self.with_mask:
            raise ValueError("RCNNBranch.mask_inference: the branch has no mask head")
        names = self.roi_heads.mask_in_features
        if len(features) < len(names):
            raise ValueError(f"RCNNBranch.mask_inference: needs {len(names)} feature maps, got {len(features)}")
        return self.roi_heads.forward_with_given_boxes(dict(zip(names, features)), detections)

    @torch.no_grad()
    def inference(self, features: List[Tensor], images: ImageList) -> List[Instances]:
        """Detections (``pred_boxes``, ``scores``, ``pred_classes``, with a mask head also ``pred_masks`` of the
        RoI head's own boxes) in input-image coordinates (eval mode)."""
        feats = self._feature_dict(features)
        proposals, _ = self.rpn(images, feats, None)
        results, _ = self.roi_heads(images, feats, proposals, None)
        return results
