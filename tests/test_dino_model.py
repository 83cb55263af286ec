"""CoDETR + DINOHead end to end on CPU: losses, gradients, empty GT, aux passes, bad input, eval output."""
import copy
import math

import pytest
import torch

from detectron2.utils.events import EventStorage

from dino_utils import one_thread, random_input, tiny_model  # noqa: F401 (fixture)

pytestmark = pytest.mark.usefixtures("one_thread")

NAMES = ("loss_cls", "loss_bbox", "loss_iou")


def expected_keys(num_layers):
    keys = {"enc_" + n for n in NAMES}
    for lvl in range(num_layers):
        prefix = "" if lvl == num_layers - 1 else f"d{lvl}."
        keys |= {prefix + n for n in NAMES} | {prefix + "dn_" + n for n in NAMES}
    return keys


def _batch(seed=0, counts=(3, 1)):
    g = torch.Generator().manual_seed(seed)
    sizes = [(64, 96), (80, 64), (96, 96)]
    return [random_input(*sizes[i % 3], n, name=f"img{i}.jpg", generator=g) for i, n in enumerate(counts)]


def _head_inputs(model, batch):
    """What CoDETR hands its query head: neck features, padding masks, targets, normalisation sizes."""
    images, masks, sizes = model.preprocess_image(batch)
    targets = model.prepare_targets(batch, [x["instances"] for x in batch], sizes)
    return model.neck(model.backbone(images.tensor)), masks, targets, sizes


def test_training_step_keys_and_all_gradients():
    torch.manual_seed(0)
    model = tiny_model()
    model.train()
    with EventStorage():
        losses = model(_batch())
    assert set(losses) == expected_keys(2)
    for k, v in losses.items():
        assert v.ndim == 0 and torch.isfinite(v), k
    sum(losses.values()).backward()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not no_grad, no_grad
    # the matched decoder losses of a fresh model are real (not zero) box losses
    assert losses["loss_bbox"] > 0 and losses["dn_loss_iou"] > 0


def test_model_buffers_and_device_move():
    model = tiny_model()
    sd = model.state_dict()
    assert "pixel_mean" not in sd and "pixel_std" not in sd
    model.to(torch.device("cpu"))
    assert model.device.type == "cpu"


@pytest.mark.parametrize("counts", [(0, 2), (0, 0)])
def test_empty_ground_truth(counts):
    torch.manual_seed(1)
    model = tiny_model()
    model.train()
    losses = model(_batch(1, counts))
    assert set(losses) == expected_keys(2)
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    # every parameter stays in the graph even without any GT (DDP find_unused_parameters=False)
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not no_grad, no_grad


def test_without_attn_mask_trains_and_infers():
    torch.manual_seed(2)
    model = tiny_model(with_attn_mask=False)
    model.train()
    losses = model(_batch(2))
    assert all(torch.isfinite(v) for v in losses.values())
    model.eval()
    with torch.no_grad():
        out = model(_batch(2))
    inst = out[0]["instances"]
    assert inst.image_size == (64, 96)
    b = inst.pred_boxes.tensor
    assert (b[:, 2] <= 96).all() and (b[:, 3] <= 64).all()


def test_forward_aux_losses_and_gradients():
    torch.manual_seed(3)
    model = tiny_model(num_co_heads=2, lambda_1=1.0)
    model.train()
    batch = _batch(3)
    feats, masks, targets, norm_sizes = _head_inputs(model, batch)
    _, enc_ctx = model.query_head(feats, masks, targets, norm_sizes)
    for key in ("memory", "spatial_shapes", "level_start_index", "valid_ratios", "mask_flatten", "image_sizes"):
        assert key in enc_ctx
    assert len(enc_ctx["memory_values"]) == len(model.query_head.transformer.decoder.layers)
    B, N = 2, 9
    assert enc_ctx["memory"].shape[0] == B and enc_ctx["mask_flatten"].shape == enc_ctx["memory"].shape[:2]
    memory = enc_ctx["memory"]
    memory.retain_grad()
    ref = torch.rand(B, N, 4) * 0.4 + 0.3
    query = model.query_head.aux_query_content(ref, 1)
    assert query.shape == (B, N, 64)
    labels = torch.randint(0, 4, (B, N))
    aux_targets = dict(
        labels=labels,
        label_weights=torch.ones(B, N),
        boxes=torch.rand(B, N, 4) * 0.4 + 0.3,
        box_weights=(labels < 3).float(),
    )
    losses = model.query_head.positive_query_losses(enc_ctx, dict(aux_targets, ref_boxes=ref), 1)
    keys = {f"{p}{n}_aux1" for p in ("", "d0.") for n in NAMES}
    assert set(losses) == keys
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert memory.grad is not None and memory.grad.abs().sum() > 0
    dec = model.query_head.transformer.decoder.layers[0]
    assert dec.attentions[1].value_proj.weight.grad.abs().sum() > 0
    assert model.query_head.transformer.aux_pos_trans[1].weight.grad.abs().sum() > 0
    assert model.query_head.transformer.aux_pos_trans[0].weight.grad is None
    with pytest.raises(ValueError, match="head_idx"):
        model.query_head.aux_query_content(ref, 2)


