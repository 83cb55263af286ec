"""Test-time padding and box scaling, for every config in configs/.

The boxes a detector returns must be in the coordinates of the original image: rescaled by original / resized
size, never by original / padded size (the bug: the LVIS test mapper padded every image to 1536 x 1536, so
``detector_postprocess`` squashed every box of a non-square image). For each config this runs the config's own
test mapper and a CoDETR with the config's pre/post-processing settings (pixel mean/std, ``with_attn_mask``,
``size_divisibility``, ``square_pad``, ``pad_value``) and its real post-processor around an oracle query head that
returns the box of the bright rectangle it sees, and checks:

* the detection, in original-image coordinates, is the rectangle drawn in the original image;
* the resized image and the same image padded by hand to the network's input size give the same boxes in their
  own coordinates;
* ``detector_postprocess`` to a different original size scales the boxes exactly.

The real (shrunk) ViT-L LVIS model and the demo model check the same with the real query head.
"""
import glob
import os

import cv2
import numpy as np
import pytest
import torch
from torch import nn
from torchvision.ops import box_convert

from detectron2.config import LazyConfig, instantiate

from codetr.modeling import CoDETR

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALL_CONFIGS = sorted(os.path.relpath(p, os.path.join(REPO, "configs"))
                     for p in glob.glob(os.path.join(REPO, "configs", "**", "*.py"), recursive=True)
                     if "/common/" not in p)
RECT = (90.0, 40.0, 330.0, 170.0)  # x0, y0, x1, y1 in the 300 x 450 original image


def load(name, overrides=()):
    return LazyConfig.apply_overrides(LazyConfig.load(os.path.join(REPO, "configs", name)), list(overrides))


class _Identity(nn.Module):
    def forward(self, x):
        return [x]


class OracleHead(nn.Module):
    """Returns one box per image: the bounding box of the unmasked pixels whose first channel, normalised, is
    above ``threshold`` (the drawn rectangle), normalised by ``image_sizes`` as the real query head's boxes."""

    def __init__(self, threshold):
        super().__init__()
        self.threshold = threshold

    def forward(self, features, masks, targets, image_sizes):
        x = features[0][:, 0]  # (B, H, W)
        bright = (x > self.threshold) & ~masks
        boxes = []
        for b in range(x.shape[0]):
            ys, xs = torch.nonzero(bright[b], as_tuple=True)
            boxes.append(torch.stack([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]).float())
        boxes = torch.stack(boxes)
        scale = image_sizes.flip(1).repeat(1, 2)
        return torch.ones(x.shape[0], 1, 1), box_convert(boxes / scale, "xyxy", "cxcywh")[:, None]


def oracle_model(model_cfg):
    """CoDETR with the config's pre-processing settings and default post-processor around the oracle head."""
    kw = {k: model_cfg[k] for k in ("pixel_mean", "pixel_std", "input_format", "with_attn_mask", "size_divisibility",
                                    "square_pad", "pad_value") if k in model_cfg}
    mean, std = kw["pixel_mean"][0], kw["pixel_std"][0]
    return CoDETR(backbone=nn.Identity(), neck=_Identity(), query_head=OracleHead((200 - mean) / std), **kw).eval()


