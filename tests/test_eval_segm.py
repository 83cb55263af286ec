"""Mask evaluation: segm AP from build_detection_evaluator equals pycocotools / lvis run directly on the same
predictions; the detection limit applies to masks too (LVIS 1000); a model without masks is refused."""
import copy
import os
import sys

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import pipeline_utils  # noqa: E402,F401

from detectron2.data import DatasetCatalog, MetadataCatalog  # noqa: E402
from detectron2.data.datasets import register_coco_instances  # noqa: E402
from detectron2.structures import Boxes, Instances  # noqa: E402
from pycocotools.coco import COCO  # noqa: E402
from pycocotools.cocoeval import COCOeval  # noqa: E402

from codetr.data import generate_synthetic_coco  # noqa: E402
from codetr.evaluation import build_detection_evaluator, lvis_numpy_compat  # noqa: E402


@pytest.fixture(scope="module")
def gt(tmp_path_factory):
    """A few synthetic images with exact RLE instance masks (the embedded dataset's generator)."""
    folder = str(tmp_path_factory.mktemp("segm_gt"))
    path = generate_synthetic_coco(folder, 4, num_classes=3, image_size=(64, 80), seed=5, split="val")
    coco = COCO(path)
    assert len(coco.getAnnIds()) >= 8
    return path, coco


