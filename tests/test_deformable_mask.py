"""Co-Deformable-DETR-mask: the Faster R-CNN auxiliary head as Mask R-CNN (detectron2's MaskRCNNConvUpsampleHead on
RoIAlign 14, mask loss x12) and the mask head run on the query head's final boxes at test time.

The official key list (tests/data/official-state-dict-co_deformable_detr_mask_r50.tsv: the co_deformable_detr_r50
list plus the FCNMaskHead keys of the official mask config, see its header) converts with zero missing/unexpected
keys; the test-time masks equal a reference built by hand from torchvision's roi_align at mmdet's RoI level mapping,
the mask head and detectron2's paste; the real demo config trains one step with the mask loss reaching the encoder;
a tiny model overfits a few images to segm AP50 >= 80."""
import math
import os
import time

import pytest
import torch
from detectron2.config import LazyConfig, instantiate
from detectron2.layers import ShapeSpec
from detectron2.layers.mask_ops import paste_masks_in_image
from detectron2.modeling.roi_heads import MaskRCNNConvUpsampleHead
from detectron2.utils.events import EventStorage
from torchvision.ops import roi_align

from codetr import model_zoo
from codetr.checkpoint.official import convert_official_state_dict
from codetr.modeling.atss import ATSSHead
from codetr.modeling.adapter import MultiScaleAdapter
from codetr.modeling.collaborative import CollaborativeBranch
from codetr.modeling.rcnn import RCNNBranch
from dino_utils import one_thread, tiny_deformable  # noqa: F401 (fixture)
from test_mask_head import _overfit_data
from test_official_checkpoint import random_state_dict, read_tsv

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TSV = os.path.join(REPO, "tests", "data", "official-state-dict-co_deformable_detr_mask_r50.tsv")
DEMO = os.path.join(REPO, "configs", "demo", "co_deformable_detr_mask_synthetic.py")
NUM_CLASSES = 3


def load(name, overrides=()):
    return LazyConfig.apply_overrides(LazyConfig.load(os.path.join(REPO, "configs", name)), list(overrides))


def n_params(module, trainable=False):
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable)


def tiny_mask_collaborative(embed_dim=32, num_classes=NUM_CLASSES, finest_scale=56, mask_loss_weight=4.0):
    """The tests' tiny Co-Deformable-DETR aux branch (as test_collaborative_model.tiny_collaborative), its RCNN head
    with a mask head (2 convs + deconv of embed_dim channels)."""
    strides = (4, 8, 16, 32, 64)
    mask_head = MaskRCNNConvUpsampleHead(ShapeSpec(channels=embed_dim, height=14, width=14), num_classes=num_classes,
                                         conv_dims=[embed_dim] * 3, loss_weight=mask_loss_weight)
    return CollaborativeBranch(
        aux_heads=[
            RCNNBranch(num_classes=num_classes, in_channels=embed_dim, strides=strides, num_roi_levels=4, fc_dim=64,
                       rpn_batch_size_per_image=64, rpn_pre_nms_topk=(300, 100), rpn_post_nms_topk=(100, 100),
                       roi_batch_size_per_image=64, roi_finest_scale=finest_scale,
                       loss_rpn_cls_weight=4.0, loss_rpn_bbox_weight=4.0, loss_cls_weight=4.0, loss_bbox_weight=40.0,
                       return_feats=True, mask_head=mask_head),
            ATSSHead(num_classes=num_classes, in_channels=embed_dim, feat_channels=embed_dim, strides=strides,
                     num_gn_groups=8, loss_cls_weight=4.0, loss_bbox_weight=8.0, loss_centerness_weight=4.0,
                     return_feats=True),
        ],
        num_classes=num_classes,
        adapter=MultiScaleAdapter(strides[:-1], strides, embed_dim=embed_dim, num_gn_groups=8),
    )


def tiny_co_deformable_mask(embed_dim=32, width=16, num_queries=15, **kw):
    model = tiny_deformable(num_classes=NUM_CLASSES, num_queries=num_queries, embed_dim=embed_dim, width=width,
                            num_co_heads=2)
    model.collaborative = tiny_mask_collaborative(embed_dim=embed_dim, **kw)
    return model


