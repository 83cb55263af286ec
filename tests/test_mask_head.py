"""Co-DINO-Inst mask branch: boundary bands, the RefineMask loss and mask-IoU targets against brute-force float64
references, the RoI level rule against the official formula, and a training/eval step of a real (tiny) CoDETR."""
import math
import os
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from dino_utils import one_thread, random_input, tiny_model  # noqa: E402,F401  (one_thread: a fixture)

from detectron2.modeling.poolers import assign_boxes_to_levels  # noqa: E402
from detectron2.structures import BitMasks, Boxes  # noqa: E402

from codetr.modeling.mask_head import (  # noqa: E402
    InstanceMaskBranch,
    MaskIoUHead,
    RefineMaskHead,
    boundary_band,
    mask_iou_targets,
    refine_mask_inference,
    refine_mask_loss,
)


def _band_brute(mask: np.ndarray, width: int) -> np.ndarray:
    """Pixel by pixel: a foreground pixel whose window holds > 10% background (zero padding included), or a
    background pixel whose window holds > 10% foreground."""
    h, w = mask.shape
    k = 2 * width + 1
    pad = np.zeros((h + 2 * width, w + 2 * width))
    pad[width:-width, width:-width] = mask
    out = np.zeros((h, w), bool)
    for y in range(h):
        for x in range(w):
            win = pad[y:y + k, x:x + k]
            frac_fg = win.sum() / (k * k)
            out[y, x] = (1 - frac_fg) > 0.1 if mask[y, x] else frac_fg > 0.1
    return out


def test_boundary_band_brute_force():
    g = torch.Generator().manual_seed(0)
    masks = torch.rand(3, 13, 11, generator=g) > 0.6
    masks[0] = False
    masks[0, 3:9, 2:8] = True  # a square: its band is the ring along its edge
    for width in (1, 2):
        got = boundary_band(masks, width)
        for m, b in zip(masks.numpy(), got.numpy()):
            np.testing.assert_array_equal(b, _band_brute(m, width))
    ring = boundary_band(masks[:1], 1)[0]
    assert ring[3, 2] and ring[2, 2] and not ring[6, 5] and not ring[0, 10]


def _bce(x, t):
    return np.maximum(x, 0) - x * t + np.log1p(np.exp(-np.abs(x)))


def _up(a, size):  # torch's bilinear (align_corners=True) resize, in float64
    return F.interpolate(torch.as_tensor(a, dtype=torch.float64)[:, None], size, mode="bilinear",
                         align_corners=True)[:, 0].numpy()


def test_refine_mask_loss_against_reference():
    g = torch.Generator().manual_seed(1)
    sizes = (4, 8, 16, 32)
    logits = [torch.randn(2, 1, s, s, generator=g, dtype=torch.float64) * 3 for s in sizes]
    targets = [(torch.rand(2, s, s, generator=g) > 0.5).double() for s in sizes]
    weights = (0.5, 0.75, 0.75, 1.0)
    got = refine_mask_loss(logits, targets, weights, boundary_width=2, start_stage=1)

    # reference: stages 0, 1 mean BCE; later stages BCE on the (previous prediction's | previous target's) band
    # of width 2 resized to the stage; the "previous prediction" is refined like at test time (width-1 band)
    L = [x[:, 0].numpy() for x in logits]
    T = [t.numpy() for t in targets]
    total, prev = 0.0, None
    for i in range(4):
        if i <= 1:
            loss = _bce(L[i], T[i]).mean()
            prev = L[i] >= 0  # sigmoid >= 0.5
        else:
            band = np.stack([_band_brute(p, 2) | _band_brute(t, 2) for p, t in zip(prev, T[i - 1])])
            band = _up(band.astype(float), sizes[i]) >= 0.5
            loss = (_bce(L[i], T[i]) * band).sum() / max(band.sum(), 1)
            edge = _up(np.stack([_band_brute(p, 1) for p in prev]).astype(float), sizes[i]) >= 0.5
            prev = np.where(edge, L[i], _up(L[i - 1], sizes[i])) >= 0
        total += weights[i] * loss
    assert float(got) == pytest.approx(total, rel=1e-9)

    # test-time refinement: from stage 1 on, coarse logits outside the coarse prediction's 1 px band
    ref = refine_mask_inference(logits)[:, 0].numpy()
    cur = L[1]
    for i in (2, 3):
        edge = _up(np.stack([_band_brute(p, 1) for p in cur >= 0]).astype(float), sizes[i]) >= 0.5
        cur = np.where(edge, L[i], _up(cur, sizes[i]))
    np.testing.assert_allclose(ref, cur, rtol=1e-12)


