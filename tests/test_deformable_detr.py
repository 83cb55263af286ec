"""Co-Deformable-DETR / Deformable-DETR: the official key list, the positive-query projection and the binary encoder
loss against float64 formulas, the criterion's matching against brute force for both heads' settings, a training
step, eval without the auxiliary modules, configs, and an overfit check."""
import copy
import itertools
import math
import os

import pytest
import torch
from detectron2.config import LazyConfig, instantiate
from detectron2.utils.events import EventStorage

from codetr.checkpoint.official import convert_official_state_dict
from codetr.modeling import DETRCriterion
from codetr.modeling.deformable_transformer import DeformableDETRTransformer
from dino_utils import one_thread, random_input, tiny_deformable  # noqa: F401 (fixture)
from test_collaborative_model import tiny_collaborative
from test_dino_parts import cxcywh_to_xyxy, rand_boxes, ref_giou
from test_official_checkpoint import random_state_dict, read_tsv

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TSV = os.path.join(REPO, "tests", "data", "official-state-dict-co_deformable_detr_r50.tsv")
NUM_CLASSES = 3
AUX_ONLY = ("collaborative.", "query_head.transformer.aux_pos_trans", "query_head.transformer.pos_feats_",
            "query_head.transformer.head_pos_embed")


def load(name, overrides=()):
    return LazyConfig.apply_overrides(LazyConfig.load(os.path.join(REPO, "configs", name)), list(overrides))


def tiny_co_deformable(**kw):
    model = tiny_deformable(num_classes=NUM_CLASSES, num_co_heads=2, **kw)
    embed_dim = model.query_head.embed_dim
    model.collaborative = tiny_collaborative(embed_dim=embed_dim, num_gn_groups=8, return_feats=True)
    return model


def _batch(seed=0, counts=(3, 1)):
    g = torch.Generator().manual_seed(seed)
    sizes = [(64, 96), (80, 64)]
    return [random_input(*sizes[i % 2], n, num_classes=NUM_CLASSES, name=f"img{i}.jpg", generator=g)
            for i, n in enumerate(counts)]


# ----------------------------------------------------------------------------------------------- official weights
def test_full_official_co_deformable_detr_r50_key_list_loads_with_zero_missing_and_unexpected():
    official = random_state_dict(read_tsv(TSV))
    assert len(official) == 676
    model = instantiate(load("co_deformable_detr_r50.py").model)
    out, report = convert_official_state_dict(official, model.state_dict())
    assert report.ok, report.summary()
    assert set(report.ignored) == {k for k in official if k.endswith("num_batches_tracked")}
    missing, unexpected = model.load_state_dict(out, strict=True)
    assert not missing and not unexpected
    t = model.query_head.transformer
    assert t.head_pos_embed.weight.shape == (2, 1)
    assert torch.equal(t.head_pos_embed.weight, official["query_head.transformer.head_pos_embed.weight"])
    assert torch.equal(t.aux_pos_trans[1].weight, official["query_head.transformer.aux_pos_trans.1.weight"])
    assert torch.equal(t.pos_feats_norm[0].bias, official["query_head.transformer.pos_feats_norm.0.bias"])
    assert torch.equal(t.pos_trans.weight, official["query_head.transformer.pos_trans.weight"])
    assert torch.equal(model.query_head.query_embedding.weight, official["query_head.query_embedding.weight"])
    assert torch.equal(model.collaborative.adapter.downsample[0][0].weight, official["query_head.downsample.0.weight"])
    assert torch.equal(model.collaborative.aux_heads[1].scales[4].scale, official["bbox_head.0.scales.4.scale"])
    assert torch.equal(model.neck.convs[2].norm.weight, official["neck.convs.2.gn.weight"])
    assert torch.equal(model.neck.extra_convs[0].weight, official["neck.extra_convs.0.conv.weight"])
    assert torch.equal(model.collaborative.aux_heads[1].cls_convs[0].weight, official["bbox_head.0.cls_convs.0.conv.weight"])
    assert torch.equal(model.collaborative.aux_heads[1].reg_convs[0].norm.bias, official["bbox_head.0.reg_convs.0.gn.bias"])


