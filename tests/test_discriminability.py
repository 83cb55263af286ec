"""Discriminability analysis: score and attention maps against hand-computed fixtures, the IoF-IoB curve and its area
against hand counts, the probe on the real demo model, and tools/analyze_discriminability.py end to end."""
import math
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import pipeline_utils as pu  # noqa: E402  (sets CODETR_SYNTHETIC_ROOT before codetr.data is imported)

from codetr.analysis.discriminability import (  # noqa: E402
    DiscriminabilityProbe,
    IoFIoBCurve,
    attention_level_maps,
    discriminability_score,
    feature_level_maps,
    foreground_mask,
)


def test_score_of_hand_made_feature_maps():
    # level 0: 2x2 positions with 2 channels; norms 5, 0 (zero vector), 1, 10 -> / 10
    lvl0 = torch.tensor([[[3.0, 4.0], [0.0, 0.0]], [[1.0, 0.0], [6.0, 8.0]]])  # (h, w, C)
    # level 1: 1x1 -> normalised to 1, resized to 2x2 -> all ones
    lvl1 = torch.tensor([[[2.0, -2.0]]])
    shapes = torch.tensor([[2, 2], [1, 1]])
    memory = torch.cat([lvl0.reshape(4, 2), lvl1.reshape(1, 2)])  # (S, C), finest level first
    maps = feature_level_maps(memory, shapes, [(2, 2), (1, 1)])
    torch.testing.assert_close(maps[0], torch.tensor([[5.0, 0.0], [1.0, 10.0]]))
    torch.testing.assert_close(maps[1], torch.tensor([[math.sqrt(8.0)]]))
    score = discriminability_score(maps)
    expected = (torch.tensor([[0.5, 0.0], [0.1, 1.0]]) + 1.0) / 2
    torch.testing.assert_close(score, expected)


def test_feature_maps_are_cropped_to_the_valid_region():
    # a 2x3 level whose last column is padding: its large norm must not count, nor normalise the rest
    memory = torch.tensor([[1.0], [2.0], [100.0], [4.0], [1.0], [100.0]])
    maps = feature_level_maps(memory, torch.tensor([[2, 3]]), [(2, 2)])
    torch.testing.assert_close(maps[0], torch.tensor([[1.0, 2.0], [4.0, 1.0]]))
    torch.testing.assert_close(discriminability_score(maps), torch.tensor([[0.25, 0.5], [1.0, 0.25]]))


def test_attention_mass_is_the_bilinear_splat():
    shapes = torch.tensor([[4, 4], [2, 2]])
    # query 0, head 0: one point at the centre of pixel (x=1, y=2) of level 0 (weight 0.6), one half-way between
    # the four pixels of level 1 (weight 0.4); head 1 puts all its weight 1.0 on pixel (x=3, y=0) of level 0
    loc = torch.zeros(1, 2, 2, 1, 2)
    w = torch.zeros(1, 2, 2, 1)
    loc[0, 0, 0, 0] = torch.tensor([1.5 / 4, 2.5 / 4])
    w[0, 0, 0, 0] = 0.6
    loc[0, 0, 1, 0] = torch.tensor([0.5, 0.5])
    w[0, 0, 1, 0] = 0.4
    loc[0, 1, 0, 0] = torch.tensor([3.5 / 4, 0.5 / 4])
    w[0, 1, 0, 0] = 1.0
    loc[0, 1, 1, 0] = torch.tensor([2.0, 2.0])  # outside the map: reads zeros, puts no mass anywhere
    maps = attention_level_maps(loc, w, shapes, [(4, 4), (2, 2)])
    expected0 = torch.zeros(4, 4)
    expected0[2, 1] = 0.6
    expected0[0, 3] = 1.0
    torch.testing.assert_close(maps[0], expected0)
    torch.testing.assert_close(maps[1], torch.full((2, 2), 0.1))


def test_foreground_mask_of_a_box():
    fg = foreground_mask(torch.tensor([[1.0, 0.0, 3.0, 2.0]]), 4, 5)
    expected = torch.zeros(4, 5, dtype=torch.bool)
    expected[0:2, 1:3] = True  # pixel centres 1.5, 2.5 in x and 0.5, 1.5 in y
    assert torch.equal(fg, expected)
    assert not foreground_mask(torch.zeros(0, 4), 3, 3).any()


