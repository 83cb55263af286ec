"""FCOS and RetinaNet auxiliary heads against Detectron2's own FCOS / RetinaNet meta-architectures on the same
maps, weights and targets: positives (labels, target boxes), losses and detections; the FCOS reference squares
against a hand-built point grid."""
import math

import pytest
import torch

from detectron2.layers import ShapeSpec
from detectron2.modeling.anchor_generator import DefaultAnchorGenerator
from detectron2.modeling.backbone import Backbone
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.modeling.matcher import Matcher
from detectron2.modeling.meta_arch.fcos import FCOS, FCOSHead
from detectron2.modeling.meta_arch.retinanet import RetinaNet, RetinaNetHead
from detectron2.structures import Boxes, ImageList, Instances
from detectron2.utils.events import EventStorage

from codetr.modeling.dense_heads import FCOSAuxHead, RetinaNetAuxHead
from dino_utils import one_thread  # noqa: F401,E402 (fixture)

pytestmark = pytest.mark.usefixtures("one_thread")

STRIDES = (8, 16, 32, 64, 128)
C = 32
K = 4
PAD = (256, 256)
SIZES = [(256, 240), (200, 256), (256, 256)]


class _MapsBackbone(Backbone):
    """Only declares the map strides: the Detectron2 meta-architectures read them from ``output_shape``."""

    def output_shape(self):
        return {f"p{i}": ShapeSpec(channels=C, stride=s) for i, s in enumerate(STRIDES)}

    def forward(self, x):
        raise NotImplementedError("the tests hand the maps to the heads directly")


