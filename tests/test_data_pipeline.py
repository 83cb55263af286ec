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


def _make_image_whole_image_reference(rng, class_names, image_size, max_objects):
    """The generator as first written: every per-shape step on the whole image (reference for the windowed one)."""
    import cv2
    import pycocotools.mask as mask_util

    from codetr.data.synthetic import COLORS, _background, _shape_mask

    h = int(rng.integers(image_size[0], image_size[1] + 1))
    w = int(rng.integers(image_size[0], image_size[1] + 1))
    img = _background(rng, h, w)
    u = rng.random()
    n = 0 if u < 0.05 else int(rng.integers(15, max_objects + 1)) if u < 0.25 else int(rng.integers(1, 9))
    owner = np.full((h, w), -1, np.int32)
    full_area, labels = [], []
    for i in range(n):
        cls = int(rng.integers(len(class_names)))
        color_name, shape = class_names[cls].split(" ")
        size = float(np.exp(rng.uniform(np.log(6), np.log(0.7 * min(h, w)))))
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)
        mask = _shape_mask(shape, h, w, cx, cy, size, float(rng.uniform(0, 360)))
        if mask.sum() < 9:
            full_area.append(0)
            labels.append(cls)
            continue
        color = np.array(COLORS[color_name], np.float32) * rng.uniform(0.85, 1.1)
        shade = rng.normal(0, 8, size=(h, w, 1)).astype(np.float32)
        img[mask] = np.clip(color + shade[mask], 0, 255)
        edge = mask & ~cv2.erode(mask.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
        img[edge] *= 0.45
        owner[mask] = i
        full_area.append(int(mask.sum()))
        labels.append(cls)
    annos = []
    for i in range(n):
        if full_area[i] == 0:
            continue
        ys, xs = np.nonzero(owner == i)
        if len(xs) < 0.25 * full_area[i] or len(xs) < 4:
            continue
        rle = mask_util.encode(np.asfortranarray(owner == i, dtype=np.uint8))
        annos.append(
            {"bbox": [float(xs.min()), float(ys.min()), float(xs.max() + 1 - xs.min()), float(ys.max() + 1 - ys.min())],
             "category_id": labels[i] + 1, "area": float(len(xs)), "iscrowd": 0,
             "segmentation": {"size": [h, w], "counts": rle["counts"].decode("ascii")}}
        )
    return np.clip(img, 0, 255).astype(np.uint8), annos


def test_windowed_generator_equals_the_whole_image_one():
    """_make_image works on each shape's bounding window (2x faster generation): the same pixels, boxes, areas and
    RLE masks as the whole-image computation, image by image, with the random stream in step (small images: many
    shapes touch the border, where the erosion's border handling matters)."""
    from codetr.data.synthetic import _make_image, synthetic_class_names

    names = synthetic_class_names(20)
    for image_size, seed in (((24, 40), 0), ((64, 96), 1), ((224, 320), 2)):
        rng_a, rng_b = np.random.default_rng(seed), np.random.default_rng(seed)
        n_objects = 0
        for _ in range(25 if image_size[0] < 200 else 6):
            img_a, annos_a = _make_image(rng_a, names, image_size, 40)
            img_b, annos_b = _make_image_whole_image_reference(rng_b, names, image_size, 40)
            assert np.array_equal(img_a, img_b) and annos_a == annos_b
            n_objects += len(annos_a)
        assert n_objects > 20
