"""Official (mmdetection) Co-DETR checkpoints -> our parameter names: key layouts from the official code and from the
official parameter list (the official Co-DINO R50 model's parameters and buffers, as tests/data/official-state-dict-
co_dino_r50.tsv)."""
import argparse
import ast
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

from codetr.checkpoint.official import (
    OfficialCheckpointError,
    convert_official_state_dict,
    load_official_checkpoint,
    maybe_convert_official_file,
)
from codetr.modeling.backbone import SFP, EVA02ViT

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
R50_TSV = os.path.join(REPO, "tests", "data", "official-state-dict-co_dino_r50.tsv")


def read_tsv(path, prefix=""):
    """{key: shape} of the official parameter list (rows: key, shape, dtype, kind)."""
    out = {}
    with open(path) as f:
        for line in f:
            if line.startswith("#") or not line.strip():
                continue
            key, shape, dtype, kind = line.rstrip("\n").split("\t")
            if key.startswith(prefix):
                out[key] = (tuple(ast.literal_eval(shape)), dtype)
    return out


def random_state_dict(layout):
    g = torch.Generator().manual_seed(0)
    sd = {}
    for k, (shape, dtype) in layout.items():
        if dtype == "int64":
            sd[k] = torch.randint(0, 10, shape, generator=g)
        else:
            sd[k] = torch.randn(shape, generator=g)
    return sd


