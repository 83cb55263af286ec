"""ATSS assigner (hand-computed fixtures, brute-force reference) and ATSS head (losses, positives)."""
import math
import statistics

import pytest
import torch

from detectron2.structures import ImageList

from codetr.modeling.atss import ATSSAssigner, ATSSHead, centerness_targets


def _grid_anchors(stride, size, nx, ny):
    """Anchors centred at (stride*(i+0.5)) on an nx x ny grid, size x size, row-major."""
    out = []
    for j in range(ny):
        for i in range(nx):
            cx, cy = stride * (i + 0.5), stride * (j + 0.5)
            out.append([cx - size / 2, cy - size / 2, cx + size / 2, cy + size / 2])
    return torch.tensor(out, dtype=torch.float64)


# ----------------------------------------------------------------------------------------------- hand fixtures
def test_gt_smaller_than_every_anchor():
    # level 0: stride 16, 16x16 anchors centred (8,8),(24,8),(8,24),(24,24); level 1: stride 32, 32x32 anchors.
    anchors = torch.cat([_grid_anchors(16, 16, 2, 2), _grid_anchors(32, 32, 2, 2)])
    gt = torch.tensor([[6.0, 6.0, 10.0, 10.0]], dtype=torch.float64)  # 4x4, centre (8, 8)
    # candidates (topk=3): level 0 -> anchors 0, 1, 2 (distances 0, 16, 16); level 1 -> 4, 5, 6 (11.3, 40.8, 40.8)
    # IoUs: anchor 0 contains the GT: 16/256; anchor 4 contains it: 16/1024; the others do not overlap.
    cand_ious = [16 / 256, 0.0, 0.0, 16 / 1024, 0.0, 0.0]
    thr = statistics.mean(cand_ious) + statistics.stdev(cand_ious)
    assert 16 / 256 >= thr > 16 / 1024  # only anchor 0 passes the threshold
    matched, max_iou = ATSSAssigner(topk=3)(anchors, [4, 4], gt)
    assert matched.tolist() == [0, -1, -1, -1, -1, -1, -1, -1]
    assert max_iou[0].item() == pytest.approx(16 / 256)
    assert max_iou[1:].abs().max().item() == 0


def test_gt_with_no_centre_inside_candidate():
    anchors = _grid_anchors(16, 16, 2, 2)
    gt = torch.tensor([[12.0, 2.0, 20.0, 6.0]], dtype=torch.float64)  # centre (16, 4): no anchor centre inside
    # topk=2 candidates: anchors 0 and 1 (both at distance sqrt(80)); each overlaps 4x4 = 16 px: IoU 16/272.
    cand_ious = [16 / 272, 16 / 272]
    thr = statistics.mean(cand_ious) + statistics.stdev(cand_ious)
    assert 16 / 272 >= thr  # the IoU test alone would make both positive
    matched, _ = ATSSAssigner(topk=2)(anchors, [4], gt)
    assert matched.tolist() == [-1, -1, -1, -1]


def test_anchor_positive_for_two_gts_goes_to_highest_iou():
    anchors = _grid_anchors(16, 16, 4, 1)  # centres (8,8), (24,8), (40,8), (56,8)
    gt_b = [4.0, 0.0, 20.0, 16.0]  # IoU with anchor 0: 192/320 = 0.6; anchor 1: 64/448; anchor 2: 0
    gt_a = [0.0, 0.0, 16.0, 16.0]  # IoU 1 with anchor 0
    for ious in ([1.0, 0.0, 0.0], [192 / 320, 64 / 448, 0.0]):
        assert ious[0] >= statistics.mean(ious) + statistics.stdev(ious)  # anchor 0 positive for both
    gts = torch.tensor([gt_b, gt_a], dtype=torch.float64)
    matched, max_iou = ATSSAssigner(topk=3)(anchors, [4], gts)
    assert matched.tolist() == [1, -1, -1, -1]
    assert max_iou[0].item() == pytest.approx(1.0)


def test_threshold_uses_unbiased_std():
    anchors = _grid_anchors(16, 16, 4, 1)
    gt = torch.tensor([[0.0, 6.0, 25.0, 9.0]], dtype=torch.float64)  # centre (12.5, 7.5), inside anchor 0's cell
    cand_ious = [48 / 283, 27 / 304, 0.0]  # anchors 0, 1, 2 (distances 4.5, 11.5, 27.5)
    mean = statistics.mean(cand_ious)
    assert mean + statistics.pstdev(cand_ious) <= 48 / 283 < mean + statistics.stdev(cand_ious)
    matched, _ = ATSSAssigner(topk=3)(anchors, [4], gt)
    assert matched.tolist() == [-1, -1, -1, -1]