def _inputs():
    g = torch.Generator().manual_seed(0)
    features = [torch.randn(len(SIZES), C, PAD[0] // s, PAD[1] // s, generator=g) for s in STRIDES]
    boxes = [
        [[10, 12, 40, 50], [30, 40, 130, 120], [100, 20, 236, 250], [60, 60, 72, 76]],
        [[5, 5, 250, 195], [120, 100, 160, 150]],
        [],
    ]
    gts = []
    for b, (h, w) in zip(boxes, SIZES):
        inst = Instances((h, w))
        inst.gt_boxes = Boxes(torch.tensor(b, dtype=torch.float32).reshape(-1, 4))
        inst.gt_classes = torch.arange(len(b), dtype=torch.int64) % K
        gts.append(inst)
    images = ImageList(torch.zeros(len(SIZES), 3, *PAD), SIZES)
    return features, images, gts


def _randomize(module, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05 + (p.data if p.dim() == 1 else 0))


def test_fcos_aux_head_matches_detectron2_fcos():
    features, images, gts = _inputs()
    ours = FCOSAuxHead(num_classes=K, in_channels=C, strides=STRIDES, conv_dims=(C, C), head_index=5,
                       loss_cls_weight=2.0, loss_bbox_weight=3.0, loss_centerness_weight=4.0)  # fmt: skip
    _randomize(ours, 1)
    shapes = list(_MapsBackbone().output_shape().values())
    d2 = FCOS(
        backbone=_MapsBackbone(),
        head=FCOSHead(input_shape=shapes, conv_dims=[C, C], num_classes=K, norm="GN"),
        num_classes=K,
        pixel_mean=[0.0, 0.0, 0.0],
        pixel_std=[1.0, 1.0, 1.0],
    )
    d2.head.load_state_dict(ours.head.state_dict())

    losses, positives = ours(features, images, gts)
    assert sorted(losses) == ["loss_bbox5", "loss_centerness5", "loss_cls5"]
    anchors = d2.anchor_generator(features)
    labels, targets = d2.label_anchors(anchors, gts)
    num_pos = 0
    for p, lab, tgt in zip(positives, labels, targets):
        assert torch.equal(p["labels"], lab)
        fg = lab < K
        num_pos += int(fg.sum())
        assert torch.equal(p["target_boxes"][fg], tgt[fg])
    # positives on several levels (the scale ranges matter)
    level_of = torch.cat([torch.full((len(a),), i) for i, a in enumerate(anchors)])
    assert len(set(level_of[labels[0] < K].tolist())) >= 3 and num_pos > 20

    # reference squares: side 8 x stride around the points ((j + 1/2) s, (i + 1/2) s), level by level, row-major
    expect = []
    for s, f in zip(STRIDES, features):
        ys, xs = torch.meshgrid((torch.arange(f.shape[2]) + 0.5) * s, (torch.arange(f.shape[3]) + 0.5) * s, indexing="ij")
        ctr = torch.stack([xs.flatten(), ys.flatten()], 1).float()
        expect.append(torch.cat([ctr - 4 * s, ctr + 4 * s], 1))
    assert torch.equal(positives[0]["boxes"], torch.cat(expect))

    d2.loss_normalizer = float(num_pos)  # its moving average, set to this batch's count
    with EventStorage():
        ref = d2.forward_training(images, features, d2.head(features), gts)
    torch.testing.assert_close(losses["loss_cls5"] / 2.0, ref["loss_fcos_cls"], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(losses["loss_bbox5"] / 3.0, ref["loss_fcos_loc"], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(losses["loss_centerness5"] / 4.0, ref["loss_fcos_ctr"], rtol=1e-5, atol=1e-7)
    sum(losses.values()).backward()
    assert all(p.grad is not None for p in ours.parameters())

    with torch.no_grad():
        ours.test_score_thresh = d2.test_score_thresh = 0.05
        dets = ours.inference(features, images)
        ref_dets = d2.forward_inference(images, features, d2.head(features))
    for a, b in zip(dets, ref_dets):
        assert len(a) > 0
        torch.testing.assert_close(a.pred_boxes.tensor, b.pred_boxes.tensor)
        torch.testing.assert_close(a.scores, b.scores)
        assert torch.equal(a.pred_classes, b.pred_classes)


def test_retinanet_aux_head_matches_detectron2_retinanet():
    features, images, gts = _inputs()
    ours = RetinaNetAuxHead(num_classes=K, in_channels=C, strides=STRIDES, conv_dims=(C,), head_index=3, loss_cls_weight=12.0, loss_bbox_weight=6.0)
    _randomize(ours, 2)
    shapes = list(_MapsBackbone().output_shape().values())
    # Detectron2's RetinaNet defaults written out: sizes 32..512 x 2^(i/3), ratios 0.5/1/2, IoU 0.4/0.5, beta 0.1
    d2 = RetinaNet(
        backbone=_MapsBackbone(),
        head=RetinaNetHead(input_shape=shapes, num_classes=K, num_anchors=9, conv_dims=[C]),
        head_in_features=[f"p{i}" for i in range(5)],
        anchor_generator=DefaultAnchorGenerator(
            sizes=[[x * 2 ** (i / 3) for i in range(3)] for x in (32, 64, 128, 256, 512)],
            aspect_ratios=[[0.5, 1.0, 2.0]],
            strides=list(STRIDES),
            offset=0.0,
        ),
        box2box_transform=Box2BoxTransform(weights=(1.0, 1.0, 1.0, 1.0)),
        anchor_matcher=Matcher([0.4, 0.5], [0, -1, 1], allow_low_quality_matches=True),
        num_classes=K,
        smooth_l1_beta=0.1,
        pixel_mean=[0.0, 0.0, 0.0],
        pixel_std=[1.0, 1.0, 1.0],
    )
    d2.head.load_state_dict(ours.head.state_dict())

    losses, positives = ours(features, images, gts)
    assert sorted(losses) == ["loss_bbox3", "loss_cls3"]
    anchors = d2.anchor_generator(features)
    assert torch.equal(positives[0]["boxes"], Boxes.cat(anchors).tensor)
    labels, targets = d2.label_anchors(anchors, gts)
    num_pos = 0
    for p, lab, tgt in zip(positives, labels, targets):
        assert torch.equal(p["labels"], lab)
        fg = (lab >= 0) & (lab < K)
        num_pos += int(fg.sum())
        assert torch.equal(p["target_boxes"][fg], tgt[fg])
    assert num_pos > 5 and bool((labels[0] == -1).any())
    assert bool((positives[2]["labels"] == K).all())  # the image without GT: all background

    d2.loss_normalizer = float(num_pos)
    with EventStorage():
        ref = d2.forward_training(images, features, d2.head(features), gts)
    torch.testing.assert_close(losses["loss_cls3"] / 12.0, ref["loss_cls"], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(losses["loss_bbox3"] / 6.0, ref["loss_box_reg"], rtol=1e-5, atol=1e-7)

    with torch.no_grad():
        dets = ours.inference(features, images)
        ref_dets = d2.forward_inference(images, features, d2.head(features))
    for a, b in zip(dets, ref_dets):
        assert len(a) > 0
        torch.testing.assert_close(a.pred_boxes.tensor, b.pred_boxes.tensor)
        torch.testing.assert_close(a.scores, b.scores)
        assert torch.equal(a.pred_classes, b.pred_classes)


def test_dense_heads_check_inputs():
    features, images, gts = _inputs()
    head = FCOSAuxHead(num_classes=K, in_channels=C, strides=STRIDES, conv_dims=(C,))
    with pytest.raises(ValueError, match="expected 5 feature maps"):
        head(features[:4], images, gts)
    with pytest.raises(ValueError, match="2 gt_instances for a batch of 3"):
        head(features, images, gts[:2])
    with pytest.raises(ValueError, match="num_classes"):
        RetinaNetAuxHead(num_classes=0)
    assert math.isfinite(float(sum(head(features, images, gts)[0].values()).detach()))