def test_iof_iob_counts_and_area_by_hand():
    # 4 foreground pixels (0.9, 0.9, 0.3, 0.3), 12 background pixels (0.6, 0.6, ten of 0.1)
    score = torch.tensor([[0.9, 0.9, 0.6, 0.6], [0.3, 0.3, 0.1, 0.1], [0.1] * 4, [0.1] * 4])
    fg = torch.zeros(4, 4, dtype=torch.bool)
    fg[0, :2] = fg[1, :2] = True
    curve = IoFIoBCurve(torch.tensor([0.0, 0.2, 0.5, 0.8, 1.0]))
    curve.add(score, fg)
    c = curve.curve()
    assert c["iof"] == pytest.approx([1.0, 1.0, 0.5, 0.5, 0.0])
    assert c["iob"] == pytest.approx([1.0, 2 / 12, 2 / 12, 0.0, 0.0])
    # the curve (0,0) -> (0,0.5) -> (1/6,0.5) -> (1/6,1) -> (1,1): area 1/12 + 5/6
    assert curve.area() == pytest.approx(11 / 12)
    # pooling: a second image with only background pixels at 0.95 halves nothing of IoF, adds to IoB
    curve.add(torch.full((2, 2), 0.95), torch.zeros(2, 2, dtype=torch.bool))
    c = curve.curve()
    assert c["iof"] == pytest.approx([1.0, 1.0, 0.5, 0.5, 0.0])
    assert c["iob"] == pytest.approx([1.0, 6 / 16, 6 / 16, 4 / 16, 0.0])


def test_curve_is_monotone_and_ends_at_one_one():
    g = torch.Generator().manual_seed(0)
    curve = IoFIoBCurve()
    for _ in range(3):
        maps = [torch.rand(8, 8, generator=g) + 1e-3, torch.rand(4, 4, generator=g) + 1e-3]
        score = discriminability_score(maps, out_size=(30, 34))
        curve.add(score, foreground_mask(torch.tensor([[3.0, 4.0, 20.0, 15.0]]), 30, 34))
    c = curve.curve()
    iof, iob = torch.tensor(c["iof"]), torch.tensor(c["iob"])
    assert bool((iof[1:] <= iof[:-1]).all()) and bool((iob[1:] <= iob[:-1]).all())
    assert (c["iob"][0], c["iof"][0]) == (1.0, 1.0)  # t = 0: every (positive) score is above
    assert (c["iob"][-1], c["iof"][-1]) == (0.0, 0.0)  # t = 1: nothing is above the normalised maximum
    # a uniform random score does not tell foreground from background
    assert 0.35 < curve.area() < 0.65
    # a perfect separator has area 1
    perfect = IoFIoBCurve()
    fg = foreground_mask(torch.tensor([[2.0, 2.0, 6.0, 6.0]]), 8, 8)
    perfect.add(torch.where(fg, 0.9, 0.2), fg)
    assert perfect.area() == pytest.approx(1.0)


def test_probe_on_the_demo_model_matches_a_manual_forward():
    """The hooks read what the model computes: the encoder memory's norms and the last decoder layer's
    sampling, recomputed here from the transformer's own steps."""
    from detectron2.config import LazyConfig, instantiate

    cfg = LazyConfig.load(os.path.join(pu.ROOT, "configs", "demo", "co_dino_synthetic.py"))
    torch.manual_seed(0)
    model = instantiate(cfg.model).eval()
    image = torch.randint(0, 255, (3, 100, 140), dtype=torch.uint8).float()
    probe = DiscriminabilityProbe(model)
    with torch.no_grad():
        model([{"image": image}])
        maps = probe.pop()
        images, masks, sizes = model.preprocess_image([{"image": image}])
        feats = model.neck(model.backbone(images.tensor))
        enc = model.query_head.encode(feats, masks, sizes)
    probe.remove()
    shapes = enc["spatial_shapes"]
    assert len(maps["encoder"]) == len(maps["attention"]) == len(feats)
    start = 0
    for lvl, (h, w) in enumerate(shapes.tolist()):
        vh, vw = math.ceil(100 / 2 ** (lvl + 3)), math.ceil(140 / 2 ** (lvl + 3))  # strides 8, 16, 32, 64
        ref = enc["memory"][0, start : start + h * w].view(h, w, -1)[:vh, :vw].double().norm(dim=-1)
        torch.testing.assert_close(maps["encoder"][lvl].double(), ref, rtol=1e-5, atol=1e-5)
        assert maps["attention"][lvl].shape == (vh, vw)
        start += h * w
    # every query's weights sum to 1 per head; the mass that lands inside the valid region is at most Q * H
    total = sum(float(m.sum()) for m in maps["attention"])
    q, heads = cfg.model.query_head.transformer.num_queries, cfg.model.query_head.transformer.num_heads
    assert 0 < total <= q * heads + 1e-3
    score = discriminability_score(maps["encoder"], out_size=(100, 140))
    assert score.shape == (100, 140) and float(score.max()) <= 1.0 + 1e-6 and float(score.min()) > 0


