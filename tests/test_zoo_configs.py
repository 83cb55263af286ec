"""Large-backbone configs (ViT-L COCO/LVIS, Swin-L) and the model zoo: instantiation, LazyConfig round trip, the
official settings, the full ViT-L parameter count, layer-decay groups, and official weights through get()."""
import os

import pytest
import torch
from detectron2.config import LazyConfig, instantiate

from codetr import model_zoo
from codetr.checkpoint.official import OfficialCheckpointError
from codetr.modeling.backbone import COCO_GLOBAL_BLOCKS, LVIS_GLOBAL_BLOCKS, vit_layer_decay_param_groups
from test_official_checkpoint import R50_TSV, official_vit_sfp_layout, random_state_dict, read_tsv
from test_vit_backbone import expected_layer_id

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = ["co_dino_vitl.py", "co_dino_vitl_lvis.py", "co_dino_swinl.py"]
SHRINK = {
    "co_dino_vitl.py": [
        "model.backbone.embed_dim=64", "model.backbone.depth=2", "model.backbone.num_heads=4",
        "model.backbone.global_block_indexes=[1]", "model.backbone.window_size=4", "model.backbone.pretrain_img_size=64",
        "model.neck.in_channels=64",
    ],
    "co_dino_swinl.py": [],  # Swin-L shrunk below (a factory function: its arguments are fixed)
}
SHRINK["co_dino_vitl_lvis.py"] = SHRINK["co_dino_vitl.py"]


def load(name, overrides=()):
    return LazyConfig.apply_overrides(LazyConfig.load(os.path.join(REPO, "configs", name)), list(overrides))


def small_swin(cfg):
    from detectron2.config import LazyCall as L
    from detectron2.modeling.backbone.swin import SwinTransformer

    cfg.model.backbone = L(SwinTransformer)(embed_dim=32, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), window_size=4,
                                            out_indices=(0, 1, 2, 3))
    cfg.model.neck.in_channels = [32, 64, 128, 256]
    return cfg


def n_params(module):
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("name", CONFIGS)
def test_config_round_trip_and_instantiate_shrunk(name, tmp_path):
    cfg = load(name, SHRINK[name])
    path = str(tmp_path / "cfg.yaml")
    LazyConfig.save(cfg, path)
    again = LazyConfig.load(path)
    path2 = str(tmp_path / "cfg2.yaml")
    LazyConfig.save(again, path2)
    with open(path) as f1, open(path2) as f2:
        assert f1.read() == f2.read()  # nothing lost in the round trip
    assert not os.path.exists(path + ".pkl")  # LazyConfig.save fell back to pickle: something was not serialisable
    cfg = again  # build from the reloaded config
    if name == "co_dino_swinl.py":
        cfg = small_swin(cfg)
    model = instantiate(cfg.model)
    assert model.collaborative is not None and len(model.collaborative.aux_heads) == 2
    assert model.query_head.num_co_heads == 2
    # optimizer and schedule instantiate on the model
    cfg.optimizer.params.model = model
    opt = instantiate(cfg.optimizer)
    assert sum(len(g["params"]) for g in opt.param_groups) == sum(1 for p in model.parameters() if p.requires_grad)
    sched = instantiate(cfg.lr_multiplier)
    assert sched(0.0) > 0 and sched(0.999) < 1.0


def test_vitl_coco_official_settings():
    cfg = load("co_dino_vitl.py")
    bb, qh = cfg.model.backbone, cfg.model.query_head
    assert (bb.embed_dim, bb.depth, bb.num_heads, bb.window_size, bb.patch_size) == (1024, 24, 16, 24, 16)
    assert tuple(bb.global_block_indexes) == COCO_GLOBAL_BLOCKS and bb.drop_path_rate == 0.4
    assert bb.pretrain_img_size == 512 and bb.use_act_checkpoint
    assert qh.transformer.num_queries == 1500 and qh.num_dn_queries == 300 and qh.box_noise_scale == 0.4
    assert cfg.model.postprocessor.max_per_img == 1000 and cfg.model.postprocessor.soft_nms
    assert cfg.optimizer.lr == 5e-5 and cfg.optimizer.weight_decay == 0.01 and cfg.optimizer.params.decay_rate == 0.8
    assert cfg.train.model_ema.enabled and cfg.train.model_ema.momentum == 1e-4
    assert cfg.train.clip_grad.max_norm == 0.1
    sched = instantiate(cfg.lr_multiplier)
    total = cfg.train.max_iter
    assert sched(0.0) == pytest.approx(0.01)  # linear warm-up from 0.01
    assert sched(600 / total) == pytest.approx(1.0) and sched((7.5 / 12)) == pytest.approx(0.1)
    aug = instantiate(cfg.dataloader.train.mapper.augmentations)
    assert len(aug) == 2  # flip + (multi-scale resize | resize-crop-resize)
    ev = cfg.dataloader.evaluator
    assert LazyConfig.to_py(cfg)  # interpolations resolve
    from omegaconf import OmegaConf

    assert OmegaConf.select(cfg, "dataloader.evaluator.max_dets_per_image") == 1000 and ev.dataset_name