def network_input_size(model, h, w):
    """The padded size the model runs the image at (what a user padding by hand would pad to)."""
    if model.square_pad:
        h = w = model.square_pad
    d = model.size_divisibility
    return (-(-h // d) * d, -(-w // d) * d) if d > 1 else (h, w)


def hand_pad(image, size, model):
    """Pad (C, h, w) uint8 bottom/right to ``size`` with the model's own padding value (pixel space)."""
    if model.square_pad:
        value = model.pad_value
        out = torch.full((3, *size), value, dtype=torch.float32)
    else:  # the model pads the normalised image with 0, i.e. with the pixel mean
        out = model.pixel_mean.expand(3, *size).clone()
    out[:, : image.shape[1], : image.shape[2]] = image
    return out


def boxes_of(model, inputs):
    with torch.no_grad():
        return [o["instances"].pred_boxes.tensor for o in model(inputs)]


@pytest.mark.parametrize("name", ALL_CONFIGS)
def test_boxes_come_back_in_original_coordinates(name, tmp_path):
    cfg = load(name)
    img = np.full((300, 450, 3), 60, np.uint8)
    x0, y0, x1, y1 = (int(v) for v in RECT)
    img[y0:y1, x0:x1] = 255
    path = str(tmp_path / "img.png")
    cv2.imwrite(path, img)
    mapped = instantiate(cfg.dataloader.test.mapper)({"file_name": path, "height": 300, "width": 450, "image_id": 1})
    model = oracle_model(cfg.model)
    image = mapped["image"]
    h1, w1 = image.shape[1:]
    assert (h1, w1) != (300, 450)  # the mapper resized: the test exercises the rescale

    # 1. in original coordinates the box is the drawn rectangle (within the resize's rounding: 1 resized pixel)
    (orig,) = boxes_of(model, [mapped])
    tol = 1.5 * max(300 / h1, 450 / w1)
    assert torch.allclose(orig[0], torch.tensor(RECT), atol=tol), (orig, RECT)

    # 2. the same image padded by hand to the network's input size: the same boxes in its own coordinates
    size = network_input_size(model, h1, w1)
    padded = hand_pad(image, size, model)
    own, own_padded = boxes_of(model, [{"image": image}]), boxes_of(model, [{"image": padded}])
    assert torch.allclose(own[0], own_padded[0], atol=1e-3), (own, own_padded)

    # 3. detector_postprocess to a different original size scales exactly
    (scaled,) = boxes_of(model, [{"image": image, "height": 2 * h1, "width": 3 * w1}])
    assert torch.allclose(scaled, own[0] * torch.tensor([3.0, 2.0, 3.0, 2.0]), rtol=1e-6, atol=1e-4)


SHRUNK_VIT = [
    "model.backbone.embed_dim=64", "model.backbone.depth=2", "model.backbone.num_heads=4",
    "model.backbone.global_block_indexes=[1]", "model.backbone.window_size=4", "model.backbone.pretrain_img_size=64",
    "model.neck.in_channels=64", "model.query_head.transformer.num_queries=50", "model.postprocessor.max_per_img=100",
    "model.square_pad=64",
]


def test_real_lvis_model_hand_padding_and_scaling():
    """The shrunk ViT-L LVIS model (with_attn_mask=False, padding in the model with 114): a 40 x 64 image and the
    same image padded by hand to 64 x 64 with 114 give the same detections; a 2x original size doubles them."""
    torch.manual_seed(0)
    model = instantiate(load("co_dino_vitl_lvis.py", SHRUNK_VIT).model).eval()
    assert model.square_pad == 64 and model.pad_value == 114.0 and not model.with_attn_mask
    image = torch.randint(0, 256, (3, 40, 64), dtype=torch.uint8)
    padded = torch.full((3, 64, 64), 114, dtype=torch.uint8)
    padded[:, :40] = image
    with torch.no_grad():
        a = model([{"image": image}])[0]["instances"]
        b = model([{"image": padded}])[0]["instances"]
        c = model([{"image": image, "height": 80, "width": 128}])[0]["instances"]
    assert a.image_size == (40, 64) and b.image_size == (64, 64) and len(a) > 0
    # the network saw the same tensor; only the clip to each image's own size differs (and detector_postprocess
    # drops the boxes that the clip empties: those lying in the padding)
    bb = b.pred_boxes.clone()
    bb.clip((40, 64))
    keep = bb.nonempty()
    assert 0 < len(a) == int(keep.sum()) < len(b)
    torch.testing.assert_close(a.pred_boxes.tensor, bb.tensor[keep], rtol=0, atol=1e-4)
    torch.testing.assert_close(a.scores, b.scores[keep])
    torch.testing.assert_close(c.pred_boxes.tensor, 2 * a.pred_boxes.tensor, rtol=1e-6, atol=1e-4)
    with pytest.raises(ValueError, match="larger than square_pad=64"):
        model([{"image": torch.zeros(3, 65, 10, dtype=torch.uint8)}])


def test_real_demo_model_postprocess_scales_exactly():
    """The demo Co-DINO (with_attn_mask=True): detections for original size 2h x 3w are the (h, w) ones x (3, 2)."""
    torch.manual_seed(0)
    model = instantiate(load("demo/co_dino_synthetic.py").model).eval()
    image = torch.randint(0, 256, (3, 70, 100), dtype=torch.uint8)
    with torch.no_grad():
        a = model([{"image": image}])[0]["instances"]
        c = model([{"image": image, "height": 140, "width": 300}])[0]["instances"]
    assert len(a) > 0
    torch.testing.assert_close(c.pred_boxes.tensor, a.pred_boxes.tensor * torch.tensor([3.0, 2.0, 3.0, 2.0]),
                               rtol=1e-6, atol=1e-4)


def test_square_pad_pads_with_the_pixel_value_before_normalising():
    model = oracle_model(load("co_dino_vitl_lvis.py").model)
    images, masks, norm_sizes = model.preprocess_image([{"image": torch.zeros(3, 1024, 1536, dtype=torch.uint8)}])
    assert images.image_sizes == [(1024, 1536)] and images.tensor.shape[-2:] == (1536, 1536)
    expect = (114.0 - model.pixel_mean) / model.pixel_std
    torch.testing.assert_close(images.tensor[0, :, 1024:, :], expect.expand(3, 512, 1536))
    assert norm_sizes.tolist() == [[1536.0, 1536.0]] and not masks.any()  # with_attn_mask=False: padded size