# ----------------------------------------------------------------------------------------------- official weights
def test_official_co_deformable_detr_mask_r50_key_list_converts_with_zero_missing_and_unexpected():
    layout = read_tsv(TSV)
    assert len(layout) == 688
    official = random_state_dict(layout)
    model = instantiate(load("co_deformable_detr_mask_r50.py").model)
    out, report = convert_official_state_dict(official, model.state_dict())
    assert report.ok and not report.missing and not report.unexpected and not report.shape_mismatch, report.summary()
    assert set(report.ignored) == {k for k in official if k.endswith("num_batches_tracked")}
    missing, unexpected = model.load_state_dict(out, strict=True)
    assert not missing and not unexpected
    mh = model.collaborative.aux_heads[0].roi_heads.mask_head
    for i in range(4):
        assert torch.equal(getattr(mh, f"mask_fcn{i + 1}").weight, official[f"roi_head.0.mask_head.convs.{i}.conv.weight"])
        assert torch.equal(getattr(mh, f"mask_fcn{i + 1}").bias, official[f"roi_head.0.mask_head.convs.{i}.conv.bias"])
    assert torch.equal(mh.deconv.weight, official["roi_head.0.mask_head.upsample.weight"])
    assert torch.equal(mh.predictor.bias, official["roi_head.0.mask_head.conv_logits.bias"])
    assert torch.equal(model.collaborative.aux_heads[0].roi_heads.box_predictor.cls_score.weight,
                       official["roi_head.0.bbox_head.fc_cls.weight"])
    # parameter counts: the mask head has the official FCNMaskHead's, the whole model the official trainable count
    official_mask = sum(math.prod(s) for k, (s, _) in layout.items() if k.startswith("roi_head.0.mask_head."))
    assert n_params(mh) == official_mask == 2_643_280
    with open(TSV) as f:
        rows = [line.rstrip("\n").split("\t") for line in f if not line.startswith("#")]
    official_trainable = sum(math.prod(eval(shape)) for _, shape, _, kind in rows if kind == "param")
    assert n_params(model, trainable=True) == official_trainable == 67_497_654
    assert n_params(model) == 67_720_054


def test_config_official_settings_round_trip_and_zoo(tmp_path):
    cfg = load("co_deformable_detr_mask_r50.py")
    rcnn = cfg.model.collaborative.aux_heads[0]
    assert rcnn.mask_pooler_resolution == 14 and rcnn.num_roi_levels == 4 and rcnn.roi_finest_scale == 112
    mh = rcnn.mask_head
    assert list(mh.conv_dims) == [256] * 5 and mh.loss_weight == 12.0
    assert (mh.input_shape.channels, mh.input_shape.height, mh.input_shape.width) == (256, 14, 14)
    assert cfg.dataloader.train.mapper.use_instance_mask and cfg.dataloader.train.mapper.instance_mask_format == "bitmask"
    assert tuple(cfg.dataloader.evaluator.tasks) == ("bbox", "segm") and cfg.dataloader.evaluator.max_dets_per_image == 100
    assert cfg.dataloader.train.dataset.filter_empty is False  # official filter_empty_gt=False
    path = str(tmp_path / "cfg.yaml")
    LazyConfig.save(cfg, path)
    assert not os.path.exists(path + ".pkl")
    again = LazyConfig.load(path)
    LazyConfig.save(again, str(tmp_path / "cfg2.yaml"))
    with open(path) as a, open(tmp_path / "cfg2.yaml") as b:
        assert a.read() == b.read()
    model = instantiate(again.model)
    assert model.aux_masks and model.collaborative.with_mask
    assert model.collaborative.aux_heads[0].roi_heads.mask_head.predictor.out_channels == 80
    # the class count follows the query head
    small = instantiate(load("co_deformable_detr_mask_r50.py", ["model.query_head.num_classes=7"]).model)
    assert small.collaborative.aux_heads[0].roi_heads.mask_head.predictor.out_channels == 7
    # model zoo: the config is found by name; no official checkpoint of it is released
    assert model_zoo.get_config_file("co_deformable_detr_mask_r50") == os.path.join(REPO, "configs",
                                                                                    "co_deformable_detr_mask_r50.py")
    with pytest.raises(RuntimeError, match="no official weights"):
        model_zoo.get_config("co_deformable_detr_mask_r50.py", trained=True)