def test_mask_iou_targets_brute_force():
    g = torch.Generator().manual_seed(2)
    H, W = 30, 40
    gt = torch.zeros(3, H, W, dtype=torch.bool)
    gt[0, 5:20, 5:25] = True
    gt[1, 10:30, 20:40] = True
    gt[2, 0:8, 0:8] = True
    boxes = torch.tensor([[4.3, 4.9, 18.2, 22.7], [19.5, 9.2, 39.9, 29.9], [0.0, 0.0, 0.4, 0.6], [6.0, 6.0, 30.0, 12.0]])
    idx = torch.tensor([0, 1, 2, 0])
    s = 8
    logits = torch.randn(4, s, s, generator=g) * 2
    targets = BitMasks(gt[idx]).crop_and_resize(boxes, s).float()
    got = mask_iou_targets(logits, targets, boxes, gt, idx)
    for r in range(4):  # the official per-RoI computation
        b = boxes[r].numpy().astype(np.int32)
        x1, x2 = np.clip(b[[0, 2]], 0, W)
        y1, y2 = np.clip(b[[1, 3]], 0, H)
        w, h = max(x2 - x1, 1), max(y2 - y1, 1)
        m = gt[idx[r]].numpy()
        ratio = m[y1:y1 + h, x1:x1 + w].sum() / (m.sum() + 1e-7)
        pred = (torch.sigmoid(logits[r]) > 0.5).double().numpy()
        t = targets[r].double().numpy()
        inter = (pred * t).sum()
        ref = inter / (pred.sum() + t.sum() / (ratio + 1e-7) - inter)
        assert float(got[r]) == pytest.approx(ref, rel=1e-5, abs=1e-6)


def test_roi_levels_follow_the_official_rule():
    """Official SingleRoIExtractor: level floor(log2(sqrt(area) / 56)) clamped to 0..4 (strides 4..64)."""
    g = torch.Generator().manual_seed(3)
    xy = torch.rand(500, 2, generator=g) * 500
    wh = torch.exp(torch.rand(500, 2, generator=g) * math.log(1500)) + 0.5
    boxes = Boxes(torch.cat([xy, xy + wh], 1))
    got = assign_boxes_to_levels([boxes], 2, 6, 224, 4)
    ref = torch.floor(torch.log2(boxes.area().sqrt() / 56 + 1e-6)).clamp(0, 4).long()
    assert (got == ref).float().mean() > 0.995  # only boxes within 1e-6 of a level boundary may differ


def _branch(num_classes=3, dim=64, **kw):
    return InstanceMaskBranch(
        mask_head=RefineMaskHead(in_channels=dim, num_classes=num_classes, conv_dim=dim),
        mask_iou_head=MaskIoUHead(in_channels=dim, num_classes=num_classes, conv_dim=dim, fc_dim=64),
        strides=(4, 8, 16, 32), batch_size_per_image=32, **kw)