def test_vitl_lvis_and_swinl_official_settings():
    from omegaconf import OmegaConf

    cfg = load("co_dino_vitl_lvis.py")
    bb = cfg.model.backbone
    assert bb.window_size == 16 and tuple(bb.global_block_indexes) == LVIS_GLOBAL_BLOCKS and bb.drop_path_rate == 0.3
    assert cfg.model.query_head.num_classes == 1203 and cfg.model.with_attn_mask is False
    assert OmegaConf.select(cfg, "model.collaborative.aux_heads.1.num_classes") == 1203
    assert OmegaConf.select(cfg, "dataloader.evaluator.max_dets_per_image") == 1000
    assert cfg.dataloader.train.dataset.dataset.names == "lvis_v1_train"
    assert cfg.dataloader.test.dataset.names == "lvis_v1_val"
    assert cfg.dataloader.train.dataset.mapper.augmentations.image_size == 1536
    assert cfg.dataloader.train.dataset.max_num_pasted == 100 and cfg.dataloader.train.mapper is None
    # repeat factors are computed on the plain LVIS dicts under the copy-paste dataset
    dicts = cfg.dataloader.train.sampler.repeat_factors.dataset_dicts
    assert dicts.names == "lvis_v1_train" and "max_num_pasted" not in dicts
    assert LazyConfig.to_py(cfg)
    assert cfg.optimizer.weight_decay == 0.05
    swin = load("co_dino_swinl.py")
    assert swin.model.backbone.drop_path_rate == 0.3 and list(swin.model.neck.in_channels) == [192, 384, 768, 1536]
    assert swin.model.query_head.transformer.num_checkpoint == 6


def test_shrunk_vitl_inference_through_the_detector():
    cfg = load("co_dino_vitl.py", SHRINK["co_dino_vitl.py"] + ["model.query_head.transformer.num_queries=50",
                                                    "model.postprocessor.max_per_img=100"])
    model = instantiate(cfg.model).eval()
    g = torch.Generator().manual_seed(0)
    img = torch.randint(0, 256, (3, 70, 100), generator=g, dtype=torch.uint8)
    with torch.no_grad():
        out = model([{"image": img, "height": 140, "width": 200}])
    inst = out[0]["instances"]
    assert len(inst) > 0 and inst.pred_boxes.tensor.shape[1] == 4
    assert inst.image_size == (140, 200)


def test_full_vitl_builds_param_counts_and_layer_decay_for_every_parameter():
    model = instantiate(load("co_dino_vitl.py").model)
    # independent count of the official ViT-L: d = 1024, SwiGLU hidden int(1024 * 8/3) = 2730, 24 blocks,
    # patch 16x16x3 conv, 32 x 32 + 1 position slots
    d, h = 1024, 2730
    block = 2 * d + 3 * d * d + 2 * d + d * d + d + 2 * d + 2 * (d * h + h) + 2 * h + h * d + d
    expected_backbone = 24 * block + (3 * 16 * 16 * d + d) + 1025 * d + 2 * d
    assert n_params(model.backbone) == expected_backbone
    training_only = n_params(model.collaborative) + model.query_head.label_embedding.weight.numel()
    training_only += n_params(model.query_head.transformer.aux_pos_trans) + n_params(model.query_head.transformer.aux_pos_trans_norm)
    total = n_params(model)
    print(f"\nco_dino_vitl: backbone {n_params(model.backbone):,}, neck {n_params(model.neck):,}, total {total:,}, "
          f"inference-only {total - training_only:,}")
    groups = vit_layer_decay_param_groups(model, base_lr=5e-5, weight_decay=0.01, decay_rate=0.8, num_layers=24)
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    wd_of = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    for n, p in model.named_parameters():
        assert lr_of[id(p)] == pytest.approx(5e-5 * 0.8 ** (25 - expected_layer_id(n)), rel=1e-12), n
        assert wd_of[id(p)] == (0.0 if (p.ndim == 1 or n.endswith(".bias")) else 0.01), n


