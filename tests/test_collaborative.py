"""Collaborative branch pieces on random maps: encoder maps, positive-query construction, the Faster R-CNN branch,
and the branch's calls into a query head (a recording stub; the real DINO head is tested in
test_collaborative_model.py)."""
import math

import pytest
import torch
from torch import nn

from detectron2.structures import Boxes, ImageList, Instances, pairwise_iou
from detectron2.utils.events import EventStorage

from codetr.modeling.adapter import MultiScaleAdapter
from codetr.modeling.atss import ATSSHead
from codetr.modeling.collaborative import CollaborativeBranch, get_aux_targets, memory_to_maps
from codetr.modeling.rcnn import RCNNBranch

from dino_utils import one_thread  # noqa: F401,E402 (fixture)

pytestmark = pytest.mark.usefixtures("one_thread")

K = 5  # classes; background = 5


def _inst(boxes, classes, size):
    inst = Instances(size)
    inst.gt_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
    inst.gt_classes = torch.tensor(classes, dtype=torch.long)
    return inst


# ----------------------------------------------------------------------------------------------- encoder maps
def test_memory_to_maps_inverts_flattening():
    shapes = [(8, 10), (4, 5), (2, 3)]
    maps = [torch.randn(2, 16, h, w) for h, w in shapes]
    memory = torch.cat([m.flatten(2).transpose(1, 2) for m in maps], 1)  # how the encoder flattens
    out = memory_to_maps(memory, torch.tensor(shapes))
    assert all(torch.equal(a, b) for a, b in zip(out, maps))
    # contiguous NCHW (a strided view of the memory sends the aux heads' convs down a slow path)
    assert all(m.is_contiguous() for m in out)
    with pytest.raises(ValueError, match="spatial_shapes"):
        memory_to_maps(memory[:, 1:], torch.tensor(shapes))


def test_extra_map_is_conv_s2_gn_of_last_level():
    """Through the adapter's identity path: the encoder maps unchanged + a 3x3 s2 conv + GN of the last one."""
    adapter = MultiScaleAdapter((8, 16, 32), (8, 16, 32, 64), embed_dim=32, num_gn_groups=8)
    branch = CollaborativeBranch(aux_heads=[nn.Identity()], num_classes=K, adapter=adapter)
    shapes = torch.tensor([[8, 10], [4, 5], [3, 3]])
    memory = torch.randn(2, 80 + 20 + 9, 32)
    maps = branch.encoder_maps(_StubQueryHead(32), {"memory": memory, "spatial_shapes": shapes})
    assert [tuple(m.shape[-2:]) for m in maps] == [(8, 10), (4, 5), (3, 3), (2, 2)]
    ref = memory_to_maps(memory, shapes)
    assert all(torch.equal(a, b) for a, b in zip(maps[:3], ref))
    (down,) = adapter.downsample
    conv, gn = down
    assert conv.stride == (2, 2) and conv.kernel_size == (3, 3) and conv.padding == (1, 1) and gn.num_groups == 8
    expected = torch.nn.functional.group_norm(
        torch.nn.functional.conv2d(ref[2], conv.weight, conv.bias, stride=2, padding=1), 8, gn.weight, gn.bias
    )
    assert torch.allclose(maps[3], expected, atol=1e-6)


class _Halve(nn.Module):
    def forward(self, maps):
        return [m[..., ::2, ::2] for m in maps]


def test_the_heads_read_the_adapter_output():
    """The adapter sees the query head's maps and its output is what the heads read (nothing appended); a
    non-protocol head and a missing adapter are refused."""
    branch = CollaborativeBranch(aux_heads=[nn.Identity()], num_classes=K, adapter=_Halve())
    shapes = torch.tensor([[8, 10], [4, 6]])
    memory = torch.randn(1, 80 + 24, 32)
    maps = branch.encoder_maps(_StubQueryHead(32), {"memory": memory, "spatial_shapes": shapes})
    ref = memory_to_maps(memory, shapes)
    assert [tuple(m.shape[-2:]) for m in maps] == [(4, 5), (2, 3)]
    assert torch.equal(maps[0], ref[0][..., ::2, ::2]) and torch.equal(maps[1], ref[1][..., ::2, ::2])
    with pytest.raises(TypeError, match="CollaborativeQueryHead"):
        branch({"memory": memory, "spatial_shapes": shapes}, None, [], nn.Linear(2, 2))
    with pytest.raises(TypeError, match="adapter must be an nn.Module"):
        CollaborativeBranch(aux_heads=[nn.Identity()], num_classes=K, adapter=None)