def official_vit_sfp_layout(depth, dim, heads, hidden, pre_grid, window_blocks, c_out):
    """Official ViT + SFP keys and shapes, written from mmdet/models/backbones/vit.py and necks/sfp.py."""
    f32 = "float32"
    L = {
        "backbone.patch_embed.proj.weight": ((dim, 3, 16, 16), f32),
        "backbone.patch_embed.proj.bias": ((dim,), f32),
        "backbone.pos_embed": ((1, pre_grid * pre_grid + 1, dim), f32),
        # VisionRotaryEmbeddingFast buffers: (ft_seq_len^2, head_dim)
        "backbone.rope_win.freqs_cos": ((4 * 4, dim // heads), f32),
        "backbone.rope_win.freqs_sin": ((4 * 4, dim // heads), f32),
        "backbone.out_norm.weight": ((dim,), f32),
        "backbone.out_norm.bias": ((dim,), f32),
    }
    for i in range(depth):
        b = f"backbone.blocks.{i}."
        for n in ("norm1", "norm2"):
            L[b + n + ".weight"] = ((dim,), f32)
            L[b + n + ".bias"] = ((dim,), f32)
        for n in ("q_proj", "k_proj", "v_proj"):
            L[b + f"attn.{n}.weight"] = ((dim, dim), f32)
        L[b + "attn.q_bias"] = ((dim,), f32)
        L[b + "attn.v_bias"] = ((dim,), f32)
        L[b + "attn.proj.weight"] = ((dim, dim), f32)
        L[b + "attn.proj.bias"] = ((dim,), f32)
        if i in window_blocks:  # the shared rope module is a submodule of each windowed attention
            L[b + "attn.rope.freqs_cos"] = ((4 * 4, dim // heads), f32)
            L[b + "attn.rope.freqs_sin"] = ((4 * 4, dim // heads), f32)
        for n in ("w1", "w2"):
            L[b + f"mlp.{n}.weight"] = ((hidden, dim), f32)
            L[b + f"mlp.{n}.bias"] = ((hidden,), f32)
        L[b + "mlp.ffn_ln.weight"] = ((hidden,), f32)
        L[b + "mlp.ffn_ln.bias"] = ((hidden,), f32)
        L[b + "mlp.w3.weight"] = ((dim, hidden), f32)
        L[b + "mlp.w3.bias"] = ((dim,), f32)
    C, D = dim, c_out
    convs = {  # index in the nn.Sequential -> (out, in, k); LayerNorms follow each conv at index + 1
        "p2": [(1, C // 2, C, 3), (5, C // 4, C // 2, 3), (8, D, C // 4, 1), (11, D, D, 3)],
        "p3": [(1, C // 2, C, 3), (4, D, C // 2, 1), (7, D, D, 3)],
        "p4": [(0, D, C, 1), (3, D, D, 3)],
        "p5": [(1, D, C, 1), (4, D, D, 3)],
        "p6": [(1, C, C, 3), (4, D, C, 1), (7, D, D, 3)],
    }
    for lvl, items in convs.items():
        for idx, o, i_, k in items:
            L[f"neck.{lvl}.{idx}.weight"] = ((o, i_, k, k), f32)
            L[f"neck.{lvl}.{idx + 1}.weight"] = ((o,), f32)
            L[f"neck.{lvl}.{idx + 1}.bias"] = ((o,), f32)
    return L


class ViTWithNeck(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = EVA02ViT(embed_dim=32, depth=4, num_heads=2, window_size=4, global_block_indexes=(1, 3),
                                 pretrain_img_size=64)
        self.neck = SFP(32, 16)


def test_vit_sfp_official_layout_converts_one_to_one():
    hidden = int(32 * 4 * 2 / 3)
    official = random_state_dict(official_vit_sfp_layout(4, 32, 2, hidden, 4, (0, 2), 16))
    model = ViTWithNeck()
    out, report = convert_official_state_dict(official, model.state_dict())
    assert report.ok and report.backbone == "vit"
    assert report.missing == [] and report.unexpected == []
    assert sorted(report.ignored) == sorted(k for k in official if "rope" in k)
    missing, unexpected = model.load_state_dict(out, strict=True)
    assert not missing and not unexpected
    assert torch.equal(model.backbone.blocks[2].mlp.fc1_g.weight, official["backbone.blocks.2.mlp.w1.weight"])
    assert torch.equal(model.backbone.blocks[2].mlp.fc1_x.bias, official["backbone.blocks.2.mlp.w2.bias"])
    assert torch.equal(model.backbone.blocks[0].mlp.norm.weight, official["backbone.blocks.0.mlp.ffn_ln.weight"])
    assert torch.equal(model.backbone.blocks[3].mlp.fc2.weight, official["backbone.blocks.3.mlp.w3.weight"])
    assert torch.equal(model.neck.p6[1].weight, official["neck.p6.1.weight"])


def test_unmapped_missing_and_shape_errors_are_reported():
    hidden = int(32 * 4 * 2 / 3)
    official = random_state_dict(official_vit_sfp_layout(4, 32, 2, hidden, 4, (0, 2), 16))
    model = ViTWithNeck()
    extra = dict(official, **{"query_head.mystery.weight": torch.zeros(3)})
    with pytest.raises(OfficialCheckpointError, match="query_head.mystery.weight"):
        convert_official_state_dict(extra, model.state_dict())
    fewer = {k: v for k, v in official.items() if k != "backbone.out_norm.bias"}
    with pytest.raises(OfficialCheckpointError, match="backbone.out_norm.bias"):
        convert_official_state_dict(fewer, model.state_dict())
    bad = dict(official, **{"backbone.pos_embed": torch.zeros(1, 5, 32)})
    with pytest.raises(OfficialCheckpointError, match="backbone.pos_embed"):
        convert_official_state_dict(bad, model.state_dict())
    # opting out: the result leaves the unexpected key out and the report lists it
    out, report = convert_official_state_dict(extra, model.state_dict(), strict=False)
    assert report.unexpected == ["query_head.mystery.weight"] and "query_head.mystery.weight" not in out


def detectron2_r50():
    from detectron2.layers import ShapeSpec
    from detectron2.modeling.backbone.resnet import BasicStem, ResNet

    stages = ResNet.make_default_stages(50, stride_in_1x1=False, norm="FrozenBN")
    return ResNet(BasicStem(3, 64, norm="FrozenBN"), stages, out_features=["res2", "res3", "res4", "res5"])


def test_resnet_official_keys_map_onto_detectron2_resnet():
    layout = read_tsv(R50_TSV, prefix="backbone.")
    assert len(layout) > 300
    official = random_state_dict(layout)
    model = nn.Module()
    model.backbone = detectron2_r50()
    out, report = convert_official_state_dict(official, model.state_dict())
    assert report.backbone == "resnet" and report.ok
    assert set(report.ignored) == {k for k in official if k.endswith("num_batches_tracked")}
    model.load_state_dict(out, strict=True)
    # torchvision naming -> detectron2 naming, spot checks written by hand
    assert torch.equal(model.backbone.stem.conv1.weight, official["backbone.conv1.weight"])
    assert torch.equal(model.backbone.stem.conv1.norm.running_var, official["backbone.bn1.running_var"])
    assert torch.equal(model.backbone.res3[0].shortcut.weight, official["backbone.layer2.0.downsample.0.weight"])
    assert torch.equal(model.backbone.res5[2].conv3.norm.bias, official["backbone.layer4.2.bn3.bias"])


def test_load_official_checkpoint_file_formats(tmp_path):
    sd = {"module.backbone.x": torch.ones(2), "module.query_head.y": torch.zeros(3), "module.ema_backbone_x": torch.ones(2)}
    path = str(tmp_path / "official.pth")
    torch.save({"state_dict": sd, "meta": {"epoch": 12, "CLASSES": ("a", "b"), "config": "model = dict()"}}, path)
    loaded, meta = load_official_checkpoint(path)
    assert sorted(loaded) == ["backbone.x", "ema_backbone_x", "query_head.y"] and meta["epoch"] == 12
    out, report = convert_official_state_dict(loaded)
    assert sorted(out) == ["backbone.x", "query_head.y"] and "ema_backbone_x" in report.ignored

    broken = str(tmp_path / "broken.pth")
    with open(path, "rb") as f, open(broken, "wb") as g:
        g.write(f.read()[:200])
    with pytest.raises(OfficialCheckpointError, match="broken.pth"):
        load_official_checkpoint(broken)
    with pytest.raises(OfficialCheckpointError, match="does not exist"):
        load_official_checkpoint(str(tmp_path / "nope.pth"))

    unsafe = str(tmp_path / "unsafe.pth")
    # argparse.Namespace in the metadata is refused by torch.load(weights_only=True)
    torch.save({"state_dict": {"backbone.x": torch.ones(1)}, "meta": {"args": argparse.Namespace(lr=1)}}, unsafe)
    with pytest.raises(OfficialCheckpointError, match="allow_pickle"):
        load_official_checkpoint(unsafe)
    assert list(load_official_checkpoint(unsafe, allow_pickle=True)[0]) == ["backbone.x"]


def test_checkpointer_hook_recognises_official_files(tmp_path):
    model = ViTWithNeck()
    hidden = int(32 * 4 * 2 / 3)
    official = random_state_dict(official_vit_sfp_layout(4, 32, 2, hidden, 4, (0, 2), 16))
    official["query_head.foo"] = torch.zeros(1)  # makes it look like a full Co-DETR checkpoint
    path = str(tmp_path / "official.pth")
    torch.save({"state_dict": official, "meta": {}}, path)
    with pytest.raises(OfficialCheckpointError, match="query_head.foo"):
        maybe_convert_official_file(path, model)
    conv = maybe_convert_official_file(path, model, strict=False)
    assert conv["matching_heuristics"] is False and "backbone.blocks.0.mlp.fc1_g.weight" in conv["model"]
    native = str(tmp_path / "native.pth")
    torch.save({"model": model.state_dict()}, native)
    assert maybe_convert_official_file(native, model) is None
    # an official file whose metadata weights_only refuses: converted only when pickle is allowed
    unsafe = str(tmp_path / "official_unsafe.pth")
    torch.save({"state_dict": official, "meta": {"args": argparse.Namespace(lr=1)}}, unsafe)
    assert maybe_convert_official_file(unsafe, model, strict=False) is None
    assert "backbone.blocks.0.mlp.fc1_g.weight" in maybe_convert_official_file(
        unsafe, model, strict=False, allow_pickle=True)["model"]


def test_cli_help_and_conversion(tmp_path, capsys):
    import importlib.util

    tool = os.path.join(REPO, "tools", "convert_official_checkpoint.py")
    r = subprocess.run([sys.executable, tool, "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "--config-file" in r.stdout and "--allow-unmapped" in r.stdout
    spec = importlib.util.spec_from_file_location("convert_official_checkpoint", tool)
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    src = str(tmp_path / "in.pth")
    torch.save({"state_dict": {"backbone.blocks.0.mlp.w1.weight": torch.ones(2, 2)}, "meta": {"epoch": 1}}, src)
    dst = str(tmp_path / "out.pth")
    assert cli.main([src, dst, "--no-check"]) == 0
    assert list(torch.load(dst, weights_only=True)["model"]) == ["backbone.blocks.0.mlp.fc1_g.weight"]
    assert cli.main([str(tmp_path / "missing.pth"), dst, "--no-check"]) == 1
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # neither a config to check against nor an explicit --no-check
        cli.main([src, dst])


def co_dino_r50_model():
    """Our full Co-DINO R50 (one-to-one head + collaborative branch with the Faster R-CNN and ATSS heads)."""
    from detectron2.config import LazyConfig, instantiate

    cfg = LazyConfig.load(os.path.join(REPO, "configs", "co_dino_r50.py"))
    return instantiate(cfg.model)


def test_full_official_co_dino_r50_layout_loads_with_zero_missing_and_unexpected():
    official = random_state_dict(read_tsv(R50_TSV))
    assert len(official) == 674
    model = co_dino_r50_model()
    out, report = convert_official_state_dict(official, model.state_dict())
    assert report.ok, report.summary()
    assert set(report.ignored) == {k for k in official if k.endswith("num_batches_tracked")}
    missing, unexpected = model.load_state_dict(out, strict=True)
    assert not missing and not unexpected
    qh, co = model.query_head, model.collaborative
    # identical names / layouts (MultiheadAttention in_proj packing is the same as mmcv's)
    assert torch.equal(qh.transformer.decoder.layers[2].attentions[0].attn.in_proj_weight,
                       official["query_head.transformer.decoder.layers.2.attentions.0.attn.in_proj_weight"])
    assert torch.equal(qh.transformer.aux_pos_trans[1].weight, official["query_head.transformer.aux_pos_trans.1.weight"])
    # the official extra map is the adapter's stride-128 level; the encoder levels pass through unchanged
    assert co.adapter.identity_levels == [0, 1, 2, 3, 4] and len(co.adapter.downsample) == 1
    assert torch.equal(co.adapter.downsample[0][0].weight, official["query_head.downsample.0.weight"])
    assert torch.equal(co.adapter.downsample[0][1].bias, official["query_head.downsample.1.bias"])
    rcnn, atss = co.aux_heads[0], co.aux_heads[1]
    assert torch.equal(rcnn.roi_heads.box_head.fc2.weight, official["roi_head.0.bbox_head.shared_fcs.1.weight"])
    assert torch.equal(rcnn.roi_heads.box_predictor.cls_score.bias, official["roi_head.0.bbox_head.fc_cls.bias"])
    assert torch.equal(atss.scales[5].scale, official["bbox_head.0.scales.5.scale"])
    # mmcv ConvModules (conv + gn) -> detectron2 Conv2d(norm=GroupNorm): neck and ATSS towers
    assert torch.equal(model.neck.convs[1].weight, official["neck.convs.1.conv.weight"])
    assert torch.equal(model.neck.extra_convs[0].norm.bias, official["neck.extra_convs.0.gn.bias"])
    assert torch.equal(atss.cls_convs[0].norm.weight, official["bbox_head.0.cls_convs.0.gn.weight"])
    assert torch.equal(atss.reg_convs[0].weight, official["bbox_head.0.reg_convs.0.conv.weight"])
    # RPN outputs: anchor order changes from ratio-major (mmdet) to size-major (detectron2)
    off_cls = official["rpn_head.rpn_cls.weight"]
    ours_cls = rcnn.rpn.rpn_head.objectness_logits.weight
    for s in range(3):
        for r in range(3):
            assert torch.equal(ours_cls[s * 3 + r], off_cls[r * 3 + s])
            assert torch.equal(rcnn.rpn.rpn_head.anchor_deltas.bias[(s * 3 + r) * 4:(s * 3 + r) * 4 + 4],
                               official["rpn_head.rpn_reg.bias"][(r * 3 + s) * 4:(r * 3 + s) * 4 + 4])


def test_rpn_anchor_order_matches_anchor_geometry():
    """mmdet's base anchors (ratio-major, written from its formula) vs detectron2's cell anchors."""
    from detectron2.modeling.anchor_generator import DefaultAnchorGenerator

    from codetr.checkpoint.official import rpn_anchor_permutation

    stride, base, ratios, S = 8, 4.0, [0.5, 1.0, 2.0], 3
    scales = torch.tensor([base * 2 ** (k / S) for k in range(S)], dtype=torch.float64)
    h_r = torch.tensor(ratios, dtype=torch.float64).sqrt()
    ws = (stride / h_r[:, None] * scales[None, :]).reshape(-1)  # mmdet: w * w_ratios[:, None] * scales[None, :]
    hs = (stride * h_r[:, None] * scales[None, :]).reshape(-1)
    gen = DefaultAnchorGenerator(sizes=[[float(stride * s) for s in scales]], aspect_ratios=[ratios],
                                 strides=[stride], offset=0.0)
    cell = list(gen.cell_anchors)[0].double()
    d2_w, d2_h = cell[:, 2] - cell[:, 0], cell[:, 3] - cell[:, 1]
    perm = rpn_anchor_permutation(len(ratios), S)
    torch.testing.assert_close(d2_w, ws[perm], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(d2_h, hs[perm], rtol=1e-5, atol=1e-4)


def official_swin_layout(embed, depths, heads, window):
    """Official SwinTransformerV1 keys and shapes, written from projects/models/swin_transformer.py."""
    f32, i64 = "float32", "int64"
    L = {
        "backbone.patch_embed.proj.weight": ((embed, 3, 4, 4), f32),
        "backbone.patch_embed.proj.bias": ((embed,), f32),
        "backbone.patch_embed.norm.weight": ((embed,), f32),
        "backbone.patch_embed.norm.bias": ((embed,), f32),
    }
    for i, (d, h) in enumerate(zip(depths, heads)):
        dim = embed * 2 ** i
        for j in range(d):
            b = f"backbone.layers.{i}.blocks.{j}."
            for n in ("norm1", "norm2"):
                L[b + n + ".weight"] = ((dim,), f32)
                L[b + n + ".bias"] = ((dim,), f32)
            L[b + "attn.relative_position_bias_table"] = (((2 * window - 1) ** 2, h), f32)
            L[b + "attn.relative_position_index"] = ((window * window, window * window), i64)
            L[b + "attn.qkv.weight"] = ((3 * dim, dim), f32)
            L[b + "attn.qkv.bias"] = ((3 * dim,), f32)
            L[b + "attn.proj.weight"] = ((dim, dim), f32)
            L[b + "attn.proj.bias"] = ((dim,), f32)
            L[b + "mlp.fc1.weight"] = ((4 * dim, dim), f32)
            L[b + "mlp.fc1.bias"] = ((4 * dim,), f32)
            L[b + "mlp.fc2.weight"] = ((dim, 4 * dim), f32)
            L[b + "mlp.fc2.bias"] = ((dim,), f32)
        if i < len(depths) - 1:
            L[f"backbone.layers.{i}.downsample.reduction.weight"] = ((2 * dim, 4 * dim), f32)
            L[f"backbone.layers.{i}.downsample.norm.weight"] = ((4 * dim,), f32)
            L[f"backbone.layers.{i}.downsample.norm.bias"] = ((4 * dim,), f32)
        L[f"backbone.norm{i}.weight"] = ((dim,), f32)
        L[f"backbone.norm{i}.bias"] = ((dim,), f32)
    return L


def test_official_swin_keys_are_detectron2_swin_keys():
    from detectron2.modeling.backbone.swin import SwinTransformer

    official = random_state_dict(official_swin_layout(32, (2, 2, 2, 2), (1, 2, 4, 8), 4))
    model = nn.Module()
    model.backbone = SwinTransformer(embed_dim=32, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), window_size=4)
    out, report = convert_official_state_dict(official, model.state_dict())
    assert report.backbone == "swin" and report.ok and report.renamed == 0 and not report.ignored
    model.load_state_dict(out, strict=True)