def _inputs_with_masks(n_images=2, h=64, w=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    batch = [random_input(h, w, 3, num_classes=3, generator=g) for _ in range(n_images)]
    for x in batch:
        inst = x["instances"]
        b = inst.gt_boxes.tensor.round().long()
        m = torch.zeros(len(inst), h, w, dtype=torch.bool)
        for i, (x1, y1, x2, y2) in enumerate(b.tolist()):  # test fixture: an ellipse inside each box
            yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
            cx, cy, rx, ry = (x1 + x2) / 2, (y1 + y2) / 2, max((x2 - x1) / 2, 1), max((y2 - y1) / 2, 1)
            m[i] = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1
        inst.gt_masks = BitMasks(m)
        inst.gt_boxes = inst.gt_masks.get_bounding_boxes()
    return batch


def test_co_dino_inst_training_step_and_inference(one_thread):
    torch.manual_seed(0)
    model = tiny_model(num_classes=3)
    model.mask_branch = _branch()
    batch = _inputs_with_masks()
    model.train()
    losses = model(batch)
    assert {"loss_mask", "loss_mask_iou"} <= set(losses)
    assert all(torch.isfinite(v) for v in losses.values())
    assert float(losses["loss_mask"]) > 0
    # the mask loss alone reaches the encoder (RoI features and the semantic map are encoder maps)
    model.zero_grad()
    losses["loss_mask"].backward()
    enc = [p.grad for n, p in model.named_parameters() if "transformer.encoder" in n and p.grad is not None]
    assert enc and sum(float(g.abs().sum()) for g in enc) > 0
    backbone = [p.grad for n, p in model.named_parameters() if n.startswith("backbone") and p.grad is not None]
    assert backbone and sum(float(g.abs().sum()) for g in backbone) > 0

    # an image without objects: zero mask losses, still in the graph
    empty = _inputs_with_masks(1)
    inst = empty[0]["instances"]
    empty[0]["instances"] = inst[torch.zeros(len(inst), dtype=torch.bool)]
    out = model(empty)
    assert float(out["loss_mask"]) == 0 and out["loss_mask"].requires_grad

    model.eval()
    model.mask_branch.test_chunk = 7  # several chunks
    with torch.no_grad():
        res = model([{"image": x["image"], "height": 32, "width": 48} for x in batch])
        model.mask_branch.test_chunk = 1000
        res_one = model([{"image": x["image"], "height": 32, "width": 48} for x in batch])
    for r, r1 in zip(res, res_one):
        inst = r["instances"]
        assert inst.pred_masks.shape == (len(inst), 32, 48) and inst.pred_masks.dtype == torch.bool
        assert ((inst.mask_scores >= 0) & (inst.mask_scores <= inst.scores + 1e-6)).all()
        assert torch.equal(inst.pred_masks, r1["instances"].pred_masks)
        torch.testing.assert_close(inst.mask_scores, r1["instances"].mask_scores)


def _overfit_data(n_img=4, size=48, seed=0):
    """Dark noise with 1-3 solid rectangles, one colour per class; masks are the visible pixels (later rectangles
    hide earlier ones), boxes their tight boxes; detectron2 dicts with the masks as RLE for the evaluator."""
    import pycocotools.mask as mask_util
    from detectron2.structures import BoxMode, Instances

    colors = torch.tensor([[230, 40, 40], [40, 230, 40], [40, 40, 230]], dtype=torch.uint8)
    g = torch.Generator().manual_seed(seed)
    inputs, dicts = [], []
    for i in range(n_img):
        img = (torch.rand(3, size, size, generator=g) * 40).to(torch.uint8)
        owner = torch.full((size, size), -1)
        classes = []
        for k in range(1 + i % 3):
            c = int(torch.randint(0, 3, (1,), generator=g))
            w, h = (int(v) for v in torch.randint(12, 28, (2,), generator=g))
            x0, y0 = int(torch.randint(0, size - w, (1,), generator=g)), int(torch.randint(0, size - h, (1,), generator=g))
            img[:, y0:y0 + h, x0:x0 + w] = colors[c][:, None, None]
            owner[y0:y0 + h, x0:x0 + w] = k
            classes.append(c)
        masks = torch.stack([owner == k for k in range(len(classes))])
        keep = masks.flatten(1).sum(1) >= 16
        masks, classes = masks[keep], torch.tensor(classes)[keep]
        inst = Instances((size, size))
        inst.gt_masks = BitMasks(masks)
        inst.gt_boxes = inst.gt_masks.get_bounding_boxes()
        inst.gt_classes = classes
        inputs.append({"image": img, "instances": inst, "height": size, "width": size, "image_id": i})
        annos = []
        for m, b, c in zip(masks, inst.gt_boxes.tensor.tolist(), classes.tolist()):
            rle = mask_util.encode(np.asfortranarray(m.numpy().astype(np.uint8)))
            rle["counts"] = rle["counts"].decode("ascii")
            annos.append({"bbox": b, "bbox_mode": BoxMode.XYXY_ABS, "category_id": c, "iscrowd": 0, "segmentation": rle})
        dicts.append({"file_name": f"inst{i}.png", "image_id": i, "height": size, "width": size, "annotations": annos})
    return inputs, dicts


def test_tiny_co_dino_inst_overfits_masks(tmp_path, one_thread):
    """Learning check of the mask branch: a tiny Co-DINO-Inst overfits 4 images to segm AP50 >= 80 (COCOEvaluator,
    masks ranked by their mask scores)."""
    import time

    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.utils.events import EventStorage

    from codetr.evaluation import build_detection_evaluator

    torch.manual_seed(0)
    inputs, dicts = _overfit_data()
    name = "codetr_test_inst_overfit"
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    DatasetCatalog.register(name, lambda: dicts)
    MetadataCatalog.get(name).set(thing_classes=["red", "green", "blue"])
    evaluator = build_detection_evaluator(name, max_dets_per_image=100, output_dir=str(tmp_path), distributed=False,
                                          tasks=("bbox", "segm"))
    model = tiny_model(num_queries=15, num_dn_queries=10, embed_dim=32, width=16)
    model.mask_branch = _branch(dim=32)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    test_inputs = [{k: v for k, v in x.items() if k != "instances"} for x in inputs]
    history, t0 = [], time.time()
    with EventStorage():
        for it in range(1, 201):
            model.train()
            losses = model(inputs)
            loss = sum(losses.values())
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            if it >= 60 and it % 20 == 0:
                model.eval()
                evaluator.reset()
                with torch.no_grad():
                    evaluator.process(test_inputs, model(test_inputs))
                res = evaluator.evaluate()
                history.append((it, round(res["bbox"]["AP50"], 1), round(res["segm"]["AP50"], 1),
                                round(res["segm"]["AP"], 1)))
                if res["segm"]["AP50"] >= 80:
                    break
    print(f"\ntiny Co-DINO-Inst overfit (iteration, bbox AP50, segm AP50, segm AP): {history}; "
          f"wall {time.time() - t0:.0f} s")
    assert history[-1][2] >= 80, history
