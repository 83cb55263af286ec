"""codetr.Predictor on the demo config's real model (random weights saved as a checkpoint): boxes come back in the
original image's pixels for a non-square image (checked against a hand-computed resize factor applied to the
model's detections on the resized image), channel order, score threshold, lists, and bad input."""
import os

import numpy as np
import pytest
import torch

import detectron2.data.transforms as T
from detectron2.config import LazyConfig, instantiate

import codetr
from codetr import Predictor

from dino_utils import one_thread  # noqa: F401 (fixture)

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "configs", "demo", "co_dino_synthetic.py")  # test resize: short side 192, long <= 352


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = instantiate(LazyConfig.load(DEMO).model)
    path = str(tmp_path_factory.mktemp("ckpt") / "model.pth")
    torch.save({"model": model.state_dict()}, path)
    return path


def _image(h, w, seed=0):
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 60, (h, w, 3), dtype=np.uint8)
    img[h // 4 : h // 2, w // 5 : w // 2] = (250, 40, 40)  # a red block, RGB
    img[h // 2 : 4 * h // 5, w // 2 : 9 * w // 10] = (30, 220, 60)
    return img


def test_boxes_in_original_pixels_of_non_square_image(checkpoint):
    predictor = Predictor(DEMO, checkpoint, device="cpu", input_format="RGB")
    h, w = 150, 230
    rgb = _image(h, w)
    got = predictor(rgb)
    assert got.image_size == (h, w)
    assert len(got) > 0

    # by hand: short side 150 -> 192, so the long side 230 -> round(230 * 192 / 150) = round(294.4) = 294 (<= 352)
    new_h, new_w = 192, 294
    resized = T.ResizeTransform(h, w, new_h, new_w).apply_image(rgb)
    x = torch.as_tensor(np.ascontiguousarray(resized.transpose(2, 0, 1)))
    with torch.no_grad():
        ref = predictor.model([{"image": x}])[0]["instances"]  # no height/width: boxes in the resized image
    assert ref.image_size == (new_h, new_w)
    scale = torch.tensor([w / new_w, h / new_h, w / new_w, h / new_h])
    torch.testing.assert_close(got.pred_boxes.tensor, ref.pred_boxes.tensor * scale, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(got.scores, ref.scores)
    assert torch.equal(got.pred_classes, ref.pred_classes)
    assert got.pred_boxes.tensor[:, 0::2].max() <= w and got.pred_boxes.tensor[:, 1::2].max() <= h
    assert (got.pred_boxes.tensor >= 0).all()


def test_channel_order_and_threshold_and_lists(checkpoint):
    rgb = _image(120, 200, seed=1)
    p_rgb = Predictor(DEMO, checkpoint, device="cpu", input_format="RGB")
    a = p_rgb(rgb)
    b = p_rgb(np.ascontiguousarray(rgb[:, :, ::-1]), input_format="BGR")
    assert torch.equal(a.pred_boxes.tensor, b.pred_boxes.tensor) and torch.equal(a.scores, b.scores)
    # a BGR image read as RGB is a different input
    c = p_rgb(np.ascontiguousarray(rgb[:, :, ::-1]))
    assert not torch.equal(a.scores, c.scores)

    thr = float(a.scores.median())
    p_thr = Predictor(DEMO, checkpoint, device="cpu", input_format="RGB", score_threshold=thr)
    d = p_thr(torch.from_numpy(rgb))  # a torch HWC tensor works too
    keep = a.scores >= thr
    assert 0 < len(d) < len(a)
    assert torch.equal(d.scores, a.scores[keep]) and torch.equal(d.pred_boxes.tensor, a.pred_boxes.tensor[keep])

    many = p_rgb([rgb, _image(90, 60, seed=2)])
    assert isinstance(many, list) and [m.image_size for m in many] == [(120, 200), (90, 60)]


def test_model_zoo_name_and_top_level_import(checkpoint):
    assert codetr.Predictor is Predictor
    p = Predictor("demo/co_dino_synthetic.py", checkpoint, device="cpu")
    assert p.input_format == "RGB" and p.checkpoint == checkpoint


@pytest.mark.parametrize(
    "image, exc, match",
    [
        (np.zeros((20, 30), np.uint8), ValueError, "HWC"),
        (np.zeros((20, 30, 4), np.uint8), ValueError, "3 channels"),
        (np.zeros((20, 30, 3), np.float32), ValueError, "uint8"),
        ([[1, 2, 3]], TypeError, "numpy array"),
    ],
)
def test_bad_images_raise_clear_errors(checkpoint, image, exc, match):
    p = Predictor(DEMO, checkpoint, device="cpu")
    with pytest.raises(exc, match=match):
        p([image] if not isinstance(image, list) else image)


def test_bad_arguments(checkpoint, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Predictor(DEMO, str(tmp_path / "missing.pth"), device="cpu")
    with pytest.raises(ValueError, match="score_threshold"):
        Predictor(DEMO, checkpoint, device="cpu", score_threshold=1.5)
    with pytest.raises(ValueError, match="input_format"):
        Predictor(DEMO, checkpoint, device="cpu", input_format="YUV")
    with pytest.raises(RuntimeError, match="not found in the model zoo"):
        Predictor("no_such_config.py", checkpoint, device="cpu")