def _predictions(coco, n_noise, rng):
    """Per image: each GT mask slightly damaged (a random pixel subset of its box edge removed or added) with a
    random score, then ``n_noise`` false masks; masks as (H, W) bool arrays, plus their pycocotools results."""
    per_image, results = {}, []
    cats = sorted(coco.getCatIds())
    for img_id in sorted(coco.getImgIds()):
        info = coco.loadImgs(img_id)[0]
        h, w = info["height"], info["width"]
        masks, scores, classes = [], [], []
        for ann in coco.loadAnns(coco.getAnnIds(imgIds=img_id)):
            m = coco.annToMask(ann).astype(bool)
            if rng.random() < 0.5:  # shift by a pixel or two
                m = np.roll(m, int(rng.integers(1, 3)), axis=int(rng.integers(0, 2)))
            else:  # grow by a random dilation
                import cv2

                m = cv2.dilate(m.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
            masks.append(m)
            scores.append(float(rng.uniform(0.2, 0.9)))
            classes.append(cats.index(ann["category_id"]) if rng.random() < 0.85 else int(rng.integers(len(cats))))
        for _ in range(n_noise):
            m = np.zeros((h, w), bool)
            y, x = rng.integers(0, h - 6), rng.integers(0, w - 6)
            m[y:y + 6, x:x + 6] = True
            masks.append(m)
            scores.append(float(rng.uniform(0.9, 1.0)) if n_noise > 100 else float(rng.uniform(0.0, 0.5)))
            classes.append(int(rng.integers(len(cats))))
        per_image[img_id] = (masks, scores, classes)
        for m, s, c in zip(masks, scores, classes):
            rle = mask_util.encode(np.asfortranarray(m.astype(np.uint8)))
            ys, xs = np.nonzero(m)
            results.append({"image_id": img_id, "category_id": cats[c], "score": s, "segmentation": rle,
                            "bbox": [float(xs.min()), float(ys.min()), float(np.ptp(xs) + 1), float(np.ptp(ys) + 1)]})
    return per_image, results


def _feed(ev, per_image, with_masks=True, mask_scores=None):
    ev.reset()
    for img_id, (masks, scores, classes) in per_image.items():
        h, w = masks[0].shape
        inst = Instances((h, w))
        m = torch.as_tensor(np.stack(masks))
        inst.pred_masks = m
        inst.pred_boxes = Boxes(torch.as_tensor(
            [[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1] for ys, xs in (np.nonzero(x) for x in masks)],
            dtype=torch.float32))
        inst.scores = torch.tensor(scores)
        inst.pred_classes = torch.tensor(classes, dtype=torch.int64)
        if not with_masks:
            inst.remove("pred_masks")
        if mask_scores is not None:
            inst.mask_scores = torch.tensor(mask_scores[img_id])
        ev.process([{"image_id": img_id}], [{"instances": inst}])


def _pycocotools(coco, results, iou_type, max_dets):
    dt = coco.loadRes(copy.deepcopy(results))
    ev = COCOeval(coco, dt, iou_type)
    ev.params.maxDets = [1, 10, max_dets]
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    return 100.0 * ev.stats[0], 100.0 * ev.stats[1]


def test_coco_segm_ap_equals_pycocotools(gt):
    path, coco = gt
    register_coco_instances("segmtest_coco", {}, path, os.path.dirname(path))
    DatasetCatalog.get("segmtest_coco")  # sets the category-id mapping
    per_image, results = _predictions(coco, n_noise=5, rng=np.random.default_rng(0))
    ev = build_detection_evaluator("segmtest_coco", max_dets_per_image=100, distributed=False,
                                   tasks=("bbox", "segm"))
    _feed(ev, per_image)
    res = ev.evaluate()
    for task in ("segm", "bbox"):
        ap, ap50 = _pycocotools(coco, results, task, 100)
        assert res[task]["AP"] == pytest.approx(ap, abs=1e-6) and res[task]["AP50"] == pytest.approx(ap50, abs=1e-6)
    assert 5 < res["segm"]["AP"] < 95 and res["segm"]["AP"] != pytest.approx(res["bbox"]["AP"], abs=1e-3)

    # a model without masks is refused rather than scored on box-shaped masks
    with pytest.raises(ValueError, match="pred_masks"):
        _feed(ev, per_image, with_masks=False)
    with pytest.raises(ValueError, match="tasks"):
        build_detection_evaluator("segmtest_coco", tasks=("bbox", "keypoints"))
    # the default stays box-only
    ev = build_detection_evaluator("segmtest_coco", max_dets_per_image=100, distributed=False)
    _feed(ev, per_image, with_masks=False)
    assert set(ev.evaluate()) == {"bbox"}


def test_lvis_segm_ap_equals_lvis_at_1000_dets(gt, tmp_path, np_float):
    lvis = pytest.importorskip("lvis")
    import json

    path, coco = gt
    data = json.load(open(path))
    for im in data["images"]:
        im.update({"neg_category_ids": [], "not_exhaustive_category_ids": [], "coco_url": f"x/{im['file_name']}"})
    for c in data["categories"]:
        n = sum(a["category_id"] == c["id"] for a in data["annotations"])
        c.update({"frequency": "f", "synset": f"c{c['id']}.n.01", "image_count": 4, "instance_count": n})
    lvis_path = str(tmp_path / "lvis_gt.json")
    json.dump(data, open(lvis_path, "w"))
    DatasetCatalog.register("segmtest_lvis", lambda: [])
    MetadataCatalog.get("segmtest_lvis").set(json_file=lvis_path, evaluator_type="lvis",
                                             thing_classes=[c["name"] for c in data["categories"]])
    # 400 high-scoring false masks per image: the true ones rank > 300, inside 1000
    per_image, results = _predictions(coco, n_noise=400, rng=np.random.default_rng(1))
    gt_lvis = lvis.LVIS(lvis_path)
    aps = {}
    for max_dets in (300, 1000):
        ev = build_detection_evaluator("segmtest_lvis", max_dets_per_image=max_dets, distributed=False,
                                       tasks=("segm",))
        _feed(ev, per_image)
        res = ev.evaluate()
        assert set(res) == {"segm"}
        ref_results = [{k: v for k, v in r.items() if k != "bbox"} for r in copy.deepcopy(results)]
        for r in ref_results:
            r["segmentation"]["counts"] = r["segmentation"]["counts"].decode("ascii")
        ref = lvis.LVISEval(gt_lvis, lvis.LVISResults(gt_lvis, ref_results, max_dets=max_dets), "segm")
        ref.run()
        assert res["segm"]["AP"] == pytest.approx(100 * ref.results["AP"], abs=1e-6)
        aps[max_dets] = res["segm"]["AP"]
    assert aps[300] == pytest.approx(0.0, abs=1e-6) and aps[1000] > 0.1  # lost at 300, found at 1000


def test_masks_ranked_by_mask_scores_boxes_by_box_scores(gt, tmp_path):
    """With ``mask_scores`` (Co-DINO-Inst: IoU x box score) segm AP ranks by them, bbox AP by ``scores``."""
    path, coco = gt
    if "segmtest_coco" not in DatasetCatalog.list():
        register_coco_instances("segmtest_coco", {}, path, os.path.dirname(path))
    DatasetCatalog.get("segmtest_coco")
    rng = np.random.default_rng(2)
    per_image, results = _predictions(coco, n_noise=5, rng=rng)
    mask_scores = {i: list(rng.uniform(0, 1, len(v[1]))) for i, v in per_image.items()}
    ev = build_detection_evaluator("segmtest_coco", max_dets_per_image=100, distributed=False,
                                   tasks=("bbox", "segm"), output_dir=str(tmp_path))
    _feed(ev, per_image, mask_scores=mask_scores)
    res = ev.evaluate()
    flat_mask_scores = [s for i in sorted(per_image) for s in mask_scores[i]]
    seg_results = [dict(r, score=s) for r, s in zip(results, flat_mask_scores)]
    assert res["segm"]["AP"] == pytest.approx(_pycocotools(coco, seg_results, "segm", 100)[0], abs=1e-6)
    assert res["bbox"]["AP"] == pytest.approx(_pycocotools(coco, results, "bbox", 100)[0], abs=1e-6)
    assert res["segm"]["AP"] != pytest.approx(_pycocotools(coco, results, "segm", 100)[0], abs=1e-3)
    # predictions written per task: boxes at the top, masks under segm/
    assert os.path.isfile(tmp_path / "coco_instances_results.json")
    assert os.path.isfile(tmp_path / "segm" / "coco_instances_results.json")


@pytest.fixture
def np_float():
    """np.float for the lvis package's own evaluator, used here as the reference (scoped to the test)."""
    with lvis_numpy_compat():
        yield
