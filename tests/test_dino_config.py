"""configs/co_dino_r50.py and configs/dino_r50.py: instantiate, official settings, LazyConfig round trip."""
import os
import sys

import pytest
import torch

from detectron2.config import LazyConfig, instantiate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
from dino_utils import one_thread  # noqa: F401,E402 (fixture)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def cfg():
    return LazyConfig.load(os.path.join(ROOT, "configs", "co_dino_r50.py"))


def test_config_settings(cfg):
    head = cfg.model.query_head
    assert head.transformer.num_queries == 900 and head.num_dn_queries == 100
    assert head.transformer.num_levels == 5 and head.transformer.num_encoder_layers == 6
    assert cfg.model.postprocessor.soft_nms is True and cfg.model.postprocessor.max_per_img == 300
    assert cfg.optimizer.lr == 2e-4 and cfg.optimizer.weight_decay == 1e-4
    assert cfg.train.clip_grad == dict(enabled=True, max_norm=0.1, norm_type=2.0)
    assert cfg.train.amp.enabled is False
    m = cfg.lr_multiplier
    assert list(m["milestones"]) == [11 * 7330] and list(m["values"]) == [1.0, 0.1]
    sched = instantiate(m)  # fvcore accepts it: len(values) - 1 milestones with num_updates
    assert sched(0.5) == 1.0 and sched(11.5 / 12) == 0.1
    assert cfg.train.max_iter == 12 * 7330
    assert cfg.dataloader.train.dataset.names == "coco_2017_train"
    assert cfg.dataloader.train.mapper._target_.__name__ == "DetrDatasetMapper"  # box-only mapper
    assert cfg.dataloader.evaluator.max_dets_per_image == 300


def test_config_instantiates_and_optimizer_groups(cfg):
    model = instantiate(cfg.model)
    model.eval()
    assert model.collaborative is not None and len(model.collaborative.aux_heads) == 2  # Co-DINO
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert not any(n.startswith(("backbone.stem.", "backbone.res2.")) for n in trainable)
    assert "backbone.res3.0.conv1.weight" in trainable
    cfg.optimizer.params.model = model
    opt = instantiate(cfg.optimizer)
    lr_of = {}
    for group in opt.param_groups:
        for p in group["params"]:
            lr_of[id(p)] = group["lr"]
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert lr_of[id(p)] == pytest.approx(2e-5 if n.startswith("backbone.") else 2e-4), n
    cfg.optimizer.params.model = None


def test_lazyconfig_save_load_round_trip(cfg, tmp_path):
    for name in ("co_dino_r50.py", "dino_r50.py"):
        c = LazyConfig.load(os.path.join(ROOT, "configs", name))
        path = str(tmp_path / name.replace(".py", ".yaml"))
        LazyConfig.save(c, path)
        assert os.path.exists(path), "LazyConfig.save fell back to pickle: the config is not serialisable"
        c2 = LazyConfig.load(path)
        path2 = str(tmp_path / ("again_" + name.replace(".py", ".yaml")))
        LazyConfig.save(c2, path2)
        with open(path) as f1, open(path2) as f2:
            assert f1.read() == f2.read()
        assert c2.model.query_head.transformer.num_queries == 900
        assert c2.train.clip_grad.max_norm == 0.1
        # the reloaded optimizer still applies the backbone lr factor
        factor = instantiate(c2.optimizer.params.lr_factor_func)
        assert factor("backbone.res3.0.conv1.weight") == 0.1 and factor("query_head.cls_branches.0.weight") == 1.0


def test_dino_baseline_does_not_touch_collaborative():
    sys.modules.pop("codetr.modeling.collaborative", None)
    c = LazyConfig.load(os.path.join(ROOT, "configs", "dino_r50.py"))
    assert c.model.collaborative is None and c.model.query_head.transformer.num_co_heads == 0
    assert "codetr.modeling.collaborative" not in sys.modules