def test_shared_memory_values_equal_separate_passes():
    """positive_query_losses with the one-to-one pass's per-layer value projections == a pass that projects the memory
    itself (the official computation): same losses, same gradients on the memory and on value_proj."""
    torch.manual_seed(5)
    model = tiny_model(num_co_heads=1, lambda_1=1.0)
    model.train()
    batch = _batch(5)
    feats, masks, targets, ns = _head_inputs(model, batch)
    feats = [f.detach() for f in feats]
    g = torch.Generator().manual_seed(5)
    ref = torch.rand(2, 9, 4, generator=g) * 0.4 + 0.3
    labels = torch.randint(0, 4, (2, 9), generator=g)
    t = dict(labels=labels, label_weights=torch.ones(2, 9), boxes=torch.rand(2, 9, 4, generator=g) * 0.4 + 0.3,
             box_weights=(labels < 3).float())
    results = []
    for shared in (True, False):
        model.zero_grad()
        torch.manual_seed(55)  # same denoising noise in both runs
        main_losses, ctx = model.query_head(feats, masks, targets, ns)
        assert "memory_values" in ctx
        if not shared:
            ctx = {k: v for k, v in ctx.items() if k != "memory_values"}
        ctx["memory"].retain_grad()
        aux = model.query_head.positive_query_losses(ctx, dict(t, ref_boxes=ref), 0)
        (sum(main_losses.values()) + sum(aux.values())).backward()
        vp = model.query_head.transformer.decoder.layers[1].attentions[1].value_proj
        results.append((aux, ctx["memory"].grad.clone(), vp.weight.grad.clone(), vp.bias.grad.clone()))
    (aux_a, *grads_a), (aux_b, *grads_b) = results
    assert aux_a.keys() == aux_b.keys()
    for k in aux_a:
        torch.testing.assert_close(aux_a[k], aux_b[k], rtol=1e-5, atol=1e-6)
    for a, b in zip(grads_a, grads_b):
        assert a.abs().sum() > 0
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="memory_values"):
        dec = model.query_head.transformer.decoder
        dec(ref, ref, ctx["memory"], ctx["spatial_shapes"], ctx["level_start_index"], ctx["valid_ratios"],
            ctx["mask_flatten"], model.query_head.reg_branches, memory_values=[ctx["memory"]])


def test_lambda_1_scales_aux_losses():
    torch.manual_seed(4)
    model = tiny_model(num_co_heads=1)
    model.train()
    batch = _batch(4)
    with torch.no_grad():
        feats, masks, targets, ns = _head_inputs(model, batch)
        _, ctx = model.query_head(feats, masks, targets, ns)
        ref = torch.rand(2, 9, 4) * 0.4 + 0.3
        t = dict(labels=torch.randint(0, 4, (2, 9)), label_weights=torch.ones(2, 9), boxes=torch.rand(2, 9, 4) * 0.4 + 0.3,
                 box_weights=torch.ones(2, 9), ref_boxes=ref)
        a = model.query_head.positive_query_losses(ctx, t, 0)
        model.query_head.criterion.lambda_1 = 2.5
        b = model.query_head.positive_query_losses(ctx, t, 0)
    for k in a:
        torch.testing.assert_close(b[k], 2.5 * a[k])


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda inst: inst.gt_classes.fill_(7), "outside"),
        (lambda inst: inst.gt_classes.fill_(-1), "outside"),
        (lambda inst: inst.gt_boxes.tensor.__setitem__((0, 0), float("nan")), "NaN"),
        (lambda inst: inst.gt_boxes.tensor.__setitem__((0, 2), inst.gt_boxes.tensor[0, 0]), "degenerate"),
        (lambda inst: inst.gt_boxes.tensor.__setitem__((0, 3), inst.gt_boxes.tensor[0, 1] - 3), "degenerate"),
    ],
)
def test_bad_annotations_name_the_image(corrupt, message):
    model = tiny_model()
    model.train()
    batch = _batch(5, counts=(2, 2))
    corrupt(batch[1]["instances"])
    with pytest.raises(ValueError, match=message) as e:
        model(batch)
    assert "img1.jpg" in str(e.value)