def test_bad_settings_raise():
    wrong = MaskRCNNConvUpsampleHead(ShapeSpec(channels=32, height=14, width=14), num_classes=5, conv_dims=[32, 32])
    with pytest.raises(ValueError, match="predicts 5 classes"):
        RCNNBranch(num_classes=3, in_channels=32, mask_head=wrong)
    model = tiny_co_deformable_mask()
    inputs, _ = _overfit_data(n_img=2)
    inputs[1]["instances"].remove("gt_masks")
    model.train()
    with EventStorage(), pytest.raises(ValueError, match="gt_masks"):
        model(inputs)
    # an image without objects needs no masks (the mapper gives it no gt_masks field): it trains
    from detectron2.structures import Boxes, Instances

    empty = Instances(inputs[1]["instances"].image_size)
    empty.gt_boxes = Boxes(torch.zeros(0, 4))
    empty.gt_classes = torch.zeros(0, dtype=torch.int64)
    inputs[1]["instances"] = empty
    with EventStorage():
        losses = model(inputs)
    assert torch.isfinite(losses["loss_mask0"])
    from codetr.modeling import CoDETR
    from codetr.modeling.mask_head import InstanceMaskBranch, RefineMaskHead

    branch = InstanceMaskBranch(mask_head=RefineMaskHead(in_channels=32, num_classes=3, conv_dim=32))
    with pytest.raises(ValueError, match="keep one"):
        CoDETR(backbone=model.backbone, neck=model.neck, query_head=model.query_head, pixel_mean=[0, 0, 0],
               pixel_std=[1, 1, 1], collaborative=model.collaborative, mask_branch=branch)


# ----------------------------------------------------------------------------------------------- test-time masks
def _reference_masks(model, x):
    """Masks of the model's own detections, by hand: the query head's eval outputs -> post-processor -> per box the
    mmdet level floor(log2(sqrt(area) / finest_scale + 1e-6)) clamped to the RoI levels -> torchvision roi_align
    (14, aligned, adaptive sampling) on that encoder map -> the mask head -> sigmoid of the detected class's
    channel -> detectron2's paste at the output size (threshold 0.5)."""
    images, masks, norm_sizes = model.preprocess_image([x])
    feats = model.neck(model.backbone(images.tensor))
    logits, boxes, enc_ctx = model.query_head(feats, masks, None, norm_sizes, return_enc_ctx=True)
    det = model.postprocessor(logits, boxes, norm_sizes)[0]
    h, w = images.image_sizes[0]
    b = det["boxes"].clone()
    b[:, 0::2] = b[:, 0::2].clamp(0, w)
    b[:, 1::2] = b[:, 1::2].clamp(0, h)
    maps = model.query_head.encoder_maps(enc_ctx)
    rcnn = model.collaborative.aux_heads[0]
    strides, finest = (4, 8, 16, 32), 56
    area = ((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])).double()
    lvl = torch.floor(torch.log2(area.sqrt() / finest + 1e-6)).clamp(0, 3).long()
    pooled = torch.zeros(len(b), maps[0].shape[1], 14, 14)
    for i in range(len(b)):
        s = strides[int(lvl[i])]
        roi = torch.cat([torch.zeros(1), b[i]])[None]
        pooled[i] = roi_align(maps[int(lvl[i])], roi, 14, spatial_scale=1.0 / s, sampling_ratio=0, aligned=True)[0]
    mh = rcnn.roi_heads.mask_head
    y = mh.layers(pooled)  # the head's convs, deconv and predictor: (R, K, 28, 28) logits
    probs = y[torch.arange(len(b)), det["labels"]].sigmoid()
    out_h, out_w = x["height"], x["width"]
    scale = torch.tensor([out_w / w, out_h / h, out_w / w, out_h / h])
    return det, b * scale, paste_masks_in_image(probs, b * scale, (out_h, out_w), threshold=0.5)