def test_no_gt_and_bad_input():
    anchors = _grid_anchors(16, 16, 2, 2)
    matched, max_iou = ATSSAssigner()(anchors, [4], anchors.new_zeros(0, 4))
    assert matched.tolist() == [-1] * 4 and max_iou.abs().sum() == 0
    with pytest.raises(ValueError, match="num_anchors_per_level"):
        ATSSAssigner()(anchors, [3], anchors[:1])
    with pytest.raises(ValueError, match="gt_boxes"):
        ATSSAssigner()(anchors, [4], anchors[0])
    with pytest.raises(ValueError, match="topk"):
        ATSSAssigner(topk=0)


# ----------------------------------------------------------------------------------------------- brute force
def _iou(a, b):
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union


def _reference_atss(anchors, num_per_level, gts, topk):
    """The ATSS paper's algorithm with Python loops and lists."""
    anchors, gts = anchors.tolist(), gts.tolist()
    best = [(-1.0, -1)] * len(anchors)  # (iou, gt)
    for g, gt in enumerate(gts):
        gc = ((gt[0] + gt[2]) / 2, (gt[1] + gt[3]) / 2)
        cands, start = [], 0
        for n in num_per_level:
            lvl = list(range(start, start + n))
            lvl.sort(key=lambda a: math.dist(((anchors[a][0] + anchors[a][2]) / 2, (anchors[a][1] + anchors[a][3]) / 2), gc))
            cands += lvl[:topk]
            start += n
        ious = [_iou(anchors[a], gt) for a in cands]
        thr = statistics.mean(ious) + statistics.stdev(ious)
        for a, iou in zip(cands, ious):
            cx, cy = (anchors[a][0] + anchors[a][2]) / 2, (anchors[a][1] + anchors[a][3]) / 2
            inside = min(cx - gt[0], cy - gt[1], gt[2] - cx, gt[3] - cy) > 0.01
            if iou >= thr and inside and iou > best[a][0]:
                best[a] = (iou, g)
    return [g for _, g in best]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_brute_force_reference(seed):
    g = torch.Generator().manual_seed(seed)
    anchors = torch.cat([_grid_anchors(8, 32, 12, 10), _grid_anchors(16, 64, 6, 5), _grid_anchors(32, 128, 3, 3)])
    num = [120, 30, 9]
    xy = torch.rand(7, 2, generator=g, dtype=torch.float64) * torch.tensor([90.0, 75.0], dtype=torch.float64)
    wh = 3 + torch.rand(7, 2, generator=g, dtype=torch.float64) * 60
    gts = torch.cat([xy, xy + wh], dim=1)
    matched, _ = ATSSAssigner(topk=9)(anchors, num, gts)
    ref = _reference_atss(anchors, num, gts, 9)
    assert matched.tolist() == ref
    assert (matched >= 0).sum() > 0


def test_valid_mask_equals_dropping_invalid_anchors():
    anchors = torch.cat([_grid_anchors(8, 32, 12, 10), _grid_anchors(16, 64, 6, 5)])
    num = [120, 30]
    valid = torch.ones(150, dtype=torch.bool)
    valid[torch.arange(120).view(10, 12)[:, 9:].flatten()] = False  # right columns of level 0 are padding
    valid[120 + torch.arange(30).view(5, 6)[:, 5]] = False
    gts = torch.tensor([[40.0, 10.0, 90.0, 60.0], [5.0, 5.0, 30.0, 25.0]], dtype=torch.float64)
    matched, _ = ATSSAssigner(topk=9)(anchors, num, gts, valid)
    sub_num = [int(valid[:120].sum()), int(valid[120:].sum())]
    sub_matched, _ = ATSSAssigner(topk=9)(anchors[valid], sub_num, gts)
    assert (matched[~valid] == -1).all()
    assert matched[valid].tolist() == sub_matched.tolist()


# ----------------------------------------------------------------------------------------------- head
def test_centerness_targets_formula():
    anchors = torch.tensor([[0.0, 0.0, 8.0, 8.0]])  # centre (4, 4)
    gt = torch.tensor([[2.0, 1.0, 10.0, 5.0]])  # l=2, r=6, t=3, b=1
    expected = math.sqrt((2 / 6) * (1 / 3))
    assert centerness_targets(anchors, gt).item() == pytest.approx(expected, rel=1e-6)


def _instances(boxes, classes, size):
    from detectron2.structures import Boxes, Instances

    inst = Instances(size)
    inst.gt_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
    inst.gt_classes = torch.tensor(classes, dtype=torch.long)
    return inst


