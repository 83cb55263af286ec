"""Soft-NMS: the ``codetr._C`` kernels (CPU; CUDA where a GPU is visible) against the loop the project used before
them (kept below, unchanged, as the reference), on random, clustered, tied and degenerate boxes, class-aware;
and no host sync inside."""
import pytest
import torch
from torchvision.ops import box_iou

import codetr.modeling.soft_nms as soft_nms_module
from codetr.modeling.soft_nms import batched_soft_nms
from host_syncs import count_host_syncs


def reference_soft_nms(boxes, scores, labels, iou_threshold=0.8, sigma=0.5, min_score=1e-3, method="linear"):
    """The previous implementation (a Python loop over the picks), verbatim."""
    N = boxes.shape[0]
    if N == 0:
        return torch.zeros(0, dtype=torch.int64, device=boxes.device), scores.new_zeros(0)
    iou = box_iou(boxes.float(), boxes.float())
    iou = iou.masked_fill(labels[:, None] != labels[None, :], 0.0)
    if method == "linear":
        decay = torch.where(iou > iou_threshold, 1.0 - iou, torch.ones_like(iou))
    else:
        decay = torch.exp(-(iou * iou) / sigma)
    cur = scores.float().clone()
    alive = torch.ones(N, dtype=torch.bool, device=boxes.device)
    order = torch.empty(N, dtype=torch.int64, device=boxes.device)
    final = torch.empty(N, dtype=torch.float32, device=boxes.device)
    neg = torch.tensor(-1.0, device=boxes.device)
    for step in range(N):
        masked = torch.where(alive, cur, neg)
        i = masked.argmax()
        order[step] = i
        final[step] = cur[i]
        alive[i] = False
        cur = torch.where(alive, cur * decay[i], cur)
    keep = final >= min_score
    return order[keep], final[keep].to(scores.dtype)


