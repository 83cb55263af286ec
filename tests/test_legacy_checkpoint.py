"""Checkpoints this project wrote before the neck's and the ATSS towers' conv + GN became detectron2 ``Conv2d``
(parameter names ``<m>.conv.weight`` / ``<m>.gn.*``) still load in full, into the model and into its EMA copy."""
import os

import torch
from detectron2.config import LazyConfig, instantiate
from detectron2.layers import Conv2d
from torch import nn

from codetr.checkpoint import CoDETRCheckpointer
from codetr.engine.ema import ModelEMA

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _build(seed):
    cfg = LazyConfig.load(os.path.join(REPO, "configs/demo/co_dino_synthetic.py"))
    torch.manual_seed(seed)
    return instantiate(cfg.model)


def _old_names(model):
    """The model's state dict under the names of the former ``ConvNorm`` (submodules ``conv`` and ``gn``)."""
    conv_gn = [
        name for name, m in model.named_modules()
        if isinstance(m, Conv2d) and isinstance(m.norm, nn.GroupNorm)
        and (name.startswith("neck.") or ".cls_convs." in name or ".reg_convs." in name)
    ]
    assert any(n.startswith("neck.") for n in conv_gn) and any("_convs." in n for n in conv_gn)
    old = {}
    for key, value in model.state_dict().items():
        prefix, _, leaf = key.rpartition(".")
        if prefix in conv_gn and leaf == "weight":
            key = f"{prefix}.conv.weight"
        elif prefix.endswith(".norm") and prefix[: -len(".norm")] in conv_gn:
            key = f"{prefix[: -len('.norm')]}.gn.{leaf}"
        old[key] = value.clone()
    return old, conv_gn


def test_pre_rename_checkpoint_loads_into_model_and_ema(tmp_path):
    trained = _build(seed=1)
    old, conv_gn = _old_names(trained)
    assert len(set(old) - set(trained.state_dict())) == 3 * len(conv_gn)  # weight, norm.weight, norm.bias each
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
