"""Instance masks through the data path: mapper mask targets (hand-built fixtures), copy-paste, synthetic masks."""
import json
import os
import sys

import cv2
import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import pipeline_utils  # noqa: E402,F401  (sets CODETR_SYNTHETIC_ROOT)

import detectron2.data.transforms as T  # noqa: E402
from detectron2.structures import BitMasks, Boxes, Instances, PolygonMasks  # noqa: E402

from codetr.data import (  # noqa: E402
    CopyPasteDataset,
    DetrDatasetMapper,
    ensure_synthetic_dataset,
    get_detection_dataset_dicts,
    lsj_train_augmentation,
    paste_instances,
    register_synthetic_dataset,
)


def _image_file(tmp_path, h=40, w=60):
    path = str(tmp_path / "a.png")
    cv2.imwrite(path, np.full((h, w, 3), 50, np.uint8))
    return path


def _rle(mask):
    rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": list(mask.shape), "counts": rle["counts"].decode("ascii")}


def test_mapper_polygon_masks_flip_resize_by_hand(tmp_path):
    # a right triangle (10, 5), (30, 5), (10, 15) in a 40 x 60 image; its box given deliberately too large
    d = {"file_name": _image_file(tmp_path), "height": 40, "width": 60, "image_id": 1, "annotations": [
        {"bbox": [8, 3, 25, 14], "bbox_mode": 1, "category_id": 2, "iscrowd": 0,
         "segmentation": [[10, 5, 30, 5, 10, 15]]},
        {"bbox": [0, 0, 5, 5], "bbox_mode": 1, "category_id": 1, "iscrowd": 1, "segmentation": [[0, 0, 4, 0, 0, 4]]},
    ]}
    augs = [T.RandomFlip(prob=1.0), T.Resize((80, 120))]
    inst = DetrDatasetMapper(True, augs, use_instance_mask=True)(d)["instances"]
    assert len(inst) == 1 and inst.gt_classes.tolist() == [2]  # the crowd object is dropped
    assert isinstance(inst.gt_masks, PolygonMasks)
    # flipped in width 60: x -> 60 - x; then x2 in both directions
    expected = np.array([100, 10, 60, 10, 100, 30], np.float64)
    np.testing.assert_allclose(inst.gt_masks.polygons[0][0], expected)
    # without recompute_boxes the (too large) annotated box is only transformed: (8, 3)-(33, 17) -> (27, 3)-(52, 17)
    torch.testing.assert_close(inst.gt_boxes.tensor, torch.tensor([[54.0, 6.0, 104.0, 34.0]]))

    rec = DetrDatasetMapper(True, augs, use_instance_mask=True, recompute_boxes=True)(d)["instances"]
    torch.testing.assert_close(rec.gt_boxes.tensor, torch.tensor([[60.0, 10.0, 100.0, 30.0]]))

    bit = DetrDatasetMapper(True, augs, use_instance_mask=True, instance_mask_format="bitmask",
                            recompute_boxes=True)(d)["instances"]
    m = bit.gt_masks.tensor[0].numpy()
    assert m.shape == (80, 120) and m.dtype == bool
    # rasterised triangle of legs 40 x 20: area 400 up to the boundary pixels; its tight box
    assert abs(int(m.sum()) - 400) <= 40
    ys, xs = np.nonzero(m)
    torch.testing.assert_close(bit.gt_boxes.tensor, torch.tensor([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]], dtype=torch.float32))
    assert 59 <= xs.min() <= 61 and xs.max() + 1 in (100, 101) and ys.min() in (9, 10, 11) and 29 <= ys.max() + 1 <= 31
    assert m[12, 97] and not m[28, 62]  # inside near the right angle (x=100, y=10); outside across the hypotenuse


def test_mapper_rle_crop_recomputes_box_and_drops_cropped_away(tmp_path):
    mask_a = np.zeros((40, 60), bool)
    mask_a[10:20, 5:25] = True  # rows 10..19, cols 5..24
    mask_b = np.zeros((40, 60), bool)
    mask_b[30:35, 0:6] = True  # entirely left of the crop
    d = {"file_name": _image_file(tmp_path), "height": 40, "width": 60, "image_id": 1, "annotations": [
        {"bbox": [5, 10, 20, 10], "bbox_mode": 1, "category_id": 0, "iscrowd": 0, "segmentation": _rle(mask_a)},
        {"bbox": [0, 30, 6, 5], "bbox_mode": 1, "category_id": 1, "iscrowd": 0, "segmentation": _rle(mask_b)},
    ]}
    crop = [T.CropTransform(10, 0, 30, 40)]  # x0=10, y0=0, w=30, h=40
    out = DetrDatasetMapper(True, crop, use_instance_mask=True, instance_mask_format="bitmask",
                            recompute_boxes=True)(d)
    inst = out["instances"]
    assert out["image"].shape == (3, 40, 30)
    assert inst.gt_classes.tolist() == [0]  # b is cropped away
    # a: cols 5..24 -> 0..14 in the crop, rows 10..19
    torch.testing.assert_close(inst.gt_boxes.tensor, torch.tensor([[0.0, 10.0, 15.0, 20.0]]))
    expected = np.zeros((40, 30), bool)
    expected[10:20, 0:15] = True
    assert np.array_equal(inst.gt_masks.tensor[0].numpy(), expected)
    with pytest.raises(ValueError, match="bitmask"):  # RLE can't be kept as polygons
        DetrDatasetMapper(True, crop, use_instance_mask=True)(d)


