"""FCOS and RetinaNet as Co-DETR auxiliary heads, made of Detectron2's own FCOS / RetinaNet pieces.

Each head follows the auxiliary-head contract of docs/design.md: ``forward(features, images, gt_instances)``
-> ``(losses, positives)``, with one positives dict per image (``boxes``, ``labels`` with background =
``num_classes``, ``target_boxes``; XYXY absolute, all anchors/points of the image).

What comes from Detectron2, unchanged:

* the heads: ``FCOSHead`` (cls / box towers + centerness branch) and ``RetinaNetHead``;
* anchors / points: ``DefaultAnchorGenerator`` (FCOS: one box of side s per location of the stride-s map, centred
  on the point ((j + 1/2) s, (i + 1/2) s) as in Detectron2's FCOS; RetinaNet: offset 0 as its LazyConfig);
* matching: ``FCOS.label_anchors`` (centre sampling radius 1.5 strides, point inside the GT, largest distance
  to a side in (4 s, 8 s) on the level of stride s -- from 0 on the finest level, to infinity on the coarsest --,
  the smallest GT wins) and ``RetinaNet.label_anchors``
  (``Matcher`` IoU 0.4 / 0.5 with low-quality matches; between the thresholds: ignored, label -1);
* box coding: ``Box2BoxTransformLinear(normalize_by_size=True)`` (FCOS) and ``Box2BoxTransform`` (RetinaNet);
* losses: fvcore's sigmoid focal loss (sum), ``_dense_box_regression_loss`` (FCOS: GIoU; RetinaNet: smooth L1,
  beta 0.1) and FCOS's centerness targets with a BCE loss;
* inference: ``DenseDetector``'s per-level decoding and the FCOS / RetinaNet NMS.

One difference: Detectron2 divides the losses by an exponential moving average of the number of positive
anchors, kept on the module and read with a host sync; here the normaliser is the batch's number of
positives averaged over processes (``all_reduce_normalizer``, >= 1), as the other auxiliary heads of Co-DETR.
With the moving average set to the batch's count, the losses equal Detectron2's (tests/test_dense_heads.py).

Positive queries: a RetinaNet positive's reference box is its anchor. An FCOS positive is a point; its reference
box is a square of side ``query_box_scale * stride`` (8 x stride, the size of ATSS's anchor at that level)
centred on the point. Points in the batch padding are negatives (Detectron2's FCOS does not mask them either).
"""
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from fvcore.nn import sigmoid_focal_loss_jit
from torch import Tensor, nn

from detectron2.layers import ShapeSpec, cat
from detectron2.modeling.anchor_generator import DefaultAnchorGenerator
from detectron2.modeling.box_regression import Box2BoxTransform, Box2BoxTransformLinear, _dense_box_regression_loss
from detectron2.modeling.matcher import Matcher
from detectron2.modeling.meta_arch.dense_detector import DenseDetector
from detectron2.modeling.meta_arch.fcos import FCOS, FCOSHead
from detectron2.modeling.meta_arch.retinanet import RetinaNet, RetinaNetHead
from detectron2.structures import Boxes, ImageList, Instances

from .losses import all_reduce_normalizer

__all__ = ["FCOSAuxHead", "RetinaNetAuxHead"]


def _image_sizes(images) -> List[Tuple[int, int]]:
    sizes = images.image_sizes if isinstance(images, ImageList) else images
    return [(int(h), int(w)) for h, w in sizes]


class _DenseAuxHead(nn.Module):
    """What the two heads share: Detectron2's ``DenseDetector`` transposition and per-level decoding."""

    _transpose_dense_predictions = DenseDetector._transpose_dense_predictions
    _decode_per_level_predictions = DenseDetector._decode_per_level_predictions
    _decode_multi_level_predictions = DenseDetector._decode_multi_level_predictions

    def __init__(self, num_classes: int, strides: Sequence[int], head_index: int, loss_weights: Dict[str, float]):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"{type(self).__name__}: num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.strides = [int(s) for s in strides]
        self.head_index = head_index
        self.loss_weights = dict(loss_weights)

    def _check_inputs(self, features: Sequence[Tensor], gt_instances: Optional[List[Instances]] = None):
        if len(features) != len(self.strides):
            raise ValueError(
                f"{type(self).__name__}: expected {len(self.strides)} feature maps (strides {self.strides}), "
                f"got {len(features)}"
            )
        if gt_instances is not None and len(gt_instances) != features[0].shape[0]:
            raise ValueError(
                f"{type(self).__name__}: {len(gt_instances)} gt_instances for a batch of {features[0].shape[0]} images"
            )

    def _named(self, losses: Dict[str, Tensor]) -> Dict[str, Tensor]:
        """Weights applied, head index appended to the keys."""
        return {f"{k}{self.head_index}": v * self.loss_weights[k] for k, v in losses.items()}


