"""Choosing the auxiliary heads by one list: the Co-DINO configs with ATSS + FCOS, ATSS + RetinaNet and Faster R-CNN +
ATSS + FCOS (loss weights x12, head indices, one positive-query projection per head), the list functions against
Co-DINO's own heads, a tiny Co-DINO training step with each head set, and an overfit check of Co-DINO with FCOS."""
import os

import pytest
import torch
from detectron2.config import LazyConfig, instantiate
from detectron2.utils.events import EventStorage
from omegaconf import OmegaConf

from codetr import model_zoo
from codetr.modeling.atss import ATSSHead
from codetr.modeling.adapter import MultiScaleAdapter
from codetr.modeling.collaborative import CollaborativeBranch
from codetr.modeling.dense_heads import FCOSAuxHead, RetinaNetAuxHead
from codetr.modeling.rcnn import RCNNBranch
from dino_utils import one_thread, random_input, tiny_model  # noqa: F401 (fixture)

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_CLASSES = 3
VARIANTS = {
    "co_dino_r50_atss_fcos.py": [ATSSHead, FCOSAuxHead],
    "co_dino_r50_atss_retinanet.py": [ATSSHead, RetinaNetAuxHead],
    "co_dino_r50_3heads.py": [RCNNBranch, ATSSHead, FCOSAuxHead],
}
# every loss of every head x 12 (num_dec_layer 6 x lambda_2 2) on the head's base weight
BASE_WEIGHTS = {
    RCNNBranch: dict(loss_rpn_cls_weight=1, loss_rpn_bbox_weight=1, loss_cls_weight=1, loss_bbox_weight=10),
    ATSSHead: dict(loss_cls_weight=1, loss_bbox_weight=2, loss_centerness_weight=1),
    FCOSAuxHead: dict(loss_cls_weight=1, loss_bbox_weight=1, loss_centerness_weight=1),
    RetinaNetAuxHead: dict(loss_cls_weight=1, loss_bbox_weight=1),
}


def load(name, overrides=()):
    return LazyConfig.apply_overrides(LazyConfig.load(os.path.join(REPO, "configs", name)), list(overrides))


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_variant_configs(name):
    cfg = model_zoo.get_config(name)
    heads = cfg.model.collaborative.aux_heads
    assert [h._target_ for h in heads] == VARIANTS[name]
    assert cfg.model.query_head.transformer.num_co_heads == len(heads)
    for i, h in enumerate(heads):
        assert h.head_index == i and tuple(h.strides) == (4, 8, 16, 32, 64, 128)
        assert {k: h[k] for k in BASE_WEIGHTS[h._target_]} == {k: 12 * v for k, v in BASE_WEIGHTS[h._target_].items()}
    over = LazyConfig.apply_overrides(cfg, ["model.query_head.num_classes=7"])
    model = instantiate(over.model)
    assert [type(h) for h in model.collaborative.aux_heads] == VARIANTS[name]
    assert all(h.num_classes == 7 for h in model.collaborative.aux_heads) and model.query_head.num_co_heads == len(heads)


