"""Test-time augmentation (CoDETR(test_time_aug=...)): against a hand-built reference (each view resized / flipped
by hand, its candidates mapped back with hand-computed factors, concatenated, merged by the post-processor), and
the one-view case equal to the plain forward."""
import numpy as np
import pytest
import torch

import detectron2.data.transforms as T

from codetr.modeling.tta import TestTimeAugmentation

from dino_utils import one_thread, tiny_model  # noqa: F401 (fixture)

pytestmark = pytest.mark.usefixtures("one_thread")


def _model(tta=None):
    torch.manual_seed(0)
    model = tiny_model(num_classes=4, num_queries=20, layers=1, max_per_img=40).eval()
    model.test_time_aug = tta
    return model


def _input(h=96, w=128):
    g = torch.Generator().manual_seed(3)
    return {"image": torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g), "height": h, "width": w}


def test_tta_equals_hand_built_views_and_merge():
    x = _input()
    img = x["image"].permute(1, 2, 0).numpy()
    model = _model(TestTimeAugmentation(min_sizes=[96, 64], max_size=1000, flip=True))
    got = model([x])[0]["instances"]

    boxes, scores, labels = [], [], []
    for nh, nw in [(96, 128), (64, 85)]:  # short side 96 / 64; long side round(128 * 64 / 96) = 85
        view = T.ResizeTransform(96, 128, nh, nw).apply_image(img)
        for flip in (False, True):
            v = np.ascontiguousarray(view[:, ::-1] if flip else view)
            b, s, l = (t[0] for t in model.detection_candidates([{"image": torch.from_numpy(v.transpose(2, 0, 1).copy())}]))
            if flip:  # x -> nw - x, corners swapped
                b = torch.stack([nw - b[:, 2], b[:, 1], nw - b[:, 0], b[:, 3]], 1)
            boxes.append(b * torch.tensor([128 / nw, 96 / nh, 128 / nw, 96 / nh]))
            scores.append(s)
            labels.append(l)
    want = model.postprocessor.merge(torch.cat(boxes), torch.cat(scores), torch.cat(labels))
    assert got.image_size == (96, 128) and len(got) == len(want["scores"]) == 40
    torch.testing.assert_close(got.scores, want["scores"])
    assert torch.equal(got.pred_classes, want["labels"])
    torch.testing.assert_close(got.pred_boxes.tensor, want["boxes"].clamp(min=0), rtol=1e-5, atol=1e-3)


def test_tta_single_view_equals_plain_forward():
    x = _input()
    plain = _model()([x])[0]["instances"]
    tta = _model(TestTimeAugmentation(min_sizes=[96], max_size=1000, flip=False))([x])[0]["instances"]
    torch.testing.assert_close(tta.pred_boxes.tensor, plain.pred_boxes.tensor, rtol=1e-6, atol=1e-4)
    assert torch.equal(tta.scores, plain.scores) and torch.equal(tta.pred_classes, plain.pred_classes)


def test_tta_bad_arguments():
    with pytest.raises(ValueError, match="at least one test scale"):
        TestTimeAugmentation(min_sizes=[], max_size=100)
    m = tiny_model()
    with pytest.raises(ValueError, match="test_time_aug needs eval_module='detr'"):
        type(m)(backbone=m.backbone, neck=m.neck, query_head=m.query_head, pixel_mean=[0, 0, 0], pixel_std=[1, 1, 1],
                collaborative=torch.nn.Identity(), eval_module="atss", test_time_aug=TestTimeAugmentation([64], 100))