class FCOSAuxHead(_DenseAuxHead):
    """FCOS auxiliary head on the adapter's maps (Detectron2's ``FCOSHead``, point matching and losses)."""

    eval_name = "fcos"

    # Detectron2's FCOS point labelling and centerness targets, used as they are
    _match_anchors = FCOS._match_anchors
    label_anchors = FCOS.label_anchors
    compute_ctrness_targets = FCOS.compute_ctrness_targets
    inference_single_image = FCOS.inference_single_image

    def __init__(
        self,
        *,
        num_classes: int,
        in_channels: int = 256,
        strides: Sequence[int] = (8, 16, 32, 64, 128),
        conv_dims: Sequence[int] = (256,),
        norm: str = "GN",
        prior_prob: float = 0.01,
        center_sampling_radius: float = 1.5,
        focal_loss_alpha: float = 0.25,
        focal_loss_gamma: float = 2.0,
        query_box_scale: float = 8.0,
        loss_cls_weight: float = 1.0,
        loss_bbox_weight: float = 1.0,
        loss_centerness_weight: float = 1.0,
        head_index: int = 2,
        test_score_thresh: float = 0.2,
        test_topk_candidates: int = 1000,
        test_nms_thresh: float = 0.6,
        max_detections_per_image: int = 100,
    ):
        """
        Args:
            strides: stride of each input map (a single-scale DETR's adapter: 8..128; Co-DINO: 4..128).
            conv_dims: the towers' conv widths (Detectron2's FCOS: 4 x 256; default one conv, as Co-DETR's ATSS).
            norm: the towers' normalisation (Detectron2's ``get_norm`` name; FCOS: "GN").
            query_box_scale: side of a positive query's reference box, in strides.
            loss_*_weight: loss multipliers (Co-DETR configs: 12 for an auxiliary head).
            head_index: appended to the loss keys (``loss_cls2`` ...).
        """
        super().__init__(
            num_classes,
            strides,
            head_index,
            {"loss_cls": loss_cls_weight, "loss_bbox": loss_bbox_weight, "loss_centerness": loss_centerness_weight},
        )
        shapes = [ShapeSpec(channels=in_channels, stride=s) for s in self.strides]
        self.head = FCOSHead(
            input_shape=shapes, conv_dims=list(conv_dims), num_classes=num_classes, norm=norm, prior_prob=prior_prob
        )
        self.anchor_generator = DefaultAnchorGenerator(
            sizes=[[s] for s in self.strides], aspect_ratios=[1.0], strides=self.strides
        )
        self.box2box_transform = Box2BoxTransformLinear(normalize_by_size=True)
        self.center_sampling_radius = float(center_sampling_radius)
        self.focal_loss_alpha = focal_loss_alpha
        self.focal_loss_gamma = focal_loss_gamma
        self.query_box_scale = float(query_box_scale)
        self.test_score_thresh = test_score_thresh
        self.test_topk_candidates = test_topk_candidates
        self.test_nms_thresh = test_nms_thresh
        self.max_detections_per_image = max_detections_per_image

    def query_boxes(self, anchors: List[Boxes]) -> Tensor:
        """(R, 4) XYXY squares of side ``query_box_scale * stride`` centred on the points."""
        points = Boxes.cat(anchors)
        ctr = points.get_centers()
        half = (points.tensor[:, 2:3] - points.tensor[:, 0:1]) * (self.query_box_scale / 2)
        return torch.cat([ctr - half, ctr + half], dim=1)

    def forward(
        self, features: List[Tensor], images, gt_instances: List[Instances]
    ) -> Tuple[Dict[str, Tensor], List[Dict[str, Tensor]]]:
        """
        Args:
            features: (B, C, h_l, w_l) per stride; images: ImageList (unused but for the contract);
            gt_instances: per image ``gt_boxes`` (XYXY absolute) and ``gt_classes``.

        Returns:
            losses ``loss_cls{i}``, ``loss_bbox{i}``, ``loss_centerness{i}`` (weights applied) and, per image,
            ``boxes`` (R, 4) the points' reference squares, ``labels`` (R,), ``target_boxes`` (R, 4).
        """
        self._check_inputs(features, gt_instances)
        logits, deltas, ctrness = self._transpose_dense_predictions(self.head(features), [self.num_classes, 4, 1])
        anchors = self.anchor_generator(features)
        gt_labels, gt_boxes = self.label_anchors(anchors, gt_instances)
        losses = self.losses(anchors, logits, gt_labels, deltas, gt_boxes, ctrness)
        boxes = self.query_boxes(anchors)
        positives = [{"boxes": boxes, "labels": l, "target_boxes": t} for l, t in zip(gt_labels, gt_boxes)]
        return losses, positives

    def losses(
        self,
        anchors: List[Boxes],
        pred_logits: List[Tensor],
        gt_labels: List[Tensor],
        pred_deltas: List[Tensor],
        gt_boxes: List[Tensor],
        pred_centerness: List[Tensor],
    ) -> Dict[str, Tensor]:
        """Detectron2's FCOS losses (focal, GIoU, centerness BCE; sums) over the all-reduced number of positives.
        Shapes as ``FCOS.losses``: per level (B, R_l, K | 4 | 1); gt_labels / gt_boxes per image (R,) / (R, 4)."""
        gt_labels = torch.stack(gt_labels)  # (B, R)
        pos_mask = (gt_labels >= 0) & (gt_labels != self.num_classes)
        normalizer = all_reduce_normalizer(pos_mask.sum(), device=gt_labels.device)
        target = F.one_hot(gt_labels, num_classes=self.num_classes + 1)[:, :, :-1].to(pred_logits[0].dtype)
        loss_cls = sigmoid_focal_loss_jit(
            cat(pred_logits, dim=1), target, alpha=self.focal_loss_alpha, gamma=self.focal_loss_gamma, reduction="sum"
        )
        loss_box = _dense_box_regression_loss(
            anchors, self.box2box_transform, pred_deltas, gt_boxes, pos_mask, box_reg_loss_type="giou"
        )
        ctr_targets = self.compute_ctrness_targets(anchors, gt_boxes)  # (B, R)
        ctr_logits = cat(pred_centerness, dim=1).squeeze(2)
        loss_ctr = F.binary_cross_entropy_with_logits(ctr_logits[pos_mask], ctr_targets[pos_mask], reduction="sum")
        return self._named(
            {"loss_cls": loss_cls / normalizer, "loss_bbox": loss_box / normalizer, "loss_centerness": loss_ctr / normalizer}
        )

    @torch.no_grad()
    def inference(self, features: List[Tensor], images) -> List[Instances]:
        """Detections as Detectron2's FCOS: score sqrt(cls x centerness), threshold, top-k per level, NMS;
        ``images``: ImageList (or list of (h, w)) giving the sizes boxes are clipped to."""
        self._check_inputs(features)
        logits, deltas, ctrness = self._transpose_dense_predictions(self.head(features), [self.num_classes, 4, 1])
        anchors = self.anchor_generator(features)
        results = []
        for i, size in enumerate(_image_sizes(images)):
            scores = [torch.sqrt(x[i].sigmoid() * y[i].sigmoid()) for x, y in zip(logits, ctrness)]
            results.append(self.inference_single_image(anchors, scores, [x[i] for x in deltas], size))
        return results