def _small_head(**kw):
    return ATSSHead(num_classes=5, in_channels=32, feat_channels=32, num_gn_groups=8, strides=(8, 16, 32), **kw)


def _feats(b, h, w, strides=(8, 16, 32), c=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, c, -(-h // s), -(-w // s), generator=g, requires_grad=True) for s in strides]


def test_head_losses_match_float64_reference():
    """Head losses recomputed from its raw outputs and the assignment with explicit formulas (float64)."""
    torch.manual_seed(0)
    head = _small_head(loss_cls_weight=12.0, loss_bbox_weight=24.0, loss_centerness_weight=12.0).double()
    feats = [f.detach().double().requires_grad_() for f in _feats(2, 64, 80)]
    gts = [_instances([[8, 8, 40, 50], [30, 20, 70, 60]], [1, 4], (64, 80)), _instances([], [], (64, 80))]
    losses, positives = head(feats, [(64, 80), (64, 80)], gts)
    assert set(losses) == {"loss_cls1", "loss_bbox1", "loss_centerness1"}

    logits, deltas, ctr = head.forward_features(feats)
    logits = torch.cat([x.flatten(2).transpose(1, 2) for x in logits], 1)
    deltas = torch.cat([x.flatten(2).transpose(1, 2) for x in deltas], 1)
    ctr = torch.cat([x.flatten(2).transpose(1, 2) for x in ctr], 1)[..., 0]
    anchors = positives[0]["boxes"]
    labels = torch.stack([p["labels"] for p in positives])
    tgts = torch.stack([p["target_boxes"] for p in positives])
    pos = labels < 5
    assert pos[0].sum() > 0 and pos[1].sum() == 0
    num_pos = float(max(int(pos[0].sum()), 1) + 1)  # sum over images of max(#pos, 1)
    # focal loss, alpha 0.25, gamma 2
    p = logits.sigmoid()
    t = torch.zeros_like(p)
    t[pos] = torch.nn.functional.one_hot(labels[pos], 5).double()
    pt = torch.where(t > 0, p, 1 - p)
    at = torch.where(t > 0, torch.full_like(p, 0.25), torch.full_like(p, 0.75))
    focal = (-at * (1 - pt) ** 2 * torch.log(pt)).sum() / num_pos
    # decode (stds .1 .1 .2 .2), GIoU weighted by centerness
    a = anchors[None].expand_as(deltas)[pos]
    d = deltas[pos] * torch.tensor([0.1, 0.1, 0.2, 0.2], dtype=torch.float64)
    aw, ah = a[:, 2] - a[:, 0], a[:, 3] - a[:, 1]
    cx, cy = a[:, 0] + aw / 2 + d[:, 0] * aw, a[:, 1] + ah / 2 + d[:, 1] * ah
    w, h = aw * d[:, 2].exp(), ah * d[:, 3].exp()
    pb = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], 1)
    gb = tgts[pos]
    lt, rb = torch.max(pb[:, :2], gb[:, :2]), torch.min(pb[:, 2:], gb[:, 2:])
    inter = (rb - lt).clamp(min=0).prod(1)
    union = (pb[:, 2:] - pb[:, :2]).prod(1) + (gb[:, 2:] - gb[:, :2]).prod(1) - inter
    enc = (torch.max(pb[:, 2:], gb[:, 2:]) - torch.min(pb[:, :2], gb[:, :2])).prod(1)
    giou = inter / union - (enc - union) / enc
    ac = (a[:, :2] + a[:, 2:]) / 2
    l_, t_, r_, b_ = ac[:, 0] - gb[:, 0], ac[:, 1] - gb[:, 1], gb[:, 2] - ac[:, 0], gb[:, 3] - ac[:, 1]
    cn = torch.sqrt(torch.min(l_, r_) / torch.max(l_, r_) * torch.min(t_, b_) / torch.max(t_, b_))
    loss_bbox = ((1 - giou) * cn).sum() / max(cn.sum().item(), 1.0)
    s = ctr[pos].sigmoid()
    loss_ctr = -(cn * torch.log(s) + (1 - cn) * torch.log(1 - s)).sum() / num_pos
    assert losses["loss_cls1"].item() == pytest.approx(12 * focal.item(), rel=1e-6)
    assert losses["loss_bbox1"].item() == pytest.approx(24 * loss_bbox.item(), rel=1e-6)
    assert losses["loss_centerness1"].item() == pytest.approx(12 * loss_ctr.item(), rel=1e-6)