# ----------------------------------------------------------------------------------------------- get_aux_targets
def _positives(boxes, labels, targets):
    return {
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "labels": torch.tensor(labels, dtype=torch.long),
        "target_boxes": torch.tensor(targets, dtype=torch.float32).reshape(-1, 4),
    }


def test_aux_targets_hand_fixture_with_zero_positive_image():
    neg = [0.0, 0.0, 0.0, 0.0]
    img0 = _positives(
        [[10, 20, 30, 60], [0, 0, 50, 100], [5, 5, 15, 15], [40, 40, 80, 80]] + [[i, i, i + 5, i + 5] for i in range(10)],
        [2, K, 0, K] + [K] * 10,
        [[12, 18, 32, 58], neg, [4, 6, 16, 14], neg] + [neg] * 10,
    )
    img1 = _positives([[0, 0, 10, 10]] * 12, [K] * 12, [neg] * 12)  # no positive at all
    out = get_aux_targets([img0, img1], [(100, 50), (200, 100)], K)
    n = 9  # max(9, min(300, 2))
    assert out["ref_boxes"].shape == (2, n, 4) and out["boxes"].shape == (2, n, 4)
    assert out["labels"].shape == (2, n) and out["label_weights"].shape == (2, n)
    assert torch.equal(out["label_weights"], torch.ones(2, n))
    assert out["box_weights"].tolist() == [[1, 1] + [0] * 7, [0] * 9]
    # positives first, in their order; normalised by (w, h) = (50, 100) and in cxcywh
    assert out["labels"][0, :2].tolist() == [2, 0]
    assert torch.allclose(out["ref_boxes"][0, 0], torch.tensor([20 / 50, 40 / 100, 20 / 50, 40 / 100]))
    assert torch.allclose(out["boxes"][0, 0], torch.tensor([22 / 50, 38 / 100, 20 / 50, 40 / 100]))
    assert torch.allclose(out["ref_boxes"][0, 1], torch.tensor([10 / 50, 10 / 100, 10 / 50, 10 / 100]))
    assert torch.allclose(out["boxes"][0, 1], torch.tensor([10 / 50, 10 / 100, 12 / 50, 8 / 100]))
    # padding: background labels, and refs that are real negatives of the same image
    assert (out["labels"][:, 2:] == K).all() and (out["labels"][1] == K).all()
    negs = [[0, 0, 50, 100], [40, 40, 80, 80]] + [[i, i, i + 5, i + 5] for i in range(10)]
    neg0 = [(torch.tensor(b, dtype=torch.float32) / torch.tensor([50.0, 100, 50, 100])).tolist() for b in negs]
    for r in out["ref_boxes"][0, 2:]:
        xyxy = torch.cat([r[:2] - r[2:] / 2, r[:2] + r[2:] / 2])
        assert any(torch.allclose(xyxy, torch.tensor(nb), atol=1e-6) for nb in neg0)
    assert torch.allclose(out["ref_boxes"][1], torch.tensor([5 / 100, 5 / 200, 10 / 100, 10 / 200]).expand(9, 4))
    # 7 padding slots drawn from the 12 distinct negatives of image 0 without repetition
    assert len({tuple(r.tolist()) for r in out["ref_boxes"][0, 2:]}) == 7


