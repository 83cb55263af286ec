"""DINO parts against independent references: matcher vs brute force, denoising layout and mask,
QFL / focal / GIoU / L1 vs float64 formulas, soft-NMS vs a naive loop, sine embeddings, normaliser."""
import itertools
import math

import pytest
import torch
from torch import nn

from codetr.modeling import (
    CdnQueryGenerator,
    HungarianMatcher,
    PositionEmbeddingSine,
    all_reduce_normalizer,
    batched_soft_nms,
    box_sine_embed,
    build_dn_attn_mask,
    quality_focal_loss,
)
from codetr.modeling.losses import weighted_giou_loss, weighted_l1_loss
from codetr.modeling.transformer import encoder_output_proposals
from dino_utils import one_thread  # noqa: F401,E402 (fixture)

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------- float64 references
def ref_box_area(b):
    return max(b[2] - b[0], 0.0) * max(b[3] - b[1], 0.0)


def ref_giou(a, b):
    """a, b: (x0, y0, x1, y1) python floats."""
    iw = max(min(a[2], b[2]) - max(a[0], b[0]), 0.0)
    ih = max(min(a[3], b[3]) - max(a[1], b[1]), 0.0)
    inter = iw * ih
    union = ref_box_area(a) + ref_box_area(b) - inter
    hull = (max(a[2], b[2]) - min(a[0], b[0])) * (max(a[3], b[3]) - min(a[1], b[1]))
    iou = inter / union
    return iou - (hull - union) / hull, iou


def cxcywh_to_xyxy(b):
    return [b[0] - b[2] / 2, b[1] - b[3] / 2, b[0] + b[2] / 2, b[1] + b[3] / 2]


def ref_cost(logit, box, label, gt_box, alpha=0.25, gamma=2.0):
    p = 1 / (1 + math.exp(-logit[label]))
    pos = -math.log(p + 1e-12) * alpha * (1 - p) ** gamma
    neg = -math.log(1 - p + 1e-12) * (1 - alpha) * p**gamma
    l1 = sum(abs(x - y) for x, y in zip(box, gt_box))
    giou, _ = ref_giou(cxcywh_to_xyxy(box), cxcywh_to_xyxy(gt_box))
    return 2.0 * (pos - neg) + 5.0 * l1 - 2.0 * giou


def rand_boxes(n, g):
    c = torch.rand(n, 2, generator=g) * 0.6 + 0.2
    wh = torch.rand(n, 2, generator=g) * 0.3 + 0.05
    return torch.cat([c, wh], 1)


# ---------------------------------------------------------------- matcher
@pytest.mark.parametrize("seed,Q,G", [(0, 5, 3), (1, 4, 4), (2, 6, 2), (3, 3, 5)])
def test_matcher_equals_brute_force(seed, Q, G):
    g = torch.Generator().manual_seed(seed)
    K = 4
    logits = torch.randn(1, Q, K, generator=g) * 2
    boxes = rand_boxes(Q, g)[None]
    labels = torch.randint(0, K, (G,), generator=g)
    gt = rand_boxes(G, g)
    matcher = HungarianMatcher()
    (rows, cols), = matcher(logits, boxes, [{"labels": labels, "boxes": gt}])
    cost = [[ref_cost(logits[0, q].tolist(), boxes[0, q].tolist(), int(labels[j]), gt[j].tolist()) for j in range(G)] for q in range(Q)]
    # cost matrix vs the float64 formula
    ours = matcher.cost_matrix(logits[0], boxes[0], labels, gt)
    torch.testing.assert_close(ours.double(), torch.tensor(cost, dtype=torch.float64), rtol=1e-4, atol=1e-4)
    # optimal total cost vs all assignments
    n = min(Q, G)
    if Q >= G:
        best = min(sum(cost[q][j] for j, q in enumerate(perm)) for perm in itertools.permutations(range(Q), G))
    else:
        best = min(sum(cost[q][j] for q, j in enumerate(perm)) for perm in itertools.permutations(range(G), Q))
    assert len(rows) == len(cols) == n
    assert len(set(rows.tolist())) == n and len(set(cols.tolist())) == n
    total = sum(cost[q][j] for q, j in zip(rows.tolist(), cols.tolist()))
    assert total == pytest.approx(best, abs=1e-4)