def test_tool_compares_two_checkpoints_on_a_dataset(tmp_path):
    import json

    import numpy as np

    from codetr.data import register_synthetic_dataset
    from detectron2.config import LazyConfig, instantiate
    from detectron2.data import DatasetCatalog, MetadataCatalog

    val = register_synthetic_dataset("codetr_test_disc", num_train=1, num_val=3, image_size=(64, 80), seed=5)[1]
    config = os.path.join(pu.ROOT, "configs", "demo", "co_dino_synthetic.py")
    cfg = LazyConfig.load(config)
    ckpts = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = instantiate(cfg.model)
        # at initialisation every encoder token leaves a LayerNorm(weight 1, bias 0): all norms are equal and the
        # score is flat (area 0.5); random affine parameters stand in for trained ones
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, torch.nn.LayerNorm):
                    m.weight.normal_(1.0, 0.5)
                    m.bias.normal_(0.0, 0.5)
        path = str(tmp_path / f"m{seed}.pth")
        torch.save({"model": model.state_dict()}, path)
        ckpts.append(path)
    sys.path.insert(0, os.path.join(pu.ROOT, "tools"))
    import analyze_discriminability

    out = str(tmp_path / "out")
    args = ["--dataset", val, "--output", out, "--num-vis", "2"]
    for label, ckpt in zip(("A", "B"), ckpts):
        args += ["--config-file", config, "--checkpoint", ckpt, "--label", label]
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        results = analyze_discriminability.main(args)
        heat_only = analyze_discriminability.main(
            ["--config-file", config, "--checkpoint", ckpts[0], "--input", MetadataCatalog.get(val).image_root,
             "--output", str(tmp_path / "folder"), "--num-vis", "1"])
    finally:
        torch.set_num_threads(n)
    saved = json.load(open(os.path.join(out, "summary.json")))
    assert set(saved) == {"A", "B"} and saved["A"]["num_images"] == len(DatasetCatalog.get(val)) == 3
    for label in ("A", "B"):
        for kind in ("encoder", "attention"):
            c = saved[label][kind]
            iof, iob = np.array(c["iof"]), np.array(c["iob"])
            assert (np.diff(iof) <= 0).all() and (np.diff(iob) <= 0).all()
            x = np.concatenate([[0.0], iob[::-1], [1.0]])
            y = np.concatenate([[0.0], iof[::-1], [1.0]])
            area = float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2))  # trapezoids, written out
            assert c["area"] == pytest.approx(area) and 0.0 <= area <= 1.0
            assert results[label][kind]["area"] == c["area"]
    assert saved["A"]["encoder"]["area"] != saved["B"]["encoder"]["area"]  # two different models
    assert os.path.getsize(os.path.join(out, "iof_iob.png")) > 0
    assert len(os.listdir(os.path.join(out, "heatmaps"))) == 2
    assert heat_only == {} and len(os.listdir(str(tmp_path / "folder" / "heatmaps"))) == 1
    with pytest.raises(SystemExit, match="does not exist"):
        analyze_discriminability.main(["--config-file", config, "--checkpoint", str(tmp_path / "none.pth"),
                                       "--dataset", val, "--output", out])