def test_list_functions_reproduce_co_dinos_heads():
    """rcnn(0, ...) and atss(1, ...) of common/models/aux_heads.py are exactly the heads of configs/co_dino_r50.py."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("aux_heads_cfg", os.path.join(REPO, "configs", "common", "models", "aux_heads.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    ref = load("co_dino_r50.py").model.collaborative.aux_heads
    for ours, theirs in zip([mod.rcnn(0, mod.CO_DINO_STRIDES), mod.atss(1, mod.CO_DINO_STRIDES)], ref):
        assert ours._target_ is theirs._target_
        ours, theirs = (OmegaConf.to_container(OmegaConf.create(x), resolve=False) for x in (ours, theirs))
        assert ours.pop("strides") == list(theirs.pop("strides"))
        assert ours == theirs


def tiny_heads(kinds, embed_dim=64, gn=8):
    strides = (4, 8, 16, 32, 64)
    heads = []
    for i, kind in enumerate(kinds):
        if kind == "rcnn":
            heads.append(RCNNBranch(num_classes=NUM_CLASSES, in_channels=embed_dim, strides=strides, num_roi_levels=4,
                                    fc_dim=64, rpn_batch_size_per_image=64, rpn_pre_nms_topk=(300, 100),
                                    rpn_post_nms_topk=(100, 100), roi_batch_size_per_image=64, loss_rpn_cls_weight=4.0,
                                    loss_rpn_bbox_weight=4.0, loss_cls_weight=4.0, loss_bbox_weight=40.0, head_index=i))
        elif kind == "atss":
            heads.append(ATSSHead(num_classes=NUM_CLASSES, in_channels=embed_dim, feat_channels=embed_dim, strides=strides,
                                  num_gn_groups=gn, loss_cls_weight=4.0, loss_bbox_weight=8.0, loss_centerness_weight=4.0,
                                  head_index=i))
        elif kind == "fcos":
            heads.append(FCOSAuxHead(num_classes=NUM_CLASSES, in_channels=embed_dim, strides=strides, conv_dims=(embed_dim,),
                                     loss_cls_weight=4.0, loss_bbox_weight=4.0, loss_centerness_weight=4.0, head_index=i))
        else:
            heads.append(RetinaNetAuxHead(num_classes=NUM_CLASSES, in_channels=embed_dim, strides=strides,
                                          conv_dims=(embed_dim,), loss_cls_weight=4.0, loss_bbox_weight=4.0, head_index=i))
    adapter = MultiScaleAdapter(strides[:-1], strides, embed_dim=embed_dim, num_gn_groups=gn)
    return CollaborativeBranch(aux_heads=heads, num_classes=NUM_CLASSES, adapter=adapter)


HEAD_KEYS = {"rcnn": ("loss_rpn_cls", "loss_rpn_bbox", "loss_cls", "loss_bbox"), "atss": ("loss_cls", "loss_bbox", "loss_centerness"),
             "fcos": ("loss_cls", "loss_bbox", "loss_centerness"), "retinanet": ("loss_cls", "loss_bbox")}


@pytest.mark.parametrize("kinds", [("atss", "fcos"), ("atss", "retinanet"), ("rcnn", "atss", "fcos")])
def test_tiny_co_dino_training_step_with_each_head_set(kinds):
    torch.manual_seed(0)
    model = tiny_model(num_classes=NUM_CLASSES, num_co_heads=len(kinds))
    model.collaborative = tiny_heads(kinds)
    g = torch.Generator().manual_seed(0)
    batch = [random_input(64, 96, 3, NUM_CLASSES, "a.jpg", g), random_input(80, 64, 1, NUM_CLASSES, "b.jpg", g)]
    model.train()
    with EventStorage():
        losses = model(batch)
    expect = {f"{k}{i}" for i, kind in enumerate(kinds) for k in HEAD_KEYS[kind]}
    expect |= {f"{p}{n}_aux{i}" for i in range(len(kinds)) for p in ("", "d0.") for n in ("loss_cls", "loss_bbox", "loss_iou")}
    assert expect <= set(losses)
    assert not any(k.endswith(f"_aux{len(kinds)}") for k in losses)
    for k, v in losses.items():
        assert v.ndim == 0 and torch.isfinite(v), k
    for i in range(len(kinds)):
        assert losses[f"loss_bbox_aux{i}"] > 0  # every head's positives reached the decoder
    sum(losses.values()).backward()
    assert not [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]


def test_tiny_co_dino_with_fcos_overfits_to_ap50(tmp_path):
    """The learning check of test_dino_overfit.py (AP50 >= 90 of the one-to-one head), Co-DINO with ATSS + FCOS."""
    from test_dino_overfit import make_data, overfit_evaluator, train_until_ap50

    torch.manual_seed(0)
    inputs, dicts = make_data()
    evaluator = overfit_evaluator("codetr_test_co_dino_fcos_overfit", dicts, tmp_path)
    model = tiny_model(num_queries=15, num_dn_queries=10, embed_dim=32, width=16, num_co_heads=2)
    model.collaborative = tiny_heads(("atss", "fcos"), embed_dim=32)
    history = train_until_ap50(model, inputs, evaluator)
    print(f"\ntiny Co-DINO (ATSS + FCOS) overfit: history {history}")
    assert history[-1][1] >= 90.0, history
