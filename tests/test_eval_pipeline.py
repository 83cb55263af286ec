"""Evaluation: AP read from COCOEvaluator after a short training run equals pycocotools on the same predictions;
max detections per image is honoured (COCO 300, LVIS 300/1000)."""
import copy
import json
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import pipeline_utils as pu  # noqa: E402

from pycocotools.coco import COCO  # noqa: E402
from pycocotools.cocoeval import COCOeval  # noqa: E402

from codetr.evaluation import build_detection_evaluator  # noqa: E402
from codetr.evaluation.evaluator import lvis_numpy_compat  # noqa: E402


def _pycocotools_ap(gt_json, results, max_dets):
    gt = COCO(gt_json)
    dt = gt.loadRes(copy.deepcopy(results))
    ev = COCOeval(gt, dt, "bbox")
    ev.params.maxDets = [1, 10, max_dets]
    ev.evaluate()
    ev.accumulate()
    # AP@[.5:.95], all areas, at the largest maxDets (index -1)
    p = ev.eval["precision"][:, :, :, 0, -1]
    return 100.0 * float(np.mean(p[p > -1])) if (p > -1).any() else float("nan")


def test_short_training_then_coco_ap_equals_pycocotools(tmp_path):
    script = pu.load_train_script()
    out = str(tmp_path / "run")
    args = script.build_argument_parser().parse_args(
        ["--config-file", pu.TINY_CONFIG, f"train.output_dir={out}", "train.max_iter=4"]
    )
    results = script.main(args)
    ap = results["bbox"]["AP"]
    pred_file = os.path.join(out, "inference", "coco_instances_results.json")
    preds = json.load(open(pred_file))
    assert len(preds) > 0
    from detectron2.data import MetadataCatalog

    gt_json = MetadataCatalog.get("tinysynth_val").json_file
    ref = _pycocotools_ap(gt_json, preds, max_dets=10)
    assert ap == pytest.approx(ref, abs=1e-6)
    # --eval-only on the final checkpoint reproduces the number
    args = script.build_argument_parser().parse_args(
        ["--config-file", pu.TINY_CONFIG, "--eval-only", f"train.output_dir={out}",
         f"train.init_checkpoint={os.path.join(out, 'model_final.pth')}"]
    )
    assert script.main(args)["bbox"]["AP"] == pytest.approx(ap, abs=1e-9)

    # tools/demo.py on a folder of images and on a short video, with the trained checkpoint
    import importlib.util

    import cv2

    spec = importlib.util.spec_from_file_location("codetr_demo", os.path.join(pu.ROOT, "tools", "demo.py"))
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    image_root = MetadataCatalog.get("tinysynth_val").image_root
    ckpt = os.path.join(out, "model_final.pth")
    vis_dir = str(tmp_path / "vis")
    demo.main(["--config-file", pu.TINY_CONFIG, "--checkpoint", ckpt, "--input", image_root, "--output", vis_dir,
               "--score-threshold", "0.0", "--device", "cpu"])
    inputs = sorted(os.listdir(image_root))
    assert sorted(os.listdir(vis_dir)) == sorted(os.path.splitext(f)[0] + ".jpg" for f in inputs)
    src = cv2.imread(os.path.join(image_root, inputs[0]))
    vis = cv2.imread(os.path.join(vis_dir, os.path.splitext(inputs[0])[0] + ".jpg"))
    assert vis.shape == src.shape and np.abs(vis.astype(int) - src.astype(int)).max() > 50  # boxes drawn
    video = str(tmp_path / "clip.avi")
    w = cv2.VideoWriter(video, cv2.VideoWriter_fourcc(*"MJPG"), 5, (src.shape[1], src.shape[0]))
    for _ in range(3):
        w.write(src)
    w.release()
    demo.main(["--config-file", pu.TINY_CONFIG, "--checkpoint", ckpt, "--video-input", video,
               "--output", str(tmp_path / "vid"), "--device", "cpu"])
    cap = cv2.VideoCapture(str(tmp_path / "vid" / "clip.mp4"))
    assert int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) == 3
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        demo.main(["--config-file", pu.TINY_CONFIG, "--checkpoint", "missing.pth", "--input", image_root,
                   "--output", vis_dir])


def _synthetic_gt(tmp_path, n_images=3, n_gt=4):
    rng = np.random.default_rng(0)
    images, anns = [], []
    for i in range(1, n_images + 1):
        images.append({"id": i, "file_name": f"{i}.jpg", "height": 200, "width": 200})
        for _ in range(n_gt):
            x, y = rng.uniform(0, 150, 2)
            anns.append({"id": len(anns) + 1, "image_id": i, "bbox": [x, y, 40.0, 40.0], "area": 1600.0,
                         "iscrowd": 0, "category_id": 1})
    gt = {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "thing"}]}
    path = str(tmp_path / "gt.json")
    json.dump(gt, open(path, "w"))
    return path, gt