def test_mapper_mask_options_and_errors(tmp_path):
    d = {"file_name": _image_file(tmp_path), "height": 40, "width": 60, "image_id": 1, "annotations": []}
    empty = DetrDatasetMapper(True, [], use_instance_mask=True, instance_mask_format="bitmask")(d)["instances"]
    assert len(empty) == 0 and empty.gt_masks.tensor.shape == (0, 40, 60)
    with pytest.raises(ValueError, match="recompute_boxes"):
        DetrDatasetMapper(True, [], recompute_boxes=True)
    with pytest.raises(ValueError, match="instance_mask_format"):
        DetrDatasetMapper(True, [], use_instance_mask=True, instance_mask_format="rle")
    d["annotations"] = [{"bbox": [1, 1, 5, 5], "bbox_mode": 1, "category_id": 0, "iscrowd": 0}]
    with pytest.raises(ValueError, match="no 'segmentation'"):
        DetrDatasetMapper(True, [], use_instance_mask=True)(d)
    # box-only (default): segmentations are ignored
    d["annotations"][0]["segmentation"] = [[1, 1, 5, 1, 1, 5]]
    assert not DetrDatasetMapper(True, [])(d)["instances"].has("gt_masks")


def _instances(size, masks, classes, boxes=None):
    inst = Instances(size)
    m = torch.as_tensor(np.stack(masks)) if masks else torch.zeros((0, *size), dtype=torch.bool)
    inst.gt_masks = BitMasks(m)
    inst.gt_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32)) if boxes is not None else \
        inst.gt_masks.get_bounding_boxes()
    inst.gt_classes = torch.tensor(classes, dtype=torch.int64)
    return inst


def _rect(size, y0, y1, x0, x1):
    m = np.zeros(size, bool)
    m[y0:y1, x0:x1] = True
    return m


def test_paste_instances_hand_fixture():
    size = (100, 100)
    dst_masks = [
        _rect(size, 10, 20, 10, 20),  # 0: fully covered by the paste -> dropped
        _rect(size, 50, 90, 0, 40),  # 1: right part covered: box moves by 20, 1200 px left > 300 -> kept, shrunk
        _rect(size, 0, 10, 60, 100),  # 2: untouched -> kept as is
        _rect(size, 60, 80, 45, 75),  # 3: covered except a 20 x 5 strip: 100 px, box moves 25 -> dropped
        _rect(size, 30, 46, 80, 100),  # 4: covered except 16 x 14 = 224 px, box moves only 6 -> kept
    ]
    src_masks = [_rect(size, 5, 25, 5, 25), _rect(size, 40, 95, 20, 70), _rect(size, 30, 46, 80, 86)]
    dst = _instances(size, dst_masks, [0, 1, 2, 3, 4])
    src = _instances(size, src_masks, [7, 8, 9])
    dst_img = torch.zeros((3, *size), dtype=torch.uint8)
    src_img = torch.full((3, *size), 200, dtype=torch.uint8)
    img, out = paste_instances(dst_img, dst, src_img, src)

    union = np.any(src_masks, axis=0)
    assert torch.equal(img, torch.as_tensor(np.where(union, 200, 0)).to(torch.uint8).expand(3, -1, -1))
    assert out.gt_classes.tolist() == [1, 2, 4, 7, 8, 9]
    masks = out.gt_masks.tensor.numpy()
    for got, want in zip(masks, [dst_masks[1] & ~union, dst_masks[2], dst_masks[4] & ~union] + src_masks):
        assert np.array_equal(got, want)
    # each box is the tight box of its mask (brute force)
    for m, b in zip(masks, out.gt_boxes.tensor.tolist()):
        ys, xs = np.nonzero(m)
        assert b == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
    assert out.gt_boxes.tensor[0].tolist() == [0, 50, 20, 90]

    # nothing to paste: the destination unchanged
    img2, same = paste_instances(dst_img, dst, src_img, src[torch.zeros(3, dtype=torch.bool)])
    assert torch.equal(img2, dst_img) and same.gt_classes.tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="same size"):
        paste_instances(dst_img, dst, src_img[:, :50], src)


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("synth_masks"))
    names = register_synthetic_dataset("masktest_synth", root=root, num_train=12, num_val=2, num_classes=8,
                                       image_size=(64, 96), seed=3)
    return root, names


