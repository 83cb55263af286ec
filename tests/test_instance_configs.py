"""Co-DINO-Inst configs (COCO, LVIS): official settings, instantiation, LazyConfig round trip, and the official
instance checkpoints' keys (mask_head.* / mask_iou_head.*, written from the official SimpleRefineMaskHead and
MaskIoUHead code with mmcv's ConvModule naming) converting with zero missing and zero unexpected keys."""
import os

import pytest
import torch
from detectron2.config import LazyConfig, instantiate

from codetr.checkpoint.official import convert_official_state_dict
from codetr.modeling.mask_head import InstanceMaskBranch
from test_official_checkpoint import random_state_dict
from test_zoo_configs import SHRINK, fake_official_vit_checkpoint, load
from dino_utils import one_thread  # noqa: F401  (a fixture)

# the shrunk ViT-L with the R50-style RoI head and 900 queries of the official R50 key list (as test_zoo_configs)
R50_HEAD = [
    "model.query_head.transformer.num_queries=900", "model.collaborative.aux_heads.0.num_conv=0",
    "model.collaborative.aux_heads.0.conv_norm=", "model.collaborative.aux_heads.0.num_fc=2",
    "model.collaborative.aux_heads.0.cls_agnostic_bbox_reg=False",
]


def official_mask_layout(num_classes, c=256, fc=1024, num_convs_instance=1, num_convs_semantic=2, stages=3):
    """Keys and shapes of the official mask_head (SimpleRefineMaskHead, norm LN2d) and mask_iou_head
    (MaskIoUHead, 2 convs, 1 fc). mmcv ConvModule: "<name>.conv.weight" (no bias with a norm) and the LN2d as
    "<name>.norm_layer.*" (infer_abbr of a class named LN2d); without a norm the conv keeps its bias."""
    f = "float32"
    L = {}

    def conv_module(name, cout, cin, k, norm):
        L[f"{name}.conv.weight"] = ((cout, cin, k, k), f)
        if norm:
            L[f"{name}.norm_layer.weight"] = ((cout,), f)
            L[f"{name}.norm_layer.bias"] = ((cout,), f)
        else:
            L[f"{name}.conv.bias"] = ((cout,), f)

    def conv(name, cout, cin, k):
        L[f"{name}.weight"] = ((cout, cin, k, k), f)
        L[f"{name}.bias"] = ((cout,), f)

    for i in range(num_convs_instance):
        conv_module(f"mask_head.instance_convs.{i}", c, c, 3, True)
    for i in range(num_convs_semantic):
        conv_module(f"mask_head.semantic_convs.{i}", c, c, 3, True)
    channels = [c]
    for s in range(stages):
        cin = channels[-1]
        p = f"mask_head.stages.{s}"
        conv(f"{p}.semantic_transform_in", cin, c, 1)
        conv(f"{p}.fuse_conv.0", cin, 2 * cin + 1, 1)
        for d in (1, 2, 3):
            conv_module(f"{p}.fuse_conv.1.dilation_conv_{d}", cin, cin, 3, False)
        conv_module(f"{p}.fuse_conv.1.merge_conv", cin, cin, 1, False)
        conv(f"{p}.fuse_transform_out", cin // 2 - 1, cin, 1)
        channels.append(cin // 2)
    for k, (ch, ncls) in enumerate(zip(channels, [num_classes] * stages + [1])):
        conv(f"mask_head.stage_instance_logits.{k}", ncls, ch, 1)
    conv_module("mask_iou_head.convs.0", c, c + 1, 3, True)
    conv_module("mask_iou_head.convs.1", c, c, 3, True)
    L["mask_iou_head.fcs.0.weight"] = ((fc, c * 7 * 7), f)
    L["mask_iou_head.fcs.0.bias"] = ((fc,), f)
    L["mask_iou_head.fc_mask_iou.weight"] = ((num_classes, fc), f)
    L["mask_iou_head.fc_mask_iou.bias"] = ((num_classes,), f)
    return L


@pytest.mark.parametrize("name,num_classes", [("co_dino_vitl_instance.py", 80), ("co_dino_vitl_lvis_instance.py", 1203)])
def test_instance_configs_official_settings_and_round_trip(name, num_classes, tmp_path):
    cfg = load(name)
    mb = cfg.model.mask_branch
    assert mb.mask_head.num_classes == num_classes and mb.mask_iou_head.num_classes == num_classes
    assert tuple(mb.strides) == (4, 8, 16, 32, 64) and mb.num_proposals == 1000 and mb.batch_size_per_image == 512
    assert mb.mask_head.loss_weight == pytest.approx(15.96) and mb.mask_iou_head.loss_weight == pytest.approx(6.0)
    assert tuple(cfg.dataloader.evaluator.tasks) == ("bbox", "segm")
    assert cfg.dataloader.evaluator.max_dets_per_image == 1000
    if name == "co_dino_vitl_lvis_instance.py":  # LSJ + copy-paste, the pasted masks kept as targets
        assert cfg.dataloader.train.dataset.keep_masks is True
        assert cfg.dataloader.train.dataset.mapper.use_instance_mask
    else:
        assert cfg.dataloader.train.mapper.use_instance_mask
        assert cfg.dataloader.train.mapper.instance_mask_format == "bitmask"
    path = str(tmp_path / "cfg.yaml")
    LazyConfig.save(cfg, path)
    again = LazyConfig.load(path)
    assert again.model.mask_branch.mask_head.num_classes == num_classes
    assert again.model.mask_branch.mask_head.stage_sizes == [14, 28, 56, 112]
    # the full-size mask branch: as many parameters as the official heads
    branch = instantiate(cfg.model.mask_branch)
    assert isinstance(branch, InstanceMaskBranch)
    layout = official_mask_layout(num_classes)
    official = sum(torch.Size(s).numel() for s, _ in layout.values())
    assert sum(p.numel() for p in branch.parameters()) == official


def test_instance_official_checkpoint_converts_exactly(tmp_path):
    cfg = load("co_dino_vitl_instance.py", SHRINK["co_dino_vitl.py"] + R50_HEAD)
    model = instantiate(cfg.model)
    sd = fake_official_vit_checkpoint(str(tmp_path / "det.pth"))
    mask_sd = random_state_dict(official_mask_layout(80))
    sd.update(mask_sd)
    converted, report = convert_official_state_dict(sd, model.state_dict())
    assert report.ok and not report.missing and not report.unexpected and not report.shape_mismatch
    model.load_state_dict(converted)
    mh = model.mask_branch.mask_head
    assert torch.equal(mh.instance_convs[0].weight, mask_sd["mask_head.instance_convs.0.conv.weight"])
    assert torch.equal(mh.semantic_convs[1].norm.bias, mask_sd["mask_head.semantic_convs.1.norm_layer.bias"])
    assert torch.equal(mh.stages[2].fuse_conv[1].dilation_conv_3.bias,
                       mask_sd["mask_head.stages.2.fuse_conv.1.dilation_conv_3.conv.bias"])
    assert torch.equal(model.mask_branch.mask_iou_head.fc_mask_iou.weight, mask_sd["mask_iou_head.fc_mask_iou.weight"])
    # LVIS (1203 classes): the mask keys alone onto the mask branch
    lvis = instantiate(load("co_dino_vitl_lvis_instance.py").model.mask_branch)
    target = {f"mask_branch.{k}": v for k, v in lvis.state_dict().items()}
    _, rep = convert_official_state_dict(random_state_dict(official_mask_layout(1203)), target)
    assert rep.ok and not rep.missing and not rep.unexpected


def test_demo_instance_config_training_step(one_thread):
    """The real demo-sized Co-DINO-Inst (configs/demo/co_dino_inst_synthetic.py: ResNet-18, DINO head, both aux
    heads, mask branch): finite mask losses on an image with masks, and the mask loss reaches the encoder."""
    import sys

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from test_mask_head import _inputs_with_masks

    cfg = load("demo/co_dino_inst_synthetic.py")
    torch.manual_seed(0)
    model = instantiate(cfg.model)
    model.train()
    from detectron2.utils.events import EventStorage

    with EventStorage():  # detectron2's RPN / RoI heads log to it
        losses = model(_inputs_with_masks(n_images=1, h=128, w=160))
    assert {"loss_mask", "loss_mask_iou"} <= set(losses)
    assert all(torch.isfinite(v) for v in losses.values()) and float(losses["loss_mask"]) > 0
    losses["loss_mask"].backward()
    enc = [p.grad for n, p in model.named_parameters() if "transformer.encoder" in n and p.grad is not None]
    assert enc and sum(float(g.abs().sum()) for g in enc) > 0