def _predictions_with_true_boxes_ranked_low(gt, n_noise=150):
    """Per image: n_noise false boxes with high scores, then the true boxes with low scores (rank > 100)."""
    preds = []
    for im in gt["images"]:
        for k in range(n_noise):
            preds.append({"image_id": im["id"], "category_id": 1, "bbox": [0.0, 0.0, 3.0, 3.0],
                          "score": 0.9 - k * 1e-4})
        for a in gt["annotations"]:
            if a["image_id"] == im["id"]:
                preds.append({"image_id": im["id"], "category_id": 1, "bbox": a["bbox"], "score": 0.1})
    return preds


def _feed(ev, gt, preds):
    """Give the evaluator the predictions as model outputs (Instances, XYXY boxes, class 0 = category 1)."""
    import torch
    from detectron2.structures import Boxes, Instances

    ev.reset()
    for im in gt["images"]:
        mine = [p for p in preds if p["image_id"] == im["id"]]
        inst = Instances((200, 200))
        b = torch.tensor([p["bbox"] for p in mine])
        inst.pred_boxes = Boxes(torch.cat([b[:, :2], b[:, :2] + b[:, 2:]], 1))
        inst.scores = torch.tensor([p["score"] for p in mine])
        inst.pred_classes = torch.zeros(len(mine), dtype=torch.int64)
        ev.process([{"image_id": im["id"]}], [{"instances": inst}])


def test_coco_evaluator_counts_300_detections(tmp_path):
    from detectron2.data.datasets import register_coco_instances

    gt_path, gt = _synthetic_gt(tmp_path)
    register_coco_instances("evaltest_coco", {}, gt_path, str(tmp_path))
    preds = _predictions_with_true_boxes_ranked_low(gt)
    aps = {}
    for max_dets in (100, 300):
        ev = build_detection_evaluator("evaltest_coco", max_dets_per_image=max_dets, distributed=False)
        _feed(ev, gt, preds)
        aps[max_dets] = ev.evaluate()["bbox"]["AP"]
        assert aps[max_dets] == pytest.approx(_pycocotools_ap(gt_path, preds, max_dets), abs=1e-4)
    assert aps[100] == pytest.approx(0.0, abs=1e-6)  # the true boxes rank 151..154: lost at 100
    assert aps[300] > 1.0  # found at 300 (after 150 false positives, hence the low precision)


def test_lvis_max_dets_set_by_one_value(tmp_path, np_float):
    lvis = pytest.importorskip("lvis")
    from detectron2.data import DatasetCatalog, MetadataCatalog

    gt_path, gt = _synthetic_gt(tmp_path)
    for im in gt["images"]:
        im.update({"neg_category_ids": [], "not_exhaustive_category_ids": [], "coco_url": f"x/{im['file_name']}"})
    gt["categories"] = [{"id": 1, "name": "thing", "frequency": "f", "synset": "thing.n.01", "image_count": 3,
                         "instance_count": 12}]
    json.dump(gt, open(gt_path, "w"))
    DatasetCatalog.register("evaltest_lvis", lambda: [])
    MetadataCatalog.get("evaltest_lvis").set(json_file=gt_path, evaluator_type="lvis", thing_classes=["thing"])
    preds = _predictions_with_true_boxes_ranked_low(gt, n_noise=500)
    gt_lvis = lvis.LVIS(gt_path)
    results = {}
    for max_dets in (300, 1000):
        ev = build_detection_evaluator("evaltest_lvis", max_dets_per_image=max_dets, distributed=False)
        _feed(ev, gt, preds)
        res = ev.evaluate()["bbox"]
        # independent reference: lvis' own evaluator at the same limit on the same predictions
        ref = lvis.LVISEval(gt_lvis, lvis.LVISResults(gt_lvis, copy.deepcopy(preds), max_dets=max_dets), "bbox")
        ref.run()
        assert res["AP"] == pytest.approx(100 * ref.results["AP"], abs=1e-6)
        results[max_dets] = res["AP"]
    assert results[300] == pytest.approx(0.0, abs=1e-6) and results[1000] > 0.1


def test_evaluator_rejects_bad_values():
    with pytest.raises(ValueError, match="not registered"):
        build_detection_evaluator("no_such_dataset_xyz")
    with pytest.raises(ValueError, match="max_dets_per_image"):
        build_detection_evaluator("coco_2017_val", max_dets_per_image=0)


@pytest.fixture
def np_float():
    """np.float for the lvis package's own evaluator, used here as the reference (scoped to the test)."""
    with lvis_numpy_compat():
        yield


def test_np_float_alias_is_scoped_to_the_lvis_calls():
    import numpy as np

    assert "float" not in np.__dict__
    with lvis_numpy_compat():
        assert np.float is float
    assert "float" not in np.__dict__
