"""Checkpoints this project wrote before two renames still load in full, into the model and into its EMA copy:
the neck's and the ATSS towers' conv + GN became detectron2 ``Conv2d`` (parameter names ``<m>.conv.weight`` /
``<m>.gn.*``), and the collaborative branch's own extra stride-2 map (``collaborative.downsample.{0,1}.*``) became
the multi-scale adapter's stride-128 level (``collaborative.adapter.downsample.0.{0,1}.*``)."""
import os

import pytest
import torch
from detectron2.config import LazyConfig, instantiate
from detectron2.layers import Conv2d
from torch import nn

from codetr.checkpoint import CoDETRCheckpointer
from codetr.checkpoint.checkpointer import rename_legacy_keys
from codetr.engine.ema import ModelEMA

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXTRA_MAP = "collaborative.adapter.downsample.0."


def _build(seed, name="configs/demo/co_dino_synthetic.py"):
    cfg = LazyConfig.load(os.path.join(REPO, name))
    torch.manual_seed(seed)
    return instantiate(cfg.model)


def _old_names(model, conv_gn_names=True, extra_map_names=True):
    """The model's state dict under the former names: the ``ConvNorm`` submodules ``conv`` and ``gn``
    (``conv_gn_names``) and the branch's own ``collaborative.downsample`` (``extra_map_names``)."""
    conv_gn = [
        name for name, m in model.named_modules()
        if isinstance(m, Conv2d) and isinstance(m.norm, nn.GroupNorm)
        and (name.startswith("neck.") or ".cls_convs." in name or ".reg_convs." in name)
    ]
    assert any(n.startswith("neck.") for n in conv_gn) and any("_convs." in n for n in conv_gn)
    old = {}
    for key, value in model.state_dict().items():
        prefix, _, leaf = key.rpartition(".")
        if conv_gn_names and prefix in conv_gn and leaf == "weight":
            key = f"{prefix}.conv.weight"
        elif conv_gn_names and prefix.endswith(".norm") and prefix[: -len(".norm")] in conv_gn:
            key = f"{prefix[: -len('.norm')]}.gn.{leaf}"
        elif extra_map_names and key.startswith(EXTRA_MAP):
            key = "collaborative.downsample." + key[len(EXTRA_MAP):]
        old[key] = value.clone()
    return old, conv_gn


@pytest.mark.parametrize("conv_gn_names,extra_map_names", [(True, True), (True, False), (False, True)])
def test_older_checkpoint_loads_into_model_and_ema(tmp_path, conv_gn_names, extra_map_names):
    trained = _build(seed=1)
    assert sorted(k for k in trained.state_dict() if k.startswith(EXTRA_MAP)) == [
        EXTRA_MAP + "0.bias", EXTRA_MAP + "0.weight", EXTRA_MAP + "1.bias", EXTRA_MAP + "1.weight"]
    old, conv_gn = _old_names(trained, conv_gn_names, extra_map_names)
    expected_old = 3 * len(conv_gn) * conv_gn_names + 4 * extra_map_names  # conv: weight, norm.weight, norm.bias
    assert len(set(old) - set(trained.state_dict())) == expected_old
    if extra_map_names:
        assert "collaborative.downsample.0.weight" in old and "collaborative.downsample.1.bias" in old
    path = str(tmp_path / "old.pth")
    torch.save({"model": old, "model_ema": {"model": old, "num_updates": 7}, "iteration": 5}, path)

    fresh = _build(seed=2)
    ema = ModelEMA(fresh)
    result = CoDETRCheckpointer(fresh, model_ema=ema).load(path)
    assert result["iteration"] == 5
    want = trained.state_dict()
    for copy in (fresh, ema.model):
        got = copy.state_dict()
        assert got.keys() == want.keys()
        for k in want:
            assert torch.equal(got[k], want[k]), k
    assert ema.num_updates == 7


def test_extra_map_rename_targets_the_adapters_last_coarser_level_and_never_a_current_key():
    keys = ["collaborative.adapter.downsample.0.0.weight", "collaborative.adapter.downsample.1.0.weight",
            "collaborative.adapter.downsample.1.1.bias", "module.collaborative.adapter.downsample.0.0.weight"]
    sd = {"collaborative.downsample.0.weight": 1, "collaborative.downsample.1.bias": 2,
          "module.collaborative.downsample.0.weight": 3, "collaborative.downsample.2.weight": 4}
    assert rename_legacy_keys(sd, keys) == 3
    assert sd == {"collaborative.adapter.downsample.1.0.weight": 1, "collaborative.adapter.downsample.1.1.bias": 2,
                  "module.collaborative.adapter.downsample.0.0.weight": 3, "collaborative.downsample.2.weight": 4}
    # a model without an adapter level of that name (Co-DAB-DETR's current keys, say) is left alone
    sd = {"collaborative.adapter.downsample.0.0.weight": 5}
    assert rename_legacy_keys(sd, ["collaborative.adapter.downsample.0.0.weight"]) == 0 and sd == {
        "collaborative.adapter.downsample.0.0.weight": 5}