def test_masks_of_the_query_head_boxes_match_a_hand_built_reference():
    torch.manual_seed(3)
    model = tiny_co_deformable_mask()
    model.eval()
    inputs, _ = _overfit_data(n_img=1, size=64)
    x = {"image": inputs[0]["image"][:, :, :48], "height": 96, "width": 72}  # non-square; output at 1.5x
    with torch.no_grad():
        got = model([x])[0]["instances"]
        det, ref_boxes, ref_masks = _reference_masks(model, x)
    assert got.image_size == (96, 72) and len(got) == len(det["boxes"]) > 0
    torch.testing.assert_close(got.pred_boxes.tensor, ref_boxes, rtol=1e-5, atol=1e-4)
    assert torch.equal(got.pred_classes, det["labels"]) and torch.equal(got.scores, det["scores"])
    assert got.pred_masks.shape == (len(det["boxes"]), 96, 72) and got.pred_masks.dtype == torch.bool
    # codetr's RoIAlign kernels vs torchvision's: only pixels at a probability of ~0.5 may flip
    disagree = (got.pred_masks != ref_masks).float().mean().item()
    assert disagree < 1e-3, disagree
    assert ref_masks.any()
    # boxes and scores are the model's without the mask head (the same detector: collaborative off)
    model.collaborative = None
    with torch.no_grad():
        plain = model([x])[0]["instances"]
    assert torch.equal(plain.pred_boxes.tensor, got.pred_boxes.tensor) and not plain.has("pred_masks")


def test_eval_module_rcnn_gives_the_roi_heads_masks():
    torch.manual_seed(4)
    model = tiny_co_deformable_mask()
    model.eval_module = "rcnn"
    model.eval()
    inputs, _ = _overfit_data(n_img=1, size=64)
    with torch.no_grad():
        got = model([{"image": inputs[0]["image"], "height": 32, "width": 32}])[0]["instances"]
    assert len(got) > 0 and got.pred_masks.shape == (len(got), 32, 32) and got.pred_masks.dtype == torch.bool


# ----------------------------------------------------------------------------------------------- training
def test_demo_config_training_step_mask_loss_reaches_the_encoder(tmp_path):
    """The real demo config (configs/demo/co_deformable_detr_mask_synthetic.py): one training step on 2 images with
    exact masks; finite losses incl. loss_mask0; the mask loss alone puts gradient on the encoder, the backbone and
    the mask head, none on the query head's decoder."""
    torch.manual_seed(0)
    cfg = LazyConfig.load(DEMO)
    path = str(tmp_path / "demo.yaml")
    LazyConfig.save(cfg, path)  # what the training script does first
    assert not os.path.exists(path + ".pkl")
    cfg = LazyConfig.load(path)
    assert cfg.dataloader.train.mapper.use_instance_mask and tuple(cfg.dataloader.evaluator.tasks) == ("bbox", "segm")
    model = instantiate(cfg.model)
    model.train()
    inputs, _ = _overfit_data(n_img=2, size=96)
    with EventStorage():
        losses = model(inputs)
    assert "loss_mask0" in losses and all(torch.isfinite(v) for v in losses.values())
    assert losses["loss_mask0"] > 0
    losses["loss_mask0"].backward(retain_graph=True)
    enc = model.query_head.transformer.encoder
    assert sum(p.grad.abs().sum() for p in enc.parameters() if p.grad is not None) > 0
    assert sum(p.grad.abs().sum() for p in model.backbone.parameters() if p.grad is not None) > 0
    mh = model.collaborative.aux_heads[0].roi_heads.mask_head
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in mh.parameters())
    dec = model.query_head.transformer.decoder
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in dec.parameters())
    model.zero_grad()
    sum(losses.values()).backward()
    assert not [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]