# ----------------------------------------------------------------------------------------------- float64 references
def _sine64(v, num_feats, temperature=10000.0):
    out = []
    for i in range(num_feats):
        x = v * 2 * math.pi / temperature ** (2 * (i // 2) / num_feats)
        out.append(math.sin(x) if i % 2 == 0 else math.cos(x))
    return out


def _linear64(lin, x):
    return (torch.tensor(x, dtype=torch.float64) @ lin.weight.double().t() + lin.bias.double()).tolist()


def _layernorm64(ln, x):
    x = torch.tensor(x, dtype=torch.float64)
    y = (x - x.mean()) / torch.sqrt(x.var(unbiased=False) + ln.eps)
    return (y * ln.weight.double() + ln.bias.double()).tolist()


def _randomise(module, g):
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def test_positive_query_projection_matches_float64():
    """query_pos, query = split(LN_i(Linear_i(sine(boxes)))), query += LN_i(Linear_i(feats)),
    query_pos += head_pos_embed[i] (one learned scalar per head)."""
    g = torch.Generator().manual_seed(0)
    C = 16
    t = DeformableDETRTransformer(embed_dim=C, num_heads=4, num_levels=1, num_points=1, num_encoder_layers=1,
                                  num_decoder_layers=1, ffn_dim=32, num_co_heads=2)
    _randomise(t, g)
    boxes = torch.rand(2, 3, 4, generator=g) * 0.9 + 0.05
    feats = torch.randn(2, 3, C, generator=g)
    for head in (0, 1):
        query, query_pos = t.positive_queries(boxes, feats, head)
        assert query.shape == query_pos.shape == (2, 3, C)
        for b, n in itertools.product(range(2), range(3)):
            emb = sum((_sine64(float(v), C // 2) for v in boxes[b, n].tolist()), [])
            out = _layernorm64(t.aux_pos_trans_norm[head], _linear64(t.aux_pos_trans[head], emb))
            f = _layernorm64(t.pos_feats_norm[head], _linear64(t.pos_feats_trans[head], feats[b, n].tolist()))
            ref_q = [out[C + c] + f[c] for c in range(C)]
            ref_pos = [out[c] + float(t.head_pos_embed.weight[head, 0]) for c in range(C)]
            torch.testing.assert_close(query[b, n].double(), torch.tensor(ref_q, dtype=torch.float64), rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(query_pos[b, n].double(), torch.tensor(ref_pos, dtype=torch.float64), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="head_idx"):
        t.positive_queries(boxes, feats, 2)


def test_query_selection_takes_the_top_object_scores_and_their_position_embedding():
    g = torch.Generator().manual_seed(1)
    C = 16
    t = DeformableDETRTransformer(embed_dim=C, num_heads=4, num_levels=2, num_points=1, num_encoder_layers=1,
                                  num_decoder_layers=1, ffn_dim=32)
    _randomise(t, g)
    feats = [torch.randn(1, C, 4, 4, generator=g), torch.randn(1, C, 2, 2, generator=g)]
    masks = [torch.zeros(1, 4, 4, dtype=torch.bool), torch.zeros(1, 2, 2, dtype=torch.bool)]
    ctx = t.encode(feats, masks)
    cls, reg = torch.nn.Linear(C, 3), torch.nn.Linear(C, 4)
    query_embed = torch.randn(5, C, generator=g)
    query, query_pos, ref, enc_logits, enc_boxes = t.select_queries(ctx, cls, reg, query_embed)
    assert enc_logits.shape == (1, 20, 3) and enc_boxes.shape == (1, 20, 4)  # every token
    top = torch.argsort(enc_logits[0, :, 0], descending=True)[:5]
    torch.testing.assert_close(ref[0], enc_boxes[0, top])
    assert torch.equal(query[0], query_embed)
    for n in range(5):
        emb = sum((_sine64(float(v), C // 2) for v in ref[0, n].tolist()), [])
        out = _layernorm64(t.pos_trans_norm, _linear64(t.pos_trans, emb))
        torch.testing.assert_close(query_pos[0, n].double(), torch.tensor(out[:C], dtype=torch.float64), rtol=1e-4, atol=1e-4)


def _focal64(logit, target, alpha=0.25, gamma=2.0):
    p = 1 / (1 + math.exp(-logit))
    pt = p if target else 1 - p
    return -(alpha if target else 1 - alpha) * (1 - pt) ** gamma * math.log(pt)


def _match_cost64(logit, box, gt_box, alpha=0.25, gamma=2.0):
    """The official matching cost of one (query, GT) pair; ``logit`` is the query's logit of the GT class."""
    p = 1 / (1 + math.exp(-logit))
    pos = -math.log(p + 1e-12) * alpha * (1 - p) ** gamma
    neg = -math.log(1 - p + 1e-12) * (1 - alpha) * p**gamma
    l1 = sum(abs(x - y) for x, y in zip(box, gt_box))
    return 2.0 * (pos - neg) + 5.0 * l1 - 2.0 * ref_giou(cxcywh_to_xyxy(box), cxcywh_to_xyxy(gt_box))[0]


def _brute_force(logits, boxes, labels, gt_boxes):
    """Cheapest injective GT -> query assignment: {query: gt}."""
    S, G = len(boxes), len(gt_boxes)
    best, best_cost = None, float("inf")
    for qs in itertools.permutations(range(S), G):
        c = sum(_match_cost64(logits[q][labels[j]], boxes[q], gt_boxes[j]) for j, q in enumerate(qs))
        if c < best_cost:
            best, best_cost = qs, c
    return {q: j for j, q in enumerate(best)}


def test_binary_encoder_loss_matches_float64():
    """Encoder loss of Co-Deformable-DETR: all tokens, every GT labelled class 0, Hungarian-matched; focal 2.0
    (alpha 0.25, gamma 2) + L1 5 + GIoU 2, each over the number of GT."""
    g = torch.Generator().manual_seed(2)
    S, K = 6, 3
    logits = torch.randn(1, S, K, generator=g) * 2
    boxes = rand_boxes(S, g)[None]
    targets = [{"labels": torch.tensor([2, 1]), "boxes": rand_boxes(2, g)}]
    crit = DETRCriterion(num_classes=K, cls_loss="focal", loss_cls_weight=2.0, loss_bbox_weight=5.0,
                         loss_giou_weight=2.0, binary_encoder_labels=True)
    losses = crit.encoder_losses(logits, boxes, targets)
    L, B, T = logits[0].tolist(), boxes[0].tolist(), targets[0]["boxes"].tolist()
    match = _brute_force(L, B, [0, 0], T)
    cls = sum(_focal64(L[q][k], k == 0 and q in match) for q in range(S) for k in range(K))
    l1 = sum(sum(abs(x - y) for x, y in zip(B[q], T[j])) for q, j in match.items())
    giou = sum(1 - ref_giou(cxcywh_to_xyxy(B[q]), cxcywh_to_xyxy(T[j]))[0] for q, j in match.items())
    assert float(losses["enc_loss_cls"]) == pytest.approx(2.0 * cls / 2, rel=1e-5)
    assert float(losses["enc_loss_bbox"]) == pytest.approx(5.0 * l1 / 2, rel=1e-5)
    assert float(losses["enc_loss_iou"]) == pytest.approx(2.0 * giou / 2, rel=1e-5)
    # with the GT classes instead (DINO's encoder loss) the class term differs
    full = DETRCriterion(num_classes=K, cls_loss="focal", loss_cls_weight=2.0).encoder_losses(logits, boxes, targets)
    assert float(full["enc_loss_cls"]) != pytest.approx(float(losses["enc_loss_cls"]), rel=1e-3)


@pytest.mark.parametrize("config,binary", [("co_dino_r50.py", False), ("co_deformable_detr_r50.py", False),
                                           ("co_deformable_detr_r50.py", True)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_criterion_matching_equals_brute_force(config, binary, seed):
    """The criterion's Hungarian assignment (with each config's matcher costs; binary = the encoder's labels of
    Co-Deformable-DETR) is the cheapest one found by enumeration."""
    crit_cfg = load(config).model.query_head.criterion
    crit_cfg.num_classes = 4
    crit = instantiate(crit_cfg)
    g = torch.Generator().manual_seed(seed)
    Q, G = 5, 3
    logits = torch.randn(1, Q, 4, generator=g) * 2
    boxes = rand_boxes(Q, g)[None]
    labels = torch.randint(0, 4, (G,), generator=g)
    gt = rand_boxes(G, g)
    match_labels = torch.zeros_like(labels) if binary else labels
    dense = crit.matched_targets(logits, boxes, [{"labels": match_labels, "boxes": gt}])
    ref = _brute_force(logits[0].tolist(), boxes[0].tolist(), match_labels.tolist(), gt.tolist())
    got = {q: int(torch.nonzero((gt == dense[2][0, q]).all(1))[0, 0]) for q in range(Q) if dense[3][0, q] > 0}
    assert got == ref and dense[4] == G
    assert all(int(dense[0][0, q]) == int(match_labels[j]) for q, j in ref.items())


# ----------------------------------------------------------------------------------------------- the model
def test_training_step_losses_and_gradients():
    torch.manual_seed(0)
    model = tiny_co_deformable()
    model.train()
    with EventStorage():
        losses = model(_batch(0, counts=(3, 0)))
    aux_keys = {f"{p}{n}_aux{i}" for i in (0, 1) for p in ("", "d0.") for n in ("loss_cls", "loss_bbox", "loss_iou")}
    assert aux_keys | {"loss_cls", "d0.loss_bbox", "enc_loss_cls", "enc_loss_iou", "loss_cls1", "loss_rpn_cls0"} <= set(losses)
    assert not any("dn_" in k for k in losses)  # no denoising in Deformable-DETR
    for k, v in losses.items():
        assert v.ndim == 0 and torch.isfinite(v), k
    sum(losses.values()).backward()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not no_grad, no_grad
    t = model.query_head.transformer
    for m in (t.head_pos_embed, t.pos_feats_trans[0], t.pos_feats_trans[1], t.aux_pos_trans[1]):
        assert m.weight.grad.abs().sum() > 0


def test_positive_queries_need_the_aux_features():
    torch.manual_seed(1)
    model = tiny_co_deformable()
    model.collaborative = tiny_collaborative(embed_dim=64, num_gn_groups=8)  # return_feats=False
    model.train()
    with EventStorage(), pytest.raises(ValueError, match="return_feats"):
        model(_batch(1))


def test_eval_outputs_identical_without_aux_modules():
    torch.manual_seed(3)
    model = tiny_co_deformable().eval()
    batch = [{k: v for k, v in x.items() if k != "instances"} for x in _batch(3)]
    with torch.no_grad():
        with_aux = model(batch)
        bare = copy.deepcopy(model)
        bare.collaborative = None
        without = bare(batch)
        plain = tiny_deformable(num_classes=NUM_CLASSES, num_co_heads=0).eval()  # Deformable-DETR, same weights
        plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith(AUX_ONLY)}, strict=True)
        base = plain(batch)
    for a, b, c in zip(with_aux, without, base):
        a, b, c = a["instances"], b["instances"], c["instances"]
        assert len(a) == 60  # top-100 of 20 queries x 3 classes, no NMS
        for x in (b, c):
            assert torch.equal(a.pred_boxes.tensor, x.pred_boxes.tensor)
            assert torch.equal(a.scores, x.scores) and torch.equal(a.pred_classes, x.pred_classes)


def test_configs_official_settings_and_baseline():
    cfg = load("co_deformable_detr_r50.py")
    m, qh, t = cfg.model, cfg.model.query_head, cfg.model.query_head.transformer
    assert list(m.backbone.out_features) == ["res3", "res4", "res5"] and m.neck.num_extra == 1
    assert (t.num_levels, t.pos_temperature, t.pos_offset, t.num_co_heads, qh.num_queries) == (4, 10000.0, -0.5, 2, 300)
    c = qh.criterion
    assert (c.cls_loss, c.loss_cls_weight, c.loss_bbox_weight, c.loss_giou_weight) == ("focal", 2.0, 5.0, 2.0)
    assert (c.focal_alpha, c.focal_gamma, c.binary_encoder_labels) == (0.25, 2.0, True)
    assert (m.postprocessor.max_per_img, m.postprocessor.soft_nms) == (100, False)
    rcnn, atss = m.collaborative.aux_heads
    assert tuple(rcnn.strides) == (8, 16, 32, 64, 128) and rcnn.num_roi_levels == 4 and rcnn.roi_finest_scale == 112
    assert tuple(atss.strides) == (8, 16, 32, 64, 128) and rcnn.return_feats and atss.return_feats
    assert (rcnn.loss_cls_weight, rcnn.loss_bbox_weight, atss.loss_bbox_weight) == (12, 120, 24)
    factor = instantiate(cfg.optimizer.params.lr_factor_func)
    assert factor("backbone.res3.0.conv1.weight") == 0.1
    assert factor("query_head.transformer.encoder.layers.0.attentions.0.sampling_offsets.weight") == 0.1
    assert factor("query_head.transformer.decoder.layers.2.attentions.1.sampling_offsets.bias") == 0.1
    assert factor("query_head.transformer.decoder.layers.2.attentions.1.value_proj.weight") == 1.0
    assert cfg.optimizer.lr == 2e-4 and cfg.optimizer.weight_decay == 1e-4 and cfg.dataloader.evaluator.max_dets_per_image == 100
    base = load("deformable_detr_r50.py")
    assert base.model.collaborative is None and base.model.query_head.transformer.num_co_heads == 0
    # the documented override of the Co- config gives the baseline, which builds nothing of the branch
    over = LazyConfig.apply_overrides(cfg, ["model.collaborative=null", "model.query_head.transformer.num_co_heads=0"])
    a, b = instantiate(over.model), instantiate(base.model)
    aux_modules = ("codetr.modeling.collaborative", "codetr.modeling.atss", "codetr.modeling.rcnn")
    assert not [type(x).__name__ for x in b.modules() if type(x).__module__ in aux_modules]
    assert not [k for k in b.state_dict() if k.startswith(AUX_ONLY)]
    assert {k: v.shape for k, v in a.state_dict().items()} == {k: v.shape for k, v in b.state_dict().items()}


def test_tiny_co_deformable_detr_overfits_to_ap50(tmp_path):
    """The learning check of test_dino_overfit.py (same data, optimiser, criterion: AP50 >= 90 of the one-to-one
    head), Co-Deformable-DETR with the collaborative branch on."""
    from test_dino_overfit import make_data, overfit_evaluator, train_until_ap50

    torch.manual_seed(0)
    inputs, dicts = make_data()
    evaluator = overfit_evaluator("codetr_test_co_deformable_overfit", dicts, tmp_path)
    model = tiny_deformable(num_classes=3, num_queries=15, embed_dim=32, width=16, num_co_heads=2)
    model.collaborative = tiny_collaborative(embed_dim=32, num_gn_groups=8, return_feats=True)
    history = train_until_ap50(model, inputs, evaluator)
    print(f"\ntiny Co-Deformable-DETR overfit: history {history}")
    assert history[-1][1] >= 90.0, history


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("amp_dtype", [None, torch.bfloat16])
def test_cuda_training_and_eval(amp_dtype):
    torch.manual_seed(13)
    model = tiny_co_deformable().to("cuda")
    model.train()
    with EventStorage(), torch.autocast("cuda", dtype=amp_dtype or torch.float16, enabled=amp_dtype is not None):
        losses = model(_batch(13))
    assert all(torch.isfinite(v.float()) for v in losses.values())
    sum(losses.values()).backward()
    assert not [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    model.eval()
    batch = [{k: v for k, v in x.items() if k != "instances"} for x in _batch(13)]
    with torch.no_grad():
        inst = model(batch)[0]["instances"]
    assert inst.pred_boxes.tensor.device.type == "cuda" and torch.isfinite(inst.pred_boxes.tensor).all()