class RetinaNetAuxHead(_DenseAuxHead):
    """RetinaNet auxiliary head on the adapter's maps (Detectron2's ``RetinaNetHead``, IoU matching, losses)."""

    eval_name = "retinanet"

    label_anchors = RetinaNet.label_anchors
    inference_single_image = RetinaNet.inference_single_image

    def __init__(
        self,
        *,
        num_classes: int,
        in_channels: int = 256,
        strides: Sequence[int] = (8, 16, 32, 64, 128),
        conv_dims: Sequence[int] = (256,),
        norm: str = "",
        prior_prob: float = 0.01,
        anchor_scale: float = 4.0,
        scales_per_octave: int = 3,
        aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0),
        anchor_offset: float = 0.0,
        iou_thresholds: Sequence[float] = (0.4, 0.5),
        iou_labels: Sequence[int] = (0, -1, 1),
        bbox_reg_weights: Tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0),
        focal_loss_alpha: float = 0.25,
        focal_loss_gamma: float = 2.0,
        smooth_l1_beta: float = 0.1,
        box_reg_loss_type: str = "smooth_l1",
        loss_cls_weight: float = 1.0,
        loss_bbox_weight: float = 1.0,
        head_index: int = 2,
        test_score_thresh: float = 0.05,
        test_topk_candidates: int = 1000,
        test_nms_thresh: float = 0.5,
        max_detections_per_image: int = 100,
    ):
        """
        Args:
            anchor_scale, scales_per_octave: anchor sizes of a level with stride s are
                ``anchor_scale * s * 2^(i / scales_per_octave)``, i < scales_per_octave (Detectron2's RetinaNet:
                32..512 on strides 8..128, i.e. 4 x stride, 3 scales), times ``aspect_ratios``.
            anchor_offset: anchor centres at ((j + offset) s, (i + offset) s) (Detectron2's RetinaNet config: 0).
            iou_thresholds, iou_labels: the ``Matcher`` (background below 0.4, ignored up to 0.5, foreground above;
                every GT also gets its best anchors).
            box_reg_loss_type: "smooth_l1" (Detectron2's default, ``smooth_l1_beta``), "giou", "diou" or "ciou".
            Other arguments as :class:`FCOSAuxHead`.
        """
        super().__init__(num_classes, strides, head_index, {"loss_cls": loss_cls_weight, "loss_bbox": loss_bbox_weight})
        sizes = [[anchor_scale * s * 2 ** (i / scales_per_octave) for i in range(scales_per_octave)] for s in self.strides]
        self.anchor_generator = DefaultAnchorGenerator(
            sizes=sizes, aspect_ratios=[list(aspect_ratios)], strides=self.strides, offset=anchor_offset
        )
        shapes = [ShapeSpec(channels=in_channels, stride=s) for s in self.strides]
        self.head = RetinaNetHead(
            input_shape=shapes,
            num_classes=num_classes,
            num_anchors=self.anchor_generator.num_cell_anchors[0],
            conv_dims=list(conv_dims),
            norm=norm,
            prior_prob=prior_prob,
        )
        self.box2box_transform = Box2BoxTransform(weights=bbox_reg_weights)
        self.anchor_matcher = Matcher(list(iou_thresholds), list(iou_labels), allow_low_quality_matches=True)
        self.focal_loss_alpha = focal_loss_alpha
        self.focal_loss_gamma = focal_loss_gamma
        self.smooth_l1_beta = smooth_l1_beta
        self.box_reg_loss_type = box_reg_loss_type
        self.test_score_thresh = test_score_thresh
        self.test_topk_candidates = test_topk_candidates
        self.test_nms_thresh = test_nms_thresh
        self.max_detections_per_image = max_detections_per_image

    def forward(
        self, features: List[Tensor], images, gt_instances: List[Instances]
    ) -> Tuple[Dict[str, Tensor], List[Dict[str, Tensor]]]:
        """As :meth:`FCOSAuxHead.forward`; losses ``loss_cls{i}``, ``loss_bbox{i}``; positives' ``boxes`` are
        the anchors, ``labels`` -1 for the ignored ones (neither positive nor padding for the queries)."""
        self._check_inputs(features, gt_instances)
        logits, deltas = self._transpose_dense_predictions(self.head(features), [self.num_classes, 4])
        anchors = self.anchor_generator(features)
        gt_labels, gt_boxes = self.label_anchors(anchors, gt_instances)
        losses = self.losses(anchors, logits, gt_labels, deltas, gt_boxes)
        boxes = Boxes.cat(anchors).tensor
        positives = [{"boxes": boxes, "labels": l, "target_boxes": t} for l, t in zip(gt_labels, gt_boxes)]
        return losses, positives

    def losses(
        self, anchors: List[Boxes], pred_logits: List[Tensor], gt_labels: List[Tensor], pred_deltas: List[Tensor], gt_boxes: List[Tensor]
    ) -> Dict[str, Tensor]:
        """Detectron2's RetinaNet losses (focal on non-ignored anchors, box regression on positives; sums) over the
        all-reduced number of positives."""
        gt_labels = torch.stack(gt_labels)  # (B, R)
        valid = gt_labels >= 0
        pos_mask = valid & (gt_labels != self.num_classes)
        normalizer = all_reduce_normalizer(pos_mask.sum(), device=gt_labels.device)
        target = F.one_hot(gt_labels[valid], num_classes=self.num_classes + 1)[:, :-1].to(pred_logits[0].dtype)
        loss_cls = sigmoid_focal_loss_jit(
            cat(pred_logits, dim=1)[valid], target, alpha=self.focal_loss_alpha, gamma=self.focal_loss_gamma, reduction="sum"
        )
        loss_box = _dense_box_regression_loss(
            anchors,
            self.box2box_transform,
            pred_deltas,
            gt_boxes,
            pos_mask,
            box_reg_loss_type=self.box_reg_loss_type,
            smooth_l1_beta=self.smooth_l1_beta,
        )
        return self._named({"loss_cls": loss_cls / normalizer, "loss_bbox": loss_box / normalizer})

    @torch.no_grad()
    def inference(self, features: List[Tensor], images) -> List[Instances]:
        """Detections as Detectron2's RetinaNet: sigmoid scores, threshold, top-k per level, class-aware NMS;
        ``images`` as :meth:`FCOSAuxHead.inference`."""
        self._check_inputs(features)
        logits, deltas = self._transpose_dense_predictions(self.head(features), [self.num_classes, 4])
        anchors = self.anchor_generator(features)
        return [
            self.inference_single_image(anchors, [x[i].sigmoid() for x in logits], [x[i] for x in deltas], size)
            for i, size in enumerate(_image_sizes(images))
        ]