def test_tiny_co_deformable_detr_mask_overfits_to_segm_ap50(tmp_path):
    """Learning check: a tiny Co-Deformable-DETR-mask (32-d, masks from the Mask R-CNN aux head on the query head's
    boxes) overfits 4 images of 48 px with 1-3 rectangles to segm AP50 >= 80 (COCOEvaluator, bbox + segm)."""
    from detectron2.data import DatasetCatalog, MetadataCatalog

    from codetr.evaluation import build_detection_evaluator

    torch.manual_seed(0)
    inputs, dicts = _overfit_data()
    name = "codetr_test_deformable_mask_overfit"
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    DatasetCatalog.register(name, lambda: dicts)
    MetadataCatalog.get(name).set(thing_classes=["red", "green", "blue"])
    evaluator = build_detection_evaluator(name, max_dets_per_image=100, output_dir=str(tmp_path), distributed=False,
                                          tasks=("bbox", "segm"))
    model = tiny_co_deformable_mask()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    test_inputs = [{k: v for k, v in x.items() if k != "instances"} for x in inputs]
    history, t0 = [], time.time()
    with EventStorage():
        for it in range(1, 201):
            model.train()
            losses = model(inputs)
            loss = sum(losses.values())
            assert torch.isfinite(loss), it
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            if it >= 40 and it % 20 == 0:
                model.eval()
                evaluator.reset()
                with torch.no_grad():
                    evaluator.process(test_inputs, model(test_inputs))
                res = evaluator.evaluate()
                history.append((it, round(res["bbox"]["AP50"], 1), round(res["segm"]["AP50"], 1),
                                round(res["segm"]["AP"], 1)))
                if res["segm"]["AP50"] >= 80:
                    break
    print(f"\ntiny Co-Deformable-DETR-mask overfit (iteration, bbox AP50, segm AP50, segm AP): {history}; "
          f"wall {time.time() - t0:.0f} s")
    assert history[-1][2] >= 80, history


# ----------------------------------------------------------------------------------------------- Predictor, demo.py
def test_predictor_returns_masks_at_the_original_size_of_a_non_square_image(tmp_path):
    """codetr.Predictor with the demo instance config (random weights, every mask forced to fill its box, saved as a
    checkpoint): ``pred_masks`` (N, H, W) at the original 150 x 230 image equal to their boxes rasterised by hand,
    and to the model's masks on the resized 224 x 343 image (the config's test resize) scaled back;
    tools/demo.py draws them."""
    import importlib.util

    import numpy as np
    import detectron2.data.transforms as T
    from detectron2.data import MetadataCatalog

    from codetr import Predictor

    torch.manual_seed(0)
    model = instantiate(LazyConfig.load(DEMO).model)
    with torch.no_grad():  # every mask = its whole box (logit +10 everywhere): the geometry is checkable by hand
        pred = model.collaborative.aux_heads[0].roi_heads.mask_head.predictor
        pred.weight.zero_()
        pred.bias.fill_(10.0)
    ckpt = str(tmp_path / "model.pth")
    torch.save({"model": model.state_dict()}, ckpt)
    predictor = Predictor(DEMO, ckpt, device="cpu", input_format="RGB")
    h, w = 150, 230
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 60, (h, w, 3), dtype=np.uint8)
    rgb[40:110, 30:120] = (250, 40, 40)
    rgb[70:140, 120:220] = (30, 220, 60)
    got = predictor(rgb)
    assert got.image_size == (h, w) and len(got) == 100
    assert got.pred_masks.shape == (len(got), h, w) and got.pred_masks.dtype == torch.bool
    # each mask is its box in original pixels: pixel centres inside the box, up to one boundary pixel
    ys, xs = torch.arange(h)[:, None] + 0.5, torch.arange(w)[None, :] + 0.5
    checked = 0
    for m, (x0, y0, x1, y1) in zip(got.pred_masks, got.pred_boxes.tensor.tolist()):
        inner = (xs >= x0 + 1) & (xs <= x1 - 1) & (ys >= y0 + 1) & (ys <= y1 - 1)
        outer = (xs >= x0 - 1) & (xs <= x1 + 1) & (ys >= y0 - 1) & (ys <= y1 + 1)
        assert not (m & ~outer).any() and not (inner & ~m).any()
        checked += int(inner.any())
    assert checked > 0
    # the same detections as the model's on the resized image (the config's test resize, by hand), scaled back
    new_h, new_w = 224, 343  # short side 150 -> 224, long side round(230 * 224 / 150) = 343 (<= 384)
    resized = T.ResizeTransform(h, w, new_h, new_w).apply_image(rgb)
    with torch.no_grad():
        ref = predictor.model([{"image": torch.as_tensor(np.ascontiguousarray(resized.transpose(2, 0, 1)))}])[0]
    ref = ref["instances"]
    assert ref.pred_masks.shape == (len(got), new_h, new_w)
    assert torch.equal(ref.pred_classes, got.pred_classes)
    back = torch.nn.functional.interpolate(ref.pred_masks[:, None].float(), size=(h, w), mode="nearest")[:, 0] > 0.5
    union = (back | got.pred_masks).sum()
    assert union > 0 and (back & got.pred_masks).sum() / union > 0.85

    # tools/demo.py's drawing: the masks are drawn (pixels inside the largest mask change against a box-only draw)
    spec = importlib.util.spec_from_file_location("codetr_demo_tool", os.path.join(REPO, "tools", "demo.py"))
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    k = int(got.pred_masks.flatten(1).sum(1).argmax())
    one = got[k : k + 1]
    boxes_only = one[:]
    boxes_only.remove("pred_masks")
    meta = MetadataCatalog.get("codetr_synthetic_val")
    bgr = np.ascontiguousarray(rgb[:, :, ::-1])
    with_masks, n = demo.draw(bgr, one, meta)
    without, _ = demo.draw(bgr, boxes_only, meta)
    assert n == 1 and with_masks.shape == bgr.shape
    changed = torch.from_numpy((with_masks != without).any(axis=2))
    assert changed[one.pred_masks[0]].float().mean() > 0.5