def test_aux_targets_counts_subset_and_cap():
    g = torch.Generator().manual_seed(0)

    def rand_img(num_pos, num_neg):
        xy = torch.rand(num_pos + num_neg, 2, generator=g) * 100
        boxes = torch.cat([xy, xy + 10], 1)
        labels = torch.cat([torch.randint(K, (num_pos,), generator=g), torch.full((num_neg,), K)])
        perm = torch.randperm(num_pos + num_neg, generator=g)  # positives are not necessarily first
        return {"boxes": boxes[perm], "labels": labels[perm], "target_boxes": boxes[perm] + 1}

    sizes = [(120, 120)] * 3
    out = get_aux_targets([rand_img(40, 100), rand_img(25, 100), rand_img(0, 100)], sizes, K)
    assert out["labels"].shape == (3, 40)  # N = max positives = 40
    assert out["box_weights"].sum(1).tolist() == [40, 25, 0]
    assert ((out["labels"] < K) == (out["box_weights"] > 0)).all()
    # box targets of positives are their own (ref + 1 px) targets
    d = (out["boxes"] - out["ref_boxes"])[out["box_weights"] > 0]
    assert torch.allclose(d[:, :2], torch.full_like(d[:, :2], 1 / 120), atol=1e-6)

    big = [rand_img(500, 50), rand_img(320, 600)]
    out = get_aux_targets(big, [(120, 120)] * 2, K)
    assert out["labels"].shape == (2, 300)  # capped at 300
    assert out["box_weights"].sum(1).tolist() == [300, 300]
    # a random subset of distinct positives
    assert len({tuple(r.tolist()) for r in out["ref_boxes"][0]}) == 300

    with pytest.raises(ValueError, match="image_sizes"):
        get_aux_targets(big, [(120, 120)], K)


def test_aux_targets_without_negatives_pads_with_background_zero_boxes():
    img = _positives([[0, 0, 10, 10]], [1], [[0, 0, 10, 10]])
    out = get_aux_targets([img], [(10, 10)], K)
    assert out["labels"].tolist() == [[1] + [K] * 8]
    assert out["box_weights"].tolist() == [[1] + [0] * 8]
    assert (out["ref_boxes"][0, 1:] == 0).all()


