"""Data pipeline: synthetic dataset, box-only mapper, DETR/LSJ augmentations, clear errors on bad input."""
import json
import os
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import pipeline_utils  # noqa: E402,F401  (sets CODETR_SYNTHETIC_ROOT)

import detectron2.data.transforms as T  # noqa: E402
from detectron2.data import DatasetCatalog, MetadataCatalog  # noqa: E402

from codetr.data import (  # noqa: E402
    DetrDatasetMapper,
    check_num_classes,
    detr_train_augmentation,
    ensure_synthetic_dataset,
    generate_synthetic_coco,
    get_detection_dataset_dicts,
    lsj_train_augmentation,
    register_synthetic_dataset,
)


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("synth"))
    names = register_synthetic_dataset("datatest_synth", root=root, num_train=40, num_val=8, num_classes=8,
                                       image_size=(64, 96), seed=11)
    return root, names


def test_synthetic_dataset_properties(synth, tmp_path):
    root, (train, val) = synth
    folder = ensure_synthetic_dataset(root, num_train=40, num_val=8, num_classes=8, image_size=(64, 96), seed=11)
    coco = json.load(open(os.path.join(folder, "train.json")))
    assert [c["id"] for c in coco["categories"]] == list(range(1, 9))
    assert len({c["name"] for c in coco["categories"]}) == 8
    per_image = {im["id"]: 0 for im in coco["images"]}
    sizes = {im["id"]: (im["height"], im["width"]) for im in coco["images"]}
    areas = []
    for a in coco["annotations"]:
        per_image[a["image_id"]] += 1
        x, y, w, h = a["bbox"]
        H, W = sizes[a["image_id"]]
        assert 0 <= x and 0 <= y and x + w <= W and y + h <= H and w > 0 and h > 0
        assert a["area"] <= w * h + 1e-6  # visible pixels inside the tight visible box
        areas.append(a["area"] / (H * W))
    counts = np.array(list(per_image.values()))
    assert (counts == 0).any() and counts.max() >= 15  # empty and crowded images
    assert min(areas) < 0.01 and max(areas) > 0.15  # tiny to large objects
    # the images on disk have the sizes the json states
    import cv2

    im = coco["images"][0]
    assert cv2.imread(os.path.join(folder, "train", im["file_name"])).shape[:2] == (im["height"], im["width"])
    # deterministic: the same parameters give the same annotations
    again = json.load(open(generate_synthetic_coco(str(tmp_path), 40, num_classes=8, image_size=(64, 96), seed=11)))
    assert again["annotations"] == coco["annotations"]


def test_registered_and_empty_images_filtered_in_training(synth):
    root, (train, val) = synth
    folder = ensure_synthetic_dataset(root, num_train=40, num_val=8, num_classes=8, image_size=(64, 96), seed=11)
    coco = json.load(open(os.path.join(folder, "train.json")))
    with_boxes = {a["image_id"] for a in coco["annotations"]}
    assert len(get_detection_dataset_dicts(train, filter_empty=True)) == len(with_boxes)
    assert len(get_detection_dataset_dicts(train, filter_empty=False)) == 40
    meta = MetadataCatalog.get(train)
    assert meta.evaluator_type == "coco" and len(meta.thing_classes) == 8


def test_mapper_flip_and_resize_boxes_by_hand(tmp_path):
    import cv2

    img = np.zeros((40, 60, 3), np.uint8)
    img[:, :, 2] = 200  # red in BGR
    path = str(tmp_path / "a.png")
    cv2.imwrite(path, img)
    d = {"file_name": path, "height": 40, "width": 60, "image_id": 1, "annotations": [
        {"bbox": [10, 5, 20, 10], "bbox_mode": 1, "category_id": 3, "iscrowd": 0, "segmentation": [[0, 0, 1, 1, 1, 0]]},
        {"bbox": [0, 0, 5, 5], "bbox_mode": 1, "category_id": 1, "iscrowd": 1},
    ]}
    # XYWH_ABS bbox_mode is 1; flip then resize x2
    mapper = DetrDatasetMapper(True, [T.RandomFlip(prob=1.0), T.Resize((80, 120))], image_format="RGB")
    out = mapper(d)
    assert out["image"].shape == (3, 80, 120) and out["image"].dtype == torch.uint8
    assert int(out["image"][0, 0, 0]) == 200  # RGB: red first
    inst = out["instances"]
    assert len(inst) == 1  # the crowd box is dropped
    # box (10, 5)-(30, 15) flipped in width 60 -> (30, 5)-(50, 15), then x2
    torch.testing.assert_close(inst.gt_boxes.tensor, torch.tensor([[60.0, 10.0, 100.0, 30.0]]))
    assert inst.gt_classes.tolist() == [3]
    assert not inst.has("gt_masks")
    test_out = DetrDatasetMapper(False, [T.Resize((80, 120))])(d)
    assert "instances" not in test_out and "annotations" not in test_out


def test_mapper_names_corrupt_image(tmp_path):
    path = tmp_path / "broken.jpg"
    path.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    d = {"file_name": str(path), "height": 10, "width": 10, "image_id": 1, "annotations": []}
    with pytest.raises(ValueError, match="broken.jpg"):
        DetrDatasetMapper(True, [])(d)


def test_detr_augmentation_sizes_and_both_branches():
    np.random.seed(0)
    augs = T.AugmentationList(detr_train_augmentation())
    img = np.zeros((480, 640, 3), np.uint8)
    shorts, cropped = set(), 0
    for _ in range(60):
        inp = T.AugInput(img.copy())
        augs(inp)
        h, w = inp.image.shape[:2]
        assert max(h, w) <= 1333
        short = min(h, w)
        # a resize to a listed short side, unless the long side cap kicked in
        assert short in range(480, 801, 32) or max(h, w) in (1332, 1333), (h, w)
        shorts.add(short)
        if abs(w / h - 640 / 480) > 0.02:  # crop branch changes the aspect ratio
            cropped += 1
    assert len(shorts) >= 5 and 10 <= cropped <= 50


def test_lsj_output_size_and_pad_value():
    np.random.seed(1)
    augs = T.AugmentationList(lsj_train_augmentation(image_size=64, min_scale=0.1, max_scale=0.5))
    img = np.full((50, 80, 3), 7, np.uint8)
    inp = T.AugInput(img)
    augs(inp)
    out = inp.image
    assert out.shape[:2] == (64, 64)
    assert (out[-1, -1] == 114).all()  # scaled to <= 0.5 of 64: the bottom-right is padding


def test_bad_dataset_inputs(tmp_path):
    with pytest.raises(ValueError, match="coco_2017_trian"):
        get_detection_dataset_dicts("coco_2017_trian")
    from detectron2.data.datasets import register_coco_instances

    bad = tmp_path / "bad.json"
    bad.write_text('{"images": [')
    register_coco_instances("datatest_corrupt", {}, str(bad), str(tmp_path))
    with pytest.raises(ValueError, match="bad.json"):
        get_detection_dataset_dicts("datatest_corrupt")
    register_coco_instances("datatest_missing", {}, str(tmp_path / "nope.json"), str(tmp_path))
    with pytest.raises(FileNotFoundError, match="nope.json"):
        get_detection_dataset_dicts("datatest_missing")


def test_num_classes_mismatch_is_named(synth):
    _, (train, _) = synth
    check_num_classes(8, train)
    with pytest.raises(ValueError, match="num_classes=80.*8 classes"):
        check_num_classes(80, train)