def test_mask_loss_is_weighted_bce_of_the_gt_class_on_the_positive_rois():
    """loss_mask0 = weight x mean BCE (float64) of each positive RoI's GT-class logits against its GT mask cropped
    to the RoI on the 28 px grid (the official FCNMaskHead target: roi_align of the mask, binarised at 0.5)."""
    torch.manual_seed(5)
    model = tiny_co_deformable_mask(mask_loss_weight=12.0)
    rcnn = model.collaborative.aux_heads[0]
    captured = {}

    def hook(module, args, out):
        captured["logits"] = out.detach().double()

    mh = rcnn.roi_heads.mask_head
    handle = mh.predictor.register_forward_hook(hook)
    orig = mh.forward
    mh.forward = lambda x, instances: (captured.__setitem__("instances", instances), orig(x, instances))[1]
    inputs, _ = _overfit_data(n_img=2, size=64)
    model.train()
    with EventStorage():
        losses = model(inputs)
    handle.remove()
    logits, insts = captured["logits"], captured["instances"]
    n = sum(len(i) for i in insts)
    assert n > 0 and logits.shape == (n, NUM_CLASSES, 28, 28)
    targets, cls = [], []
    for inst in insts:
        # by hand: bilinear roi_align (aligned, adaptive sampling) of the GT's binary mask, then >= 0.5
        gt = inst.gt_masks.tensor.double()[:, None]
        for k in range(len(inst)):
            box = inst.proposal_boxes.tensor[k].double()
            t = roi_align(gt[k:k + 1], [box[None]], 28, spatial_scale=1.0, sampling_ratio=0, aligned=True)
            targets.append((t[0, 0] >= 0.5).double())
        cls.append(inst.gt_classes)
    targets, cls = torch.stack(targets), torch.cat(cls)
    x = logits[torch.arange(n), cls]
    bce = (torch.clamp(x, min=0) - x * targets + torch.log1p(torch.exp(-x.abs()))).mean()
    torch.testing.assert_close(losses["loss_mask0"].double(), 12.0 * bce, rtol=1e-5, atol=1e-6)