# ----------------------------------------------------------------------------------------------- Faster R-CNN branch
def _feats(b, h, w, strides=(4, 8, 16, 32, 64, 128), c=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, c, -(-h // s), -(-w // s), generator=g, requires_grad=True) for s in strides]


def _rcnn(**kw):
    return RCNNBranch(num_classes=K, in_channels=32, fc_dim=64, **kw)


def test_rcnn_anchors_and_roi_levels_follow_the_official_config():
    r = _rcnn()
    # 9 anchors per location: sizes 4 * stride * 2^(k/3), ratios 0.5/1/2, centred at stride * index
    ag = r.rpn.anchor_generator
    assert ag.num_anchors == [9] * 6
    for s, cell in zip((4, 8, 16, 32, 64, 128), ag.cell_anchors):
        wh = cell[:, 2:] - cell[:, :2]
        areas = sorted(set(round(math.sqrt(a), 3) for a in (wh[:, 0] * wh[:, 1]).tolist()))
        assert areas == pytest.approx([4 * s * 2 ** (k / 3) for k in range(3)], rel=1e-4)
        assert torch.allclose(cell[:, :2] + cell[:, 2:], torch.zeros_like(cell[:, :2]), atol=1e-4)
    # RoI level mapping equals mmdet's floor(log2(sqrt(area) / 56 + 1e-6)), clamped to [0, 4]
    from detectron2.modeling.poolers import assign_boxes_to_levels

    p = r.roi_heads.box_pooler
    sizes = [8.0, 30.0, 55.0, 57.0, 111.0, 113.0, 200.0, 230.0, 447.0, 449.0, 900.0, 2000.0]
    boxes = Boxes(torch.tensor([[0.0, 0.0, s, s] for s in sizes]))
    lv = assign_boxes_to_levels([boxes], p.min_level, p.max_level, p.canonical_box_size, p.canonical_level)
    ref = [min(max(math.floor(math.log2(s / 56 + 1e-6)), 0), 4) for s in sizes]
    assert lv.tolist() == ref
    assert len(r.roi_heads.box_in_features) == 5


def test_rcnn_losses_and_positives():
    torch.manual_seed(0)
    r = _rcnn(loss_rpn_cls_weight=12.0, loss_rpn_bbox_weight=12.0, loss_cls_weight=12.0, loss_bbox_weight=120.0)
    feats = _feats(2, 128, 160)
    gts = [_inst([[10, 20, 60, 90], [70, 30, 140, 110]], [3, 1], (128, 160)), _inst([[5, 5, 50, 40]], [0], (100, 150))]
    images = ImageList(torch.zeros(2, 3, 128, 160), [(128, 160), (100, 150)])
    with EventStorage():
        losses, positives = r(feats, images, gts)
    assert set(losses) == {"loss_rpn_cls0", "loss_rpn_bbox0", "loss_cls0", "loss_bbox0"}
    assert all(torch.isfinite(v) for v in losses.values())
    m = positives[0]["boxes"].shape[0]
    assert all(p["boxes"].shape == (m, 4) for p in positives) and m <= 512
    for p, g in zip(positives, gts):
        fg = p["labels"] < K
        nfg = int(fg.sum())
        assert nfg >= len(g) and fg[:nfg].all()  # positives first; the GT boxes are among them
        gt_b = g.gt_boxes.tensor
        assert (pairwise_iou(Boxes(gt_b), Boxes(p["boxes"][fg])) > 0.9999).any(1).all()
        iou_fg = pairwise_iou(Boxes(p["boxes"][fg]), Boxes(p["target_boxes"][fg])).diagonal()
        assert (iou_fg >= 0.5).all()
        if (~fg).any():
            assert (pairwise_iou(Boxes(p["boxes"][~fg]), Boxes(gt_b)).max(1).values < 0.5).all()
            assert (p["target_boxes"][~fg] == 0).all()
        # targets are GT boxes with the GT's class
        eq = (p["target_boxes"][fg][:, None] == gt_b[None]).all(-1)
        assert eq.any(1).all() and (g.gt_classes[eq.float().argmax(1)] == p["labels"][fg]).all()
    sum(losses.values()).backward()
    assert all(f.grad is not None for f in feats[:5])


def test_rcnn_positive_features_are_the_box_heads_pooled_features():
    """return_feats reads the positives' features from the box head's RoIAlign output; reference: the sampled boxes
    pooled again by the same pooler (the previous implementation): the same features and losses bit for bit, and the
    same gradients on the input maps up to float32 summation order (one RoIAlign backward of the summed gradient
    instead of two)."""
    gts = [_inst([[10, 20, 60, 90], [70, 30, 140, 110]], [3, 1], (128, 160)), _inst([[5, 5, 50, 40]], [0], (100, 150))]
    images = ImageList(torch.zeros(2, 3, 128, 160), [(128, 160), (100, 150)])
    maps = [f.detach() for f in _feats(2, 128, 160, strides=(8, 16, 32, 64, 128))]
    torch.manual_seed(0)
    r = _rcnn(strides=(8, 16, 32, 64, 128), num_roi_levels=4, roi_finest_scale=112)
    w = torch.randn(512, 32, generator=torch.Generator().manual_seed(1))
    grads, feats, totals = [], [], []
    for reuse in (True, False):
        r.return_feats = reuse
        inputs = [m.clone().requires_grad_() for m in maps]
        torch.manual_seed(2)  # the same RPN / RoI sampling in both runs
        with EventStorage():
            losses, positives = r(inputs, images, gts)
        if not reuse:  # the reference: pool the positives' boxes again
            m = positives[0]["boxes"].shape[0]
            pooled = r.roi_heads.box_pooler(inputs[:4], [Boxes(p["boxes"]) for p in positives])
            for p, f in zip(positives, pooled.mean(dim=(2, 3)).split(m)):
                p["feats"] = f
        m = positives[0]["boxes"].shape[0]
        assert m > 100 and all(p["feats"].shape == (m, 32) for p in positives)
        total = sum(losses.values()) + sum((p["feats"] * w[:m]).sum() for p in positives)
        grads.append(torch.autograd.grad(total, inputs[:4]))
        feats.append(torch.cat([p["feats"] for p in positives]))
        totals.append(total.detach())
    assert torch.equal(feats[0], feats[1]) and torch.equal(totals[0], totals[1])
    for a, b in zip(*grads):
        assert a.abs().max() > 0
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * float(b.abs().max()))


def test_rcnn_loss_weights_scale_losses():
    feats = _feats(1, 96, 96)
    gts = [_inst([[10, 20, 60, 90]], [3], (96, 96))]
    images = ImageList(torch.zeros(1, 3, 96, 96), [(96, 96)])
    out = []
    for w in (1.0, 3.0):
        torch.manual_seed(0)
        r = _rcnn(loss_rpn_cls_weight=w, loss_rpn_bbox_weight=2 * w, loss_cls_weight=5 * w, loss_bbox_weight=7 * w)
        torch.manual_seed(1)
        with EventStorage():
            out.append(r(feats, images, gts)[0])
    for k in out[0]:
        assert out[1][k].item() == pytest.approx(3 * out[0][k].item(), rel=1e-5)


def test_rcnn_inference():
    r = _rcnn(test_detections_per_image=10).eval()
    out = r.inference(_feats(2, 96, 128), ImageList(torch.zeros(2, 3, 96, 128), [(96, 128), (80, 100)]))
    assert len(out) == 2 and len(out[0]) <= 10
    assert out[1].pred_boxes.tensor[:, 2].max() <= 100 and out[1].pred_boxes.tensor[:, 3].max() <= 80


# ----------------------------------------------------------------------------------------------- the branch
class _StubQueryHead(nn.Module):
    """Records the branch's calls; its 'losses' depend on the queries so gradients can be checked."""

    num_classes = K

    def __init__(self, c=32):
        super().__init__()
        self.proj = nn.ModuleList([nn.Linear(4, c) for _ in range(2)])
        self.calls = []

    def encode(self, features, masks, image_sizes=None):
        raise AssertionError("not called in training")

    def encoder_maps(self, enc_ctx):
        return memory_to_maps(enc_ctx["memory"], enc_ctx["spatial_shapes"])

    def positive_query_losses(self, enc_ctx, queries, head_idx):
        refs = queries["ref_boxes"]
        content = self.proj[head_idx](refs)
        targets = {k: v.clone() for k, v in queries.items() if k != "ref_boxes"}
        self.calls.append((head_idx, content.shape, refs.clone(), targets))
        return {f"loss_cls_aux{head_idx}": content.mean() + enc_ctx["memory"].mean()}


def test_branch_runs_heads_and_positive_query_passes():
    torch.manual_seed(0)
    c = 32
    atss = ATSSHead(num_classes=K, in_channels=c, feat_channels=c, num_gn_groups=8)
    adapter = MultiScaleAdapter((4, 8, 16, 32, 64), (4, 8, 16, 32, 64, 128), embed_dim=c, num_gn_groups=8)
    branch = CollaborativeBranch(aux_heads=[_rcnn(), atss], num_classes=K, adapter=adapter)
    h, w = 128, 160
    shapes = torch.tensor([[-(-h // s), -(-w // s)] for s in (4, 8, 16, 32, 64)])
    memory = torch.randn(2, int(shapes.prod(1).sum()), c, requires_grad=True)
    enc_ctx = {"memory": memory, "spatial_shapes": shapes, "image_sizes": [(128, 160), (100, 150)]}
    gts = [_inst([[10, 20, 60, 90], [70, 30, 140, 110]], [3, 1], (128, 160)), _inst([], [], (100, 150))]
    images = ImageList(torch.zeros(2, 3, h, w), [(128, 160), (100, 150)])
    qh = _StubQueryHead(c)
    with EventStorage():
        losses = branch(enc_ctx, images, gts, qh)
    assert set(losses) == {
        "loss_rpn_cls0", "loss_rpn_bbox0", "loss_cls0", "loss_bbox0",
        "loss_cls1", "loss_bbox1", "loss_centerness1", "loss_cls_aux0", "loss_cls_aux1",
    }
    assert [call[0] for call in qh.calls] == [0, 1]
    for head_idx, content_shape, refs, targets in qh.calls:
        n = refs.shape[1]
        assert content_shape == (2, n, c) and 9 <= n <= 300
        assert set(targets) == {"labels", "label_weights", "boxes", "box_weights"}
        assert (targets["labels"][1] == K).all()  # image 1 has no GT
        assert targets["box_weights"][0].sum() > 0
    # ATSS refs are anchors (size 8 * stride): widths in units of the image are 8 * stride / w
    atss_w = (qh.calls[1][2][0, :, 2] * 160).round()
    assert set(atss_w.tolist()) <= {8.0 * s for s in (4, 8, 16, 32, 64, 128)}
    # aux-head losses alone reach the encoder memory and the extra map's conv
    aux_only = sum(v for k, v in losses.items() if "aux" not in k)
    aux_only.backward()
    assert memory.grad is not None and memory.grad.abs().sum() > 0
    assert adapter.downsample[0][0].weight.grad.abs().sum() > 0


# ------------------------------------------------------------------ official behaviours: padding anchors
def _location_valid(anchors: torch.Tensor, stride: int, size) -> torch.Tensor:
    """Reference from the anchors themselves: the feature location of an anchor is its centre / stride (centres sit
    at stride * index, offset 0); valid when inside the image's size rounded up to 32 (mmdet's pad_shape)."""
    ph, pw = (-(-size[0] // 32) * 32, -(-size[1] // 32) * 32)
    c = (anchors[:, :2] + anchors[:, 2:]) / 2
    ix, iy = torch.floor(c[:, 0] / stride + 1e-3), torch.floor(c[:, 1] / stride + 1e-3)
    return (ix < -(-pw // stride)) & (iy < -(-ph // stride))


def test_rpn_never_samples_anchors_in_the_batch_padding():
    """2-image batch, image 0 (50 x 60, padded per image to 64 x 64) in a 160 x 192 batch: its sampled anchors
    (positives and negatives) all lie in its valid region, though most of its anchors are in the padding;
    image 1 (the batch size) samples everywhere."""
    torch.manual_seed(0)
    r = _rcnn()
    strides = (4, 8, 16, 32, 64, 128)
    feats = r._feature_dict(_feats(2, 160, 192))
    sizes = [(50, 60), (160, 192)]
    gts = [_inst([[10, 12, 40, 45]], [2], sizes[0]), _inst([[20, 30, 150, 120], [100, 10, 180, 60]], [0, 4], sizes[1])]
    images = ImageList(torch.zeros(2, 3, 160, 192), sizes)
    seen = {}
    original = r.rpn.losses

    def capture(anchors, pred_objectness_logits, gt_labels, pred_anchor_deltas, gt_boxes):
        seen["anchors"], seen["labels"] = anchors, gt_labels
        return original(anchors, pred_objectness_logits, gt_labels, pred_anchor_deltas, gt_boxes)

    r.rpn.losses = capture
    with EventStorage():
        r.rpn(images, feats, gts)
    per_level = [a.tensor for a in seen["anchors"]]
    for i, size in enumerate(sizes):
        valid = torch.cat([_location_valid(a, s, size) for a, s in zip(per_level, strides)])
        sampled = seen["labels"][i] >= 0
        assert int(sampled.sum()) == 256 and (seen["labels"][i] == 1).any()
        assert valid[sampled].all()
        if i == 0:
            assert (~valid).sum() > 0.8 * len(valid)  # most of image 0's anchors are padding: a plain RPN samples them
    assert (~torch.cat([_location_valid(a, s, sizes[0]) for a, s in zip(per_level, strides)]))[
        seen["labels"][1] >= 0].any()  # image 1 does use the locations that are padding for image 0


def test_atss_positive_queries_get_zero_boxes_outside_the_valid_region():
    """As the official ATSS target step (un-map with fill 0): anchors outside an image's valid region come out as
    zero boxes (background, zero targets); the valid ones are the anchors."""
    torch.manual_seed(0)
    head = ATSSHead(num_classes=K, in_channels=32, feat_channels=32, num_gn_groups=8)
    strides = (4, 8, 16, 32, 64, 128)
    feats = _feats(2, 160, 192)
    sizes = [(50, 60), (160, 192)]
    gts = [_inst([[10, 12, 40, 45]], [2], sizes[0]), _inst([[20, 30, 150, 120]], [0], sizes[1])]
    with EventStorage():
        _, positives = head(feats, ImageList(torch.zeros(2, 3, 160, 192), sizes), gts)
    anchors = head.anchor_generator([f for f in feats])
    for p, size in zip(positives, sizes):
        valid = torch.cat([_location_valid(a.tensor, s, size) for a, s in zip(anchors, strides)])
        all_anchors = torch.cat([a.tensor for a in anchors])
        assert torch.equal(p["boxes"][valid], all_anchors[valid])
        assert (p["boxes"][~valid] == 0).all() and (p["labels"][~valid] == K).all()
        assert (p["target_boxes"][~valid] == 0).all()
        assert (p["labels"][valid] < K).any()
    assert (~torch.cat([_location_valid(a.tensor, s, sizes[0]) for a, s in zip(anchors, strides)])).any()