def test_matcher_batch_and_empty_images():
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(3, 6, 3, generator=g)
    boxes = torch.stack([rand_boxes(6, g) for _ in range(3)])
    targets = [
        {"labels": torch.tensor([0, 2]), "boxes": rand_boxes(2, g)},
        {"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)},
        {"labels": torch.tensor([1]), "boxes": rand_boxes(1, g)},
    ]
    out = HungarianMatcher()(logits, boxes, targets)
    assert [len(r) for r, _ in out] == [2, 0, 1]
    # the batched matcher agrees with matching each image alone
    for b in (0, 2):
        (r, c), = HungarianMatcher()(logits[b : b + 1], boxes[b : b + 1], [targets[b]])
        assert torch.equal(r, out[b][0]) and torch.equal(c, out[b][1])


def test_matcher_never_feeds_nonfinite_costs_to_scipy():
    logits = torch.tensor([[[float("nan"), 0.0], [float("inf"), -float("inf")], [1.0, 2.0]]])
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.2], [float("nan"), 0.5, 0.1, 0.1], [0.3, 0.3, 0.1, 0.1]]])
    targets = [{"labels": torch.tensor([0, 1]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.3, 0.3, 0.1, 0.1]])}]
    m = HungarianMatcher()
    assert torch.isfinite(m.cost_matrix(logits[0], boxes[0], targets[0]["labels"], targets[0]["boxes"])).all()
    (r, c), = m(logits, boxes, targets)
    assert len(r) == 2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_matcher_cost_is_float32_under_autocast(dtype):
    g = torch.Generator().manual_seed(6)
    logits = (torch.randn(5, 3, generator=g) * 30).to(dtype)  # saturating logits in low precision
    boxes = rand_boxes(5, g).to(dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cost = HungarianMatcher().cost_matrix(logits, boxes, torch.tensor([0, 1]), rand_boxes(2, g))
    assert cost.dtype == torch.float32 and torch.isfinite(cost).all()


# ---------------------------------------------------------------- denoising
def _targets(counts, g):
    return [{"labels": torch.randint(0, 5, (n,), generator=g), "boxes": rand_boxes(n, g)} for n in counts]


def test_denoising_layout_and_noise():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    counts = [3, 1, 0]
    targets = _targets(counts, g)
    gen = CdnQueryGenerator(num_classes=5, num_dn_queries=10, label_noise_ratio=0.0, box_noise_scale=1.0)
    emb = nn.Embedding(5, 8)
    q, ref, mask, meta = gen(targets, emb, num_queries=7)
    G, S = 10 // 3, 3
    assert meta == dict(pad_size=2 * S * G, num_groups=G, single_pad=S)
    assert q.shape == (3, 2 * S * G, 8) and ref.shape == (3, 2 * S * G, 4) and mask.shape == (2 * S * G + 7,) * 2
    boxes = ref.sigmoid()
    for b, t in enumerate(targets):
        for grp in range(G):
            for half in (0, 1):
                start = (2 * grp + half) * S
                for j in range(S):
                    slot = start + j
                    if j < counts[b]:
                        # label noise off: content is the embedding of the true label
                        torch.testing.assert_close(q[b, slot], emb.weight[t["labels"][j]])
                        gt = cxcywh_to_xyxy(t["boxes"][j].tolist())
                        got = cxcywh_to_xyxy(boxes[b, slot].tolist())
                        w, h = gt[2] - gt[0], gt[3] - gt[1]
                        collapsed = min(boxes[b, slot, 2:].tolist()) < 2e-3  # a negative crossed its corners
                        assert half == 1 or not collapsed
                        for k, (a, c) in enumerate(zip(got, gt)):
                            if collapsed:
                                break
                            shift = abs(a - c) / ((w if k % 2 == 0 else h) / 2)
                            clamped = a <= 1e-3 + 1e-6 or a >= 1 - 1e-3 - 1e-6
                            if half == 0:
                                assert shift <= 1.0 + 1e-3, (b, slot, k)
                            elif not clamped:
                                assert 1.0 - 1e-3 <= shift <= 2.0 + 1e-3, (b, slot, k)
                    else:
                        # padding slots: zero content, reference 0.5
                        assert q[b, slot].abs().sum() == 0
                        torch.testing.assert_close(boxes[b, slot], torch.full((4,), 0.5))
    labels, tboxes, weights = CdnQueryGenerator.dn_targets(targets, meta, 5)
    for b, t in enumerate(targets):
        for grp in range(G):
            pos = slice(2 * grp * S, 2 * grp * S + counts[b])
            assert torch.equal(labels[b, pos], t["labels"]) and (weights[b, pos] == 1).all()
            torch.testing.assert_close(tboxes[b, pos], t["boxes"])
    assert int(weights.sum()) == sum(counts) * G
    assert int((labels < 5).sum()) == sum(counts) * G


def test_denoising_label_noise_rate():
    torch.manual_seed(1)
    g = torch.Generator().manual_seed(1)
    targets = _targets([50], g)
    gen = CdnQueryGenerator(num_classes=1000, num_dn_queries=2000, label_noise_ratio=0.5, box_noise_scale=0.0)
    emb = nn.Embedding(1000, 4)
    q, ref, mask, meta = gen(targets, emb, num_queries=1)
    # recover the (possibly flipped) labels from the embeddings
    d = torch.cdist(q[0], emb.weight)
    got = d.argmin(1).view(-1, 50)
    flipped = (got != targets[0]["labels"][None]).float().mean().item()
    assert abs(flipped - 0.25 * 999 / 1000) < 0.03  # flip to a random class with probability 0.25
    # box noise off: references are exactly the GT
    torch.testing.assert_close(ref[0].sigmoid().view(-1, 50, 4), targets[0]["boxes"][None].expand(meta["num_groups"] * 2, -1, -1), atol=1e-5, rtol=0)


def test_denoising_group_count_and_empty_batch():
    g = torch.Generator().manual_seed(2)
    gen = CdnQueryGenerator(num_classes=5, num_dn_queries=100)
    emb = nn.Embedding(5, 8)
    _, _, _, meta = gen(_targets([7, 30], g), emb, 4)
    assert meta["num_groups"] == 100 // 30 and meta["single_pad"] == 30
    _, _, _, meta = gen(_targets([150], g), emb, 4)
    assert meta["num_groups"] == 1
    q, ref, mask, meta = gen(_targets([0, 0], g), emb, 4)
    assert meta["pad_size"] == 0 and q.shape == (2, 0, 8) and mask.shape == (4, 4) and not mask.any()


def test_dn_attention_mask_properties():
    S, G, Q = 2, 3, 5
    mask = build_dn_attn_mask(S, G, Q)
    P = 2 * S * G
    group = lambda i: i // (2 * S) if i < P else None  # noqa: E731
    for i in range(P + Q):
        for j in range(P + Q):
            if i >= P:  # matching queries see only matching queries
                expected = j < P
            elif j >= P:  # denoising queries see all matching queries
                expected = False
            else:  # denoising queries see only their own group
                expected = group(i) != group(j)
            assert bool(mask[i, j]) == expected, (i, j)


# ---------------------------------------------------------------- losses
def test_quality_focal_loss_formula():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(6, 4, generator=g) * 3
    labels = torch.tensor([0, 3, 4, 2, 4, 1])  # 4 = background
    quality = torch.rand(6, generator=g)
    ours = quality_focal_loss(logits, labels, quality, beta=2.0)
    for n in range(6):
        total = 0.0
        for k in range(4):
            x = float(logits[n, k])
            p = 1 / (1 + math.exp(-x))
            t = float(quality[n]) if int(labels[n]) == k else 0.0
            bce = -(t * math.log(p) + (1 - t) * math.log(1 - p))
            total += bce * abs(t - p) ** 2
        assert float(ours[n]) == pytest.approx(total, rel=1e-5, abs=1e-7)


def test_focal_classification_path_matches_formula():
    from dino_utils import tiny_model

    head = tiny_model(cls_loss="focal").query_head
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(1, 5, 3, generator=g) * 2
    labels = torch.tensor([[0, 3, 2, 3, 1]])
    boxes = rand_boxes(5, g)[None]
    cls, _, _ = head.criterion.loss_from_targets(logits, boxes, labels, torch.ones(1, 5), boxes, torch.zeros(1, 5), 3)
    ref = 0.0
    for n in range(5):
        for k in range(3):
            p = 1 / (1 + math.exp(-float(logits[0, n, k])))
            t = 1.0 if int(labels[0, n]) == k else 0.0
            pt = p if t else 1 - p
            at = 0.25 if t else 0.75
            ref += -at * (1 - pt) ** 2 * math.log(pt)
    assert float(cls) == pytest.approx(ref / 3, rel=1e-5)


def test_qfl_head_loss_uses_iou_quality_and_normaliser():
    from dino_utils import tiny_model

    head = tiny_model().query_head
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(2, 3, 3, generator=g)
    boxes = rand_boxes(6, g).view(2, 3, 4)
    tboxes = rand_boxes(6, g).view(2, 3, 4)
    labels = torch.tensor([[0, 3, 1], [3, 2, 3]])
    lw = torch.tensor([[1.0, 1.0, 0.5], [1.0, 1.0, 1.0]])
    bw = (labels < 3).float()
    cls, l1, giou = head.criterion.loss_from_targets(logits, boxes, labels, lw, tboxes, bw, 3)
    ref_cls = ref_l1 = ref_giou_loss = 0.0
    for b in range(2):
        for n in range(3):
            lab = int(labels[b, n])
            q = ref_giou(cxcywh_to_xyxy(boxes[b, n].tolist()), cxcywh_to_xyxy(tboxes[b, n].tolist()))[1] if lab < 3 else 0.0
            for k in range(3):
                p = 1 / (1 + math.exp(-float(logits[b, n, k])))
                t = q if lab == k else 0.0
                ref_cls += float(lw[b, n]) * -(t * math.log(p) + (1 - t) * math.log(1 - p)) * abs(t - p) ** 2
            if lab < 3:
                ref_l1 += sum(abs(x - y) for x, y in zip(boxes[b, n].tolist(), tboxes[b, n].tolist()))
                ref_giou_loss += 1 - ref_giou(cxcywh_to_xyxy(boxes[b, n].tolist()), cxcywh_to_xyxy(tboxes[b, n].tolist()))[0]
    assert float(cls) == pytest.approx(1.0 * ref_cls / 3, rel=1e-5)
    assert float(l1) == pytest.approx(5.0 * ref_l1 / 3, rel=1e-5)
    assert float(giou) == pytest.approx(2.0 * ref_giou_loss / 3, rel=1e-5)


def test_giou_and_l1_helpers():
    g = torch.Generator().manual_seed(6)
    a, b = rand_boxes(5, g), rand_boxes(5, g)
    w = torch.tensor([1.0, 0.0, 2.0, 1.0, 0.5])
    ref = sum(float(w[i]) * (1 - ref_giou(cxcywh_to_xyxy(a[i].tolist()), cxcywh_to_xyxy(b[i].tolist()))[0]) for i in range(5))
    assert float(weighted_giou_loss(a, b, w)) == pytest.approx(ref, rel=1e-5)
    ref = sum(float(w[i]) * float((a[i] - b[i]).abs().sum()) for i in range(5))
    assert float(weighted_l1_loss(a, b, w)) == pytest.approx(ref, rel=1e-5)
    assert float(weighted_giou_loss(a, b, torch.zeros(5))) == 0.0


def test_all_reduce_normalizer_single_process():
    assert float(all_reduce_normalizer(0)) == 1.0
    assert float(all_reduce_normalizer(7)) == 7.0
    t = all_reduce_normalizer(torch.tensor(0.25))
    assert t.dtype == torch.float32 and float(t) == 1.0


# ---------------------------------------------------------------- soft-NMS
def naive_soft_nms(boxes, scores, labels, thr, min_score):
    boxes, scores, labels = boxes.tolist(), scores.tolist(), labels.tolist()
    idx = list(range(len(boxes)))
    out = []
    while idx:
        i = max(idx, key=lambda k: scores[k])
        idx.remove(i)
        out.append((i, scores[i]))
        for k in idx:
            if labels[k] != labels[i]:
                continue
            iou = ref_giou(boxes[i], boxes[k])[1]
            if iou > thr:
                scores[k] *= 1 - iou
    return [(i, s) for i, s in out if s >= min_score]


@pytest.mark.parametrize("seed", [0, 1])
def test_soft_nms_matches_naive_loop(seed):
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(6, 2, generator=g) * 50
    boxes = []
    for x, y in base.tolist():  # clusters of heavily overlapping boxes
        for _ in range(4):
            j = (torch.rand(4, generator=g) * 3).tolist()
            boxes.append([x + j[0], y + j[1], x + 20 + j[2], y + 20 + j[3]])
    boxes = torch.tensor(boxes)
    scores = torch.rand(len(boxes), generator=g)
    labels = torch.randint(0, 2, (len(boxes),), generator=g)
    keep, new = batched_soft_nms(boxes, scores, labels, iou_threshold=0.5, min_score=0.05)
    ref = naive_soft_nms(boxes, scores, labels, 0.5, 0.05)
    assert keep.tolist() == [i for i, _ in ref]
    torch.testing.assert_close(new, torch.tensor([s for _, s in ref]), rtol=1e-5, atol=1e-6)
    assert (new < scores[keep] - 1e-6).any()  # some scores were decayed


# ---------------------------------------------------------------- embeddings and proposals
def test_position_embedding_sine_formula():
    mask = torch.zeros(1, 3, 4, dtype=torch.bool)
    mask[0, :, 3] = True
    mask[0, 2, :] = True
    pe = PositionEmbeddingSine(num_feats=4, temperature=20, normalize=True)(mask)
    assert pe.shape == (1, 8, 3, 4)
    y, x = 1, 2  # valid extent 2 rows x 3 cols
    ye, xe = (y + 1) / (2 + 1e-6) * 2 * math.pi, (x + 1) / (3 + 1e-6) * 2 * math.pi
    ref = []
    for v in (ye, xe):
        for i in range(4):
            d = 20 ** (2 * (i // 2) / 4)
            ref.append(math.sin(v / d) if i % 2 == 0 else math.cos(v / d))
    torch.testing.assert_close(pe[0, :, y, x], torch.tensor(ref), rtol=1e-5, atol=1e-6)


def test_box_sine_embed_order():
    box = torch.tensor([[0.1, 0.2, 0.3, 0.4]])
    e = box_sine_embed(box, num_feats=2, temperature=10000, order="yxwh")
    ref = []
    for v in (0.2, 0.1, 0.3, 0.4):
        a = v * 2 * math.pi
        ref += [math.sin(a), math.cos(a)]
    torch.testing.assert_close(e[0], torch.tensor(ref), rtol=1e-5, atol=1e-6)
    e2 = box_sine_embed(box, num_feats=2, order="xywh")
    torch.testing.assert_close(e2[0, :2], e[0, 2:4])


def test_encoder_proposals_mark_padding_and_edges():
    shapes = torch.tensor([[4, 4], [2, 2]])
    mask = torch.zeros(1, 20, dtype=torch.bool)
    mask[0, :16] = torch.tensor([[0, 0, 0, 1]] * 4, dtype=torch.bool).flatten()  # last column padded at level 0
    memory = torch.ones(1, 20, 3)
    out, props = encoder_output_proposals(memory, mask, shapes)
    p = props[0, :16].view(4, 4, 4)
    assert torch.isinf(p[:, 3]).all() and (out[0, :16].view(4, 4, 3)[:, 3] == 0).all()
    # cell (row 1, col 2) of level 0: centre ((2 + .5) / 3, (1 + .5) / 4), size 0.05
    torch.testing.assert_close(p[1, 2].sigmoid(), torch.tensor([2.5 / 3, 1.5 / 4, 0.05, 0.05]))
    torch.testing.assert_close(props[0, 16].sigmoid(), torch.tensor([0.25, 0.25, 0.1, 0.1]))


def test_topk_proposals_skip_padded_and_invalid_tokens():
    """Brute force: the k best scores among tokens whose proposal is finite; padded tokens only when k exceeds the
    valid count (then after every valid one)."""
    from codetr.modeling.transformer import select_topk_proposals

    g = torch.Generator().manual_seed(3)
    scores = torch.randn(2, 12, generator=g)
    coords = torch.randn(2, 12, 4, generator=g)
    invalid = torch.zeros(2, 12, dtype=torch.bool)
    invalid[0, [1, 4, 5]] = True
    invalid[1, 6:] = True
    scores[invalid] += 100.0  # padded tokens score highest: a plain top-k would take them first
    coords[invalid] = float("inf")
    for k in (3, 6, 8):
        idx = select_topk_proposals(scores, coords, k)
        for b in range(2):
            valid = [i for i in range(12) if not invalid[b, i]]
            ref = sorted(valid, key=lambda i: -float(scores[b, i]))
            got = idx[b].tolist()
            assert len(set(got)) == k and set(ref[:k]) <= set(got), (b, k)  # all valid ones first
            assert all(invalid[b, i] for i in got if i not in ref[:k])


def test_dino_query_selection_never_picks_padding_when_it_scores_highest():
    """A real DINOTransformer on a padded batch with a class branch that scores zeroed (padded) memory highest:
    every reference box of the queries is a finite box inside the image, and they are the top valid tokens."""
    from codetr.modeling.transformer import DINOTransformer

    torch.manual_seed(0)
    C = 16
    t = DINOTransformer(embed_dim=C, num_heads=4, num_levels=2, num_points=1, num_encoder_layers=1,
                        num_decoder_layers=1, ffn_dim=32, num_queries=6)
    feats = [torch.randn(2, C, 4, 4), torch.randn(2, C, 2, 2)]
    masks = [torch.zeros(2, 4, 4, dtype=torch.bool), torch.zeros(2, 2, 2, dtype=torch.bool)]
    masks[0][1, :, 2:] = True  # image 1 is half as wide
    masks[1][1, :, 1:] = True
    ctx = t.encode(feats, masks)
    nn.init.zeros_(t.enc_output.bias)  # zeroed (padded) memory -> enc_output -> LayerNorm = exactly 0

    class NegNorm(torch.nn.Module):  # LayerNorm(0) = 0 at padding -> score 0 > every valid token's
        def forward(self, x):
            return -x.abs().sum(-1, keepdim=True).expand(*x.shape[:-1], 3)

    reg = torch.nn.Linear(C, 4)
    _, ref, _, boxes = t.select_queries(ctx, NegNorm(), reg)
    assert torch.isfinite(ref).all() and (ref < 1).all() and (ref > 0).all()
    logits, unact = t.encoder_proposals(ctx, NegNorm(), reg)
    valid = torch.isfinite(unact).all(-1)
    assert int(valid[1].sum()) == 10 and int(valid[0].sum()) == 20
    for b in range(2):
        score = logits[b].max(-1)[0]
        top = sorted((i for i in range(20) if valid[b, i]), key=lambda i: -float(score[i]))[:6]
        torch.testing.assert_close(boxes[b], unact[b, top].sigmoid())


def test_giou_loss_on_pixel_boxes_with_official_eps():
    """Hand-built fixture where the eps shows: a 2 x 2 px box predicted exactly in a 1000 x 800 image. The official
    loss (pixels, union and enclosure clamped at 1e-6) is 0; GIoU with eps 1e-7 added to the normalised area
    (5e-6 / (5e-6 + 1e-7)) gave 0.0196. Elsewhere the pixel loss equals the float64 GIoU formula."""
    from codetr.modeling.losses import giou_loss_elementwise

    scale = torch.tensor([1000.0, 800.0, 1000.0, 800.0])
    tiny = torch.tensor([[0.5, 0.5, 2 / 1000, 2 / 800]])  # cxcywh normalised
    assert float(weighted_giou_loss(tiny, tiny, torch.ones(1), scale)) == pytest.approx(0.0, abs=1e-6)
    from fvcore.nn import giou_loss
    from torchvision.ops import box_convert

    old = giou_loss(box_convert(tiny, "cxcywh", "xyxy"), box_convert(tiny, "cxcywh", "xyxy"), eps=1e-7)
    assert float(old) == pytest.approx(1 - 5e-6 / (5e-6 + 1e-7), rel=1e-3)  # what the normalised form gave
    # random boxes: pixel-scaled loss = float64 GIoU of the pixel boxes, with per-box scales
    g = torch.Generator().manual_seed(7)
    a, b = rand_boxes(6, g), rand_boxes(6, g)
    w = torch.tensor([1.0, 0.0, 2.0, 1.0, 0.5, 3.0])
    scales = torch.tensor([[640.0, 480.0, 640.0, 480.0]] * 3 + [[1333.0, 800.0, 1333.0, 800.0]] * 3)
    ref = 0.0
    for i in range(6):
        pa = [x * s for x, s in zip(cxcywh_to_xyxy(a[i].tolist()), scales[i].tolist())]
        pb = [x * s for x, s in zip(cxcywh_to_xyxy(b[i].tolist()), scales[i].tolist())]
        ref += float(w[i]) * (1 - ref_giou(pa, pb)[0])
    assert float(weighted_giou_loss(a, b, w, scales)) == pytest.approx(ref, rel=1e-5)
    # degenerate boxes stay finite (the clamps)
    z = torch.zeros(2, 4)
    assert torch.isfinite(giou_loss_elementwise(z, z)).all()