def test_bad_annotations_without_file_name_use_batch_index():
    model = tiny_model()
    model.train()
    batch = _batch(6, counts=(2, 2))
    for x in batch:
        del x["file_name"]
    batch[0]["instances"].gt_classes[0] = 3
    with pytest.raises(ValueError, match="#0"):
        model(batch)


def test_autocast_bf16_training_step_is_finite():
    torch.manual_seed(7)
    model = tiny_model()
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = model(_batch(7))
    assert all(torch.isfinite(v.float()) for v in losses.values())
    sum(losses.values()).backward()


def test_eval_output_and_postprocess():
    torch.manual_seed(8)
    model = tiny_model(max_per_img=15)
    model.eval()
    batch = _batch(8)
    batch[0]["height"], batch[0]["width"] = 128, 192  # original twice the input size
    with torch.no_grad():
        out = model(batch)
    assert len(out) == 2
    inst = out[0]["instances"]
    assert inst.image_size == (128, 192)
    assert set(inst.get_fields()) == {"pred_boxes", "scores", "pred_classes"}
    assert len(inst) <= 15
    b = inst.pred_boxes.tensor
    assert (b[:, 0] >= 0).all() and (b[:, 2] <= 192).all() and (b[:, 3] <= 128).all()
    assert (inst.scores[:-1] >= inst.scores[1:]).all()
    assert inst.pred_classes.dtype == torch.int64 and inst.pred_classes.max() < 3


def test_same_number_of_normaliser_all_reduces_with_and_without_gt(monkeypatch):
    """Under DDP every process must run the same collectives, whatever its ground truth."""
    import codetr.modeling.criterion as criterion

    calls = []
    real = criterion.all_reduce_normalizer

    def counting(num, device=None):
        calls.append(1)
        return real(num, device)

    monkeypatch.setattr(criterion, "all_reduce_normalizer", counting)
    model = tiny_model()
    model.train()
    counts = []
    for gt in [(3, 1), (0, 0), (0, 2)]:
        calls.clear()
        model(_batch(9, gt))
        counts.append(len(calls))
    assert counts[0] == counts[1] == counts[2] == 1 + 2 * 2  # encoder, then matching + denoising per layer