def test_head_positives_and_assignment_are_consistent():
    head = _small_head()
    feats = _feats(2, 64, 80)
    gts = [_instances([[8, 8, 40, 50], [30, 20, 70, 60]], [1, 4], (64, 80)), _instances([[0, 0, 20, 20]], [2], (48, 60))]
    sizes = [(64, 80), (48, 60)]
    losses, positives = head(feats, sizes, gts)
    anchors = positives[0]["boxes"]
    num_anchors = sum(f.shape[-2] * f.shape[-1] for f in feats)
    assert anchors.shape == (num_anchors, 4)
    # anchors: size 8 * stride, centred at stride * index (offset 0)
    assert torch.allclose(anchors[0], torch.tensor([-32.0, -32.0, 32.0, 32.0]))
    for p, g in zip(positives, gts):
        fg = p["labels"] < 5
        assert fg.sum() > 0
        # every positive's target is one of the image's GT boxes with the matching class
        gt_boxes = g.gt_boxes.tensor
        eq = (p["target_boxes"][fg][:, None] == gt_boxes[None]).all(-1)
        assert eq.any(1).all()
        assert (g.gt_classes[eq.float().argmax(1)] == p["labels"][fg]).all()
        assert (p["target_boxes"][~fg] == 0).all()
    # image 1 is 48x60: anchors in the padded region (beyond ceil(48/s), ceil(60/s) cells) are never positive
    ctr = (anchors[:, :2] + anchors[:, 2:]) / 2
    assert (ctr[positives[1]["labels"] < 5] < torch.tensor([60.0, 48.0])).all()
    sum(losses.values()).backward()
    assert all(f.grad is not None and f.grad.abs().sum() > 0 for f in feats)
    assert head.scales[0].scale.grad is not None


def test_head_without_gt_and_bad_input():
    head = _small_head()
    feats = _feats(1, 64, 64)
    losses, positives = head(feats, [(64, 64)], [_instances([], [], (64, 64))])
    assert all(torch.isfinite(v) for v in losses.values())
    assert losses["loss_bbox1"].item() == 0 and losses["loss_cls1"].item() > 0
    assert (positives[0]["labels"] == 5).all()
    sum(losses.values()).backward()
    with pytest.raises(ValueError, match="feature maps"):
        head(feats[:2], [(64, 64)], [_instances([], [], (64, 64))])
    with pytest.raises(ValueError, match="gt_instances"):
        head(feats, [(64, 64)], [])


def test_head_inference_shapes():
    head = _small_head(test_detections_per_image=7).eval()
    out = head.inference(_feats(2, 64, 80), ImageList(torch.zeros(2, 3, 64, 80), [(64, 80), (50, 70)]))
    assert len(out) == 2 and len(out[0]) == 7
    b = out[1].pred_boxes.tensor
    assert (b[:, 0] >= 0).all() and (b[:, 2] <= 70).all() and (b[:, 3] <= 50).all()
    assert (out[0].scores[:-1] >= out[0].scores[1:]).all()


def test_normalisers_are_float32_under_bf16(monkeypatch):
    """The positive-count normalisers do not take the logits' dtype: with 300 + max(0, 1) = 301 positives (not a
    bf16 number), bf16 logits give exactly the float32 normalisers."""
    import codetr.modeling.atss as atss

    seen = []

    def recording_normalizer(x, device=None):
        out = real_normalizer(x, device)
        seen.append(out.detach().clone())
        return out

    real_normalizer = atss.all_reduce_normalizer
    monkeypatch.setattr(atss, "all_reduce_normalizer", recording_normalizer)
    head = _small_head()
    g = torch.Generator().manual_seed(0)
    B, A = 2, 400
    xy = torch.rand(A, 2, generator=g) * 100
    anchors = torch.cat([xy, xy + 16], 1)
    labels = torch.full((B, A), 5, dtype=torch.long)
    labels[0, :300] = torch.randint(0, 5, (300,), generator=g)
    targets = anchors[None].repeat(B, 1, 1) + torch.rand(B, A, 4, generator=g)
    deltas = torch.randn(B, A, 4, generator=g) * 0.1
    valid = torch.ones(B, A, dtype=torch.bool)
    normalisers = {}
    for dtype in (torch.float32, torch.bfloat16):
        seen.clear()
        logits = torch.randn(B, A, 5, generator=torch.Generator().manual_seed(1)).to(dtype)
        ctr = torch.randn(B, A, generator=torch.Generator().manual_seed(2)).to(dtype)
        head.losses(anchors, logits, deltas, ctr, labels, targets, valid)
        assert all(x.dtype == torch.float32 for x in seen), [x.dtype for x in seen]
        normalisers[dtype] = torch.stack(seen)
    assert normalisers[torch.float32][0] == 301
    assert torch.equal(normalisers[torch.float32], normalisers[torch.bfloat16])