def test_synthetic_masks_exact(synth):
    root, _ = synth
    folder = ensure_synthetic_dataset(root, num_train=12, num_val=2, num_classes=8, image_size=(64, 96), seed=3)
    coco = json.load(open(os.path.join(folder, "train.json")))
    sizes = {im["id"]: (im["height"], im["width"]) for im in coco["images"]}
    union = {}
    assert len(coco["annotations"]) > 20
    for a in coco["annotations"]:
        m = mask_util.decode(a["segmentation"]).astype(bool)
        assert m.shape == sizes[a["image_id"]]
        ys, xs = np.nonzero(m)
        x, y, w, h = a["bbox"]
        assert [x, y, x + w, y + h] == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
        assert a["area"] == m.sum()
        # visible parts: an image's masks never overlap
        u = union.setdefault(a["image_id"], np.zeros(m.shape, np.int32))
        u += m
    assert max(u.max() for u in union.values()) == 1


def test_copy_paste_dataset_consistent(synth):
    _, (train, _) = synth
    dicts = get_detection_dataset_dicts(train, filter_empty=True)
    mapper = DetrDatasetMapper(True, lsj_train_augmentation(image_size=96, min_scale=0.5, max_scale=1.5),
                               use_instance_mask=True, instance_mask_format="bitmask", recompute_boxes=True)
    ds = CopyPasteDataset(dicts, mapper, max_num_pasted=100)
    np.random.seed(0)
    grew = 0
    for i in range(len(ds)):
        out = ds[i]
        inst = out["instances"]
        assert out["image"].shape == (3, 96, 96) and len(inst) > 0
        masks = inst.gt_masks.tensor
        assert masks.shape[1:] == (96, 96) and int(masks.sum(0).max()) <= 1  # occluded parts removed
        assert masks.flatten(1).any(1).all()
        torch.testing.assert_close(inst.gt_boxes.tensor, inst.gt_masks.get_bounding_boxes().tensor)
        assert ((inst.gt_classes >= 0) & (inst.gt_classes < 8)).all()
        grew += len(inst) > len(dicts[i]["annotations"])
    assert grew > 0
    boxes_only = CopyPasteDataset(dicts, mapper, keep_masks=False)[0]["instances"]
    assert not boxes_only.has("gt_masks")
    # selection: uniform in 0 .. min(n, max_num_pasted - 1)
    sel = CopyPasteDataset(dicts, mapper, max_num_pasted=3)
    src = _instances((4, 4), [np.ones((4, 4), bool)] * 10, list(range(10)))
    counts = {len(sel._select(src)) for _ in range(100)}
    assert counts == {0, 1, 2}
    with pytest.raises(ValueError, match="use_instance_mask"):
        CopyPasteDataset(dicts, DetrDatasetMapper(True, []))


def test_lsj_copy_paste_config_trains_through_the_loader(synth):
    """configs/common/coco_lsj_data.py on the synthetic data: the training script's loader (mapper=None, the
    copy-paste dataset maps) yields fixed-size images whose boxes are the tight boxes of the pasted masks."""
    from detectron2.config import LazyConfig

    _, (train, _) = synth
    cfg = LazyConfig.load(os.path.join(pipeline_utils.ROOT, "configs", "common", "coco_lsj_data.py"))
    cfg = LazyConfig.apply_overrides(cfg, [
        f"dataloader.train.dataset.dataset.names={train}", "dataloader.train.dataset.mapper.augmentations.image_size=64",
        "dataloader.train.dataset.keep_masks=True", "dataloader.train.total_batch_size=2",
        "dataloader.train.num_workers=0",
    ])
    cfg.train = {"seed": 0}
    loader, sampler = pipeline_utils.load_train_script().build_train_loader(cfg)
    assert sampler is not None
    batch = next(iter(loader))
    assert len(batch) == 2
    for d in batch:
        assert d["image"].shape == (3, 64, 64)
        inst = d["instances"]
        torch.testing.assert_close(inst.gt_boxes.tensor, inst.gt_masks.get_bounding_boxes().tensor)