def test_activation_checkpointing_gives_same_losses_and_gradients():
    batch = _batch(10)
    results = []
    for num_checkpoint in (0, 2):
        torch.manual_seed(10)
        model = tiny_model()
        model.query_head.transformer.encoder.num_checkpoint = num_checkpoint
        model.train()
        torch.manual_seed(11)  # same denoising noise
        losses = model(batch)
        sum(losses.values()).backward()
        results.append((losses, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (l0, g0), (l1, g1) = results
    for k in l0:
        torch.testing.assert_close(l0[k], l1[k])
    assert g0.keys() == g1.keys()
    for n in g0:
        torch.testing.assert_close(g0[n], g1[n], rtol=1e-4, atol=1e-6)


def test_inference_without_soft_nms_is_plain_topk():
    torch.manual_seed(12)
    model = tiny_model(num_queries=20, soft_nms=False, max_per_img=25)
    model.eval()
    batch = _batch(12)
    with torch.no_grad():
        images, masks, ns = model.preprocess_image(batch)
        logits, boxes = model.query_head(model.neck(model.backbone(images.tensor)), masks, None, ns)
        dets = model.postprocessor(logits, boxes, ns)
    assert logits.shape == (2, 20, 3) and boxes.shape == (2, 20, 4)
    for b in range(2):
        ref = torch.sort(logits[b].sigmoid().flatten(), descending=True)[0][:25]
        torch.testing.assert_close(dets[b]["scores"], ref)
        flat = logits[b].sigmoid().flatten()
        idx = torch.stack([torch.nonzero(flat == s)[0, 0] for s in dets[b]["scores"]])
        assert torch.equal(dets[b]["labels"], idx % 3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("amp_dtype", [None, torch.float16, torch.bfloat16])
def test_cuda_training_and_eval(amp_dtype):
    torch.manual_seed(13)
    model = tiny_model().to("cuda")
    assert model.pixel_mean.device.type == "cuda"
    model.train()
    batch = _batch(13)
    with torch.autocast("cuda", dtype=amp_dtype or torch.float16, enabled=amp_dtype is not None):
        losses = model(batch)
    assert all(torch.isfinite(v.float()) for v in losses.values())
    sum(losses.values()).backward()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not no_grad, no_grad
    model.eval()
    with torch.no_grad(), torch.autocast("cuda", dtype=amp_dtype or torch.float16, enabled=amp_dtype is not None):
        out = model(batch)
    inst = out[0]["instances"]
    assert inst.pred_boxes.tensor.device.type == "cuda" and torch.isfinite(inst.pred_boxes.tensor).all()


def test_head_leaves_its_transformer_and_criterion_as_given():
    """DINOHead's constructor adds nothing to the modules it is given (the positive-query projections come with
    DINOTransformer(num_co_heads=...)), and refuses a criterion for another number of classes."""
    from codetr.modeling import DETRCriterion, DINOHead, DINOTransformer

    t = DINOTransformer(embed_dim=32, num_heads=4, num_levels=2, num_points=2, num_encoder_layers=1,
                        num_decoder_layers=1, ffn_dim=64, num_queries=5, num_co_heads=2)
    before = {k: v.clone() for k, v in t.state_dict().items()}
    crit = DETRCriterion(num_classes=3)
    head = DINOHead(transformer=t, num_classes=3, criterion=crit)
    after = t.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert head.criterion is crit and head.num_co_heads == 2 and len(t.aux_pos_trans) == 2
    with pytest.raises(ValueError, match="num_classes"):
        DINOHead(transformer=t, num_classes=4, criterion=crit)


def test_postprocess_soft_nms_runs_on_num_query_candidates_then_keeps_max_per_img():
    """Hand-built fixture (official order: top num_query candidates -> class-aware soft-NMS -> max_per_img):
    400 queries, 2 classes; queries 0..299 are copies of one box with class-0 scores 0.95..0.8 (soft-NMS decays
    every copy after the first to 0: IoU 1), queries 300..399 are disjoint boxes with class-1 scores 0.6..0.5 (ranks
    301..400 of the 800 (query, class) pairs). With max_per_img=300 the detections are the best copy and then the
    100 disjoint boxes, in score order: candidates beyond rank 300 survive."""
    from codetr.modeling.postprocess import DETRPostProcessor

    n = 400
    prob = torch.full((1, n, 2), 1e-4)
    prob[0, :300, 0] = torch.linspace(0.95, 0.8, 300)
    prob[0, 300:, 1] = torch.linspace(0.6, 0.5, 100)
    logits = torch.logit(prob.double()).float()
    boxes = torch.zeros(1, n, 4)
    boxes[0, :300] = torch.tensor([0.5, 0.5, 0.2, 0.2])  # cxcywh, normalised
    i = torch.arange(100, dtype=torch.float32)
    boxes[0, 300:, 0] = (i % 10) / 10 + 0.05
    boxes[0, 300:, 1] = torch.div(i, 10, rounding_mode="floor") / 10 + 0.05
    boxes[0, 300:, 2:] = 0.05  # a 10 x 10 grid of small disjoint boxes
    sizes = torch.tensor([[200.0, 300.0]])
    det = DETRPostProcessor(max_per_img=300)(logits, boxes, sizes)[0]
    expected_scores = torch.cat([prob[0, :1, 0], prob[0, 300:, 1]])
    assert det["labels"].tolist() == [0] + [1] * 100
    torch.testing.assert_close(det["scores"], torch.sigmoid(logits[0, [0] + list(range(300, 400)), det["labels"]]))
    torch.testing.assert_close(det["scores"], expected_scores, rtol=1e-6, atol=1e-7)
    scale = torch.tensor([300.0, 200.0, 300.0, 200.0])
    torch.testing.assert_close(det["boxes"][0], torch.tensor([0.4, 0.4, 0.6, 0.6]) * scale)
    # the old order (top 300 pairs, then soft-NMS) could only return the cluster's first copy
    old = DETRPostProcessor(max_per_img=300, num_candidates=300)(logits, boxes, sizes)[0]
    assert old["labels"].tolist() == [0]
    # more candidates than max_per_img survive: the cut to max_per_img applies after soft-NMS
    cut = DETRPostProcessor(max_per_img=50)(logits, boxes, sizes)[0]
    assert len(cut["scores"]) == 50 and torch.equal(cut["scores"], det["scores"][:50])