def detr_candidates(n, num_classes, seed, size=800.0):
    """Boxes as a DETR head's top candidates: clusters of near-duplicates around a few objects, some random,
    clamped to the image (so some are cut to zero width/height), sigmoid-like scores."""
    g = torch.Generator().manual_seed(seed)
    k = max(1, n // 12)
    centre = torch.rand(k, 2, generator=g) * size
    wh = torch.exp(torch.rand(k, 2, generator=g) * 4 + 1.5)
    obj = torch.randint(0, k, (n,), generator=g)
    jitter = 1 + 0.15 * torch.randn(n, 4, generator=g)
    c, s = centre[obj] + 0.1 * wh[obj] * torch.randn(n, 2, generator=g), wh[obj] * jitter[:, 2:]
    boxes = torch.cat([c - s / 2, c + s / 2], 1)
    boxes[: n // 10] = torch.rand(n // 10, 4, generator=g).sort(1).values[:, [0, 2, 1, 3]] * size
    boxes = boxes.clamp(0, size)
    scores = torch.rand(n, generator=g) ** 3
    labels = torch.where(torch.rand(n, generator=g) < 0.7, obj % num_classes,
                         torch.randint(0, num_classes, (n,), generator=g))
    return boxes, scores, labels


def check_equal(boxes, scores, labels, **kw):
    keep, new = batched_soft_nms(boxes, scores, labels, **kw)
    ref_keep, ref_new = reference_soft_nms(boxes, scores, labels, **kw)
    assert torch.equal(keep, ref_keep)
    assert torch.equal(new, ref_new)
    return keep, new


@pytest.mark.parametrize("n,num_classes,seed", [(300, 3, 0), (900, 5, 1), (900, 80, 2), (1500, 10, 3), (17, 1, 4)])
def test_kernel_equals_the_loop_on_detr_like_candidates(n, num_classes, seed):
    boxes, scores, labels = detr_candidates(n, num_classes, seed)
    keep, new = check_equal(boxes, scores, labels)
    assert (new < scores[keep]).any()  # scores were decayed
    assert len(keep) < n  # and some dropped below min_score
    check_equal(boxes, scores, labels, iou_threshold=0.5, min_score=0.05)  # more suppression


def test_ties_duplicates_and_degenerate_boxes():
    boxes = torch.tensor([
        [10, 10, 50, 50], [10, 10, 50, 50], [10, 10, 50, 50],  # identical boxes (IoU 1: decay to 0)
        [12, 11, 50, 52], [30, 30, 30, 80], [30, 30, 30, 80],  # two zero-width boxes (0 / 0 IoU)
        [0, 0, 0, 0], [0, 0, 0, 0], [5, 5, 60, 60], [5, 5, 60, 60.0],
    ])
    scores = torch.tensor([0.9, 0.9, 0.9, 0.9, 0.5, 0.5, 0.3, 0.3, 0.7, 0.7])  # ties everywhere
    for labels in (torch.zeros(10, dtype=torch.int64), torch.tensor([0, 1, 0, 1, 0, 0, 1, 1, 0, 1])):
        keep, new = check_equal(boxes, scores, labels)
        assert keep[0] == 0  # the lowest index wins a tie
        check_equal(boxes, scores, labels, iou_threshold=0.0, min_score=0.0)
    # a single box, no box
    check_equal(boxes[:1], scores[:1], torch.zeros(1, dtype=torch.int64))
    keep, new = batched_soft_nms(boxes[:0], scores[:0], torch.zeros(0, dtype=torch.int64))
    assert keep.shape == (0,) and new.shape == (0,)


def test_gaussian_close_to_the_loop():
    """Gaussian decay: the same picks; scores to float32 rounding (exp is computed by a different routine)."""
    boxes, scores, labels = detr_candidates(600, 4, 5)
    keep, new = batched_soft_nms(boxes, scores, labels, method="gaussian", min_score=0.01)
    ref_keep, ref_new = reference_soft_nms(boxes, scores, labels, method="gaussian", min_score=0.01)
    assert torch.equal(keep, ref_keep)
    torch.testing.assert_close(new, ref_new, rtol=1e-5, atol=1e-7)


def test_no_host_sync_inside_and_the_loop_had_many():
    boxes, scores, labels = detr_candidates(900, 5, 6)
    with count_host_syncs() as ours:
        batched_soft_nms(boxes, scores, labels)
    with count_host_syncs() as loop:
        reference_soft_nms(boxes, scores, labels)
    assert sum(ours.values()) == 0, ours
    assert loop["_local_scalar_dense"] >= 2 * 900  # 0-dim tensor indexing, 3 per box


def test_fallback_without_the_extension_gives_the_same_result(monkeypatch):
    boxes, scores, labels = detr_candidates(120, 2, 7)
    expect = batched_soft_nms(boxes, scores, labels)
    monkeypatch.setattr(soft_nms_module, "_C", None)
    with pytest.warns(UserWarning, match="slow PyTorch loop"):
        got = batched_soft_nms(boxes, scores, labels)
    assert torch.equal(got[0], expect[0]) and torch.equal(got[1], expect[1])


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="boxes \\(N, 4\\)"):
        batched_soft_nms(torch.zeros(3, 5), torch.zeros(3), torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="method"):
        batched_soft_nms(torch.zeros(3, 4), torch.zeros(3), torch.zeros(3, dtype=torch.int64), method="hard")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_kernel_equals_the_loop():
    for n, c, seed in [(900, 5, 1), (1500, 10, 3), (2100, 2, 8)]:
        boxes, scores, labels = detr_candidates(n, c, seed)
        keep, new = batched_soft_nms(boxes.cuda(), scores.cuda(), labels.cuda())
        ref_keep, ref_new = reference_soft_nms(boxes, scores, labels)
        assert torch.equal(keep.cpu(), ref_keep)
        torch.testing.assert_close(new.cpu(), ref_new, rtol=0, atol=0)