def test_model_zoo_url_table_and_config_side():
    assert set(model_zoo.OFFICIAL_WEIGHTS) == {"co_dino_r50.py", "co_dino_swinl.py", "co_dino_vitl.py",
                                                "co_dino_vitl_lvis.py", "co_deformable_detr_r50.py"}
    for name, w in model_zoo.OFFICIAL_WEIGHTS.items():
        assert os.path.isfile(model_zoo.get_config_file(name))
        assert w.url.startswith("https://") and w.official_config.endswith(".py") and 0 < w.box_ap < 100
        if w.direct:
            assert w.url.startswith("https://huggingface.co/zongzhuofan/") and w.url.endswith("/pytorch_model.pth")
    cfg = model_zoo.get_config("co_dino_vitl", trained=True)
    assert cfg.train.init_checkpoint == model_zoo.OFFICIAL_WEIGHTS["co_dino_vitl.py"].url
    assert model_zoo.get_config("co_dino_vitl.py").train.init_checkpoint == ""
    with pytest.raises(RuntimeError, match="Google Drive"):
        model_zoo.get_config("co_dino_r50.py", trained=True)
    with pytest.raises(RuntimeError, match="not found"):
        model_zoo.get_config_file("no_such_config.py")


def fake_official_vit_checkpoint(path, drop=None):
    """An official-format Co-DINO checkpoint for the shrunk ViT config: head/aux keys from the official R50 list,
    backbone/neck keys from the official ViT/SFP code."""
    layout = {k: v for k, v in read_tsv(R50_TSV).items() if not k.startswith(("backbone.", "neck."))}
    layout.update(official_vit_sfp_layout(depth=2, dim=64, heads=4, hidden=int(64 * 4 * 2 / 3), pre_grid=4,
                                          window_blocks=(0,), c_out=256))
    sd = random_state_dict(layout)
    if drop:
        del sd[drop]
    torch.save({"state_dict": sd, "meta": {"epoch": 12, "CLASSES": ("a",) * 80}}, path)
    return sd


def test_model_zoo_get_trained_routes_through_the_converter(tmp_path):
    # the shrunk ViT-L config, with the R50-style RoI head and 900 queries of the official R50 key list
    overrides = SHRINK["co_dino_vitl.py"] + [
        "model.query_head.transformer.num_queries=900", "model.collaborative.aux_heads.0.num_conv=0",
        "model.collaborative.aux_heads.0.conv_norm=", "model.collaborative.aux_heads.0.num_fc=2",
        "model.collaborative.aux_heads.0.cls_agnostic_bbox_reg=False",
    ]
    path = str(tmp_path / "official.pth")
    sd = fake_official_vit_checkpoint(path)
    model = model_zoo.get("co_dino_vitl.py", trained=True, device="cpu", checkpoint=path, overrides=overrides)
    assert torch.equal(model.backbone.blocks[1].mlp.fc2.weight, sd["backbone.blocks.1.mlp.w3.weight"])
    assert torch.equal(model.query_head.transformer.query_embed.weight, sd["query_head.transformer.query_embed.weight"])
    assert torch.equal(model.collaborative.aux_heads[1].atss_cls.bias, sd["bbox_head.0.atss_cls.bias"])
    bad = str(tmp_path / "incomplete.pth")
    fake_official_vit_checkpoint(bad, drop="query_head.label_embedding.weight")
    with pytest.raises(OfficialCheckpointError, match="query_head.label_embedding.weight"):
        model_zoo.get("co_dino_vitl.py", trained=True, device="cpu", checkpoint=bad, overrides=overrides)


@pytest.mark.parametrize("name,expect", [("co_dino_vitl.py", (1280, 1920)), ("co_dino_vitl_lvis.py", (1024, 1536))])
def test_test_time_mapper_sizes(name, expect, tmp_path):
    """COCO ViT-L: short side 1280, long side <= 2048; LVIS: long side 1536, not padded by the mapper (the model
    pads to 1536 x 1536 with 114: tests/test_test_time_scaling.py)."""
    import cv2
    import numpy as np

    path = str(tmp_path / "img.jpg")
    cv2.imwrite(path, np.full((200, 300, 3), 50, np.uint8))
    mapper = instantiate(load(name).dataloader.test.mapper)
    out = mapper({"file_name": path, "height": 200, "width": 300, "image_id": 1})
    assert tuple(out["image"].shape[1:]) == expect
