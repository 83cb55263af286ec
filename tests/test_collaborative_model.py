"""Co-DINO end to end on CPU: the tiny CoDETR of dino_utils with the collaborative branch attached."""
import copy

import pytest
import torch

from detectron2.utils.events import EventStorage

from codetr.modeling.adapter import MultiScaleAdapter
from codetr.modeling.atss import ATSSHead
from codetr.modeling.collaborative import CollaborativeBranch
from codetr.modeling.rcnn import RCNNBranch
from dino_utils import autograd_node_names, one_thread, random_input, tiny_model  # noqa: F401 (fixture)

pytestmark = pytest.mark.usefixtures("one_thread")

NUM_CLASSES = 3
AUX_HEAD_KEYS = {
    "loss_rpn_cls0", "loss_rpn_bbox0", "loss_cls0", "loss_bbox0",  # Faster R-CNN branch
    "loss_cls1", "loss_bbox1", "loss_centerness1",  # ATSS
}


def tiny_collaborative(embed_dim=64, num_classes=NUM_CLASSES, num_gn_groups=32, return_feats=False, adapter=None,
                       **branch_kwargs):
    """Aux heads on the tiny model's 4 encoder levels (strides 4..32) + the adapter's stride-64 map (``adapter``:
    default the identity path on 4..32 + one stride-2 level; a single-scale DETR's pyramid of the same strides);
    ``branch_kwargs`` go to the CollaborativeBranch. The adapter is built after the heads."""
    strides = (4, 8, 16, 32, 64)
    heads = [
        RCNNBranch(num_classes=num_classes, in_channels=embed_dim, strides=strides, num_roi_levels=4, fc_dim=64,
                   rpn_batch_size_per_image=64, rpn_pre_nms_topk=(300, 100), rpn_post_nms_topk=(100, 100),
                   roi_batch_size_per_image=64,  # small samples keep the CPU test fast
                   loss_rpn_cls_weight=4.0, loss_rpn_bbox_weight=4.0, loss_cls_weight=4.0, loss_bbox_weight=40.0,
                   return_feats=return_feats),
        ATSSHead(num_classes=num_classes, in_channels=embed_dim, feat_channels=embed_dim, strides=strides,
                 num_gn_groups=num_gn_groups,
                 loss_cls_weight=4.0, loss_bbox_weight=8.0, loss_centerness_weight=4.0, return_feats=return_feats),
    ]
    if adapter is None:
        adapter = MultiScaleAdapter(strides[:-1], strides, embed_dim=embed_dim, num_gn_groups=num_gn_groups)
    return CollaborativeBranch(aux_heads=heads, num_classes=num_classes, adapter=adapter, **branch_kwargs)


def tiny_codino(**kw):
    model = tiny_model(num_classes=NUM_CLASSES, num_co_heads=2, **kw)
    model.collaborative = tiny_collaborative()
    return model


def _batch(seed=0, counts=(3, 1)):
    g = torch.Generator().manual_seed(seed)
    sizes = [(64, 96), (80, 64)]
    return [random_input(*sizes[i % 2], n, num_classes=NUM_CLASSES, name=f"img{i}.jpg", generator=g)
            for i, n in enumerate(counts)]


def _grad_norm(module):
    return sum(p.grad.abs().sum().item() for p in module.parameters() if p.grad is not None)


def test_training_step_losses_and_gradients():
    """One training step (one image without GT in the batch): finite losses for every head; the aux heads' own
    losses reach the encoder (not the decoder), the positive-query losses reach the decoder; every trainable
    parameter gets a gradient from the total."""
    torch.manual_seed(0)
    model = tiny_codino()
    model.train()
    with EventStorage():
        losses = model(_batch(0, counts=(3, 0)))
    aux_query_keys = {f"{p}{n}_aux{i}" for i in (0, 1) for p in ("", "d0.") for n in ("loss_cls", "loss_bbox", "loss_iou")}
    assert AUX_HEAD_KEYS | aux_query_keys <= set(losses)
    assert {"loss_cls", "loss_bbox", "loss_iou", "enc_loss_cls"} <= set(losses)  # the one-to-one branch
    for k, v in losses.items():
        assert v.ndim == 0 and torch.isfinite(v), k
    for k in AUX_HEAD_KEYS | {"loss_bbox_aux0", "loss_bbox_aux1"}:
        assert losses[k] > 0, k

    enc = model.query_head.transformer.encoder
    dec = model.query_head.transformer.decoder
    sum(losses[k] for k in AUX_HEAD_KEYS).backward(retain_graph=True)
    assert _grad_norm(enc) > 0 and _grad_norm(model.backbone) > 0
    assert _grad_norm(dec) == 0
    model.zero_grad(set_to_none=True)
    sum(v for k, v in losses.items() if "_aux" in k).backward(retain_graph=True)
    assert _grad_norm(dec) > 0 and _grad_norm(enc) > 0
    assert _grad_norm(model.query_head.aux_pos_trans) > 0
    model.zero_grad(set_to_none=True)
    sum(losses.values()).backward()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not no_grad, no_grad


class _ExplicitExtraMap(torch.nn.Module):
    """Independent reference of the aux heads' maps, the way the branch made them before the adapter: the encoder
    maps themselves + an explicit conv3x3 s2 + GroupNorm of the last one (``weights``: conv w, b, GN w, b)."""

    def __init__(self, weights, num_groups):
        super().__init__()
        self.w = torch.nn.ParameterList(weights)
        self.num_groups = num_groups

    def forward(self, maps):
        w, b, gn_w, gn_b = self.w
        extra = torch.nn.functional.conv2d(maps[-1], w, b, stride=2, padding=1)
        return list(maps) + [torch.nn.functional.group_norm(extra, self.num_groups, gn_w, gn_b)]


def test_identity_path_leaves_co_dino_losses_unchanged_bit_for_bit():
    """Co-DINO with the adapter (identity on the 4 encoder levels + one stride-2 level) vs the same model whose aux
    maps are built explicitly (encoder maps + conv3x3 s2 + GN, same weights): every loss and every gradient equal
    (torch.equal) in training mode with a fixed seed; the adapter returns the encoder maps themselves."""
    torch.manual_seed(0)
    model = tiny_codino()
    adapter = model.collaborative.adapter
    assert adapter.identity_levels == [0, 1, 2, 3] and len(adapter.downsample) == 1
    (conv, gn), = adapter.downsample
    with torch.no_grad():  # GN's default (1, 0) would hide a swapped weight / bias
        gn.weight.normal_()
        gn.bias.normal_()
    ref = copy.deepcopy(model)
    (rconv, rgn), = ref.collaborative.adapter.downsample
    ref.collaborative.adapter = _ExplicitExtraMap([rconv.weight, rconv.bias, rgn.weight, rgn.bias], gn.num_groups)

    seen = {}
    adapter.register_forward_hook(lambda m, inp, out: seen.update(inp=inp[0], out=out))
    batch = _batch(5, counts=(3, 2))
    results = []
    for m in (model, ref):
        m.train()
        torch.manual_seed(11)  # denoising noise, positive-query sampling
        with EventStorage():
            losses = m(copy.deepcopy(batch))
        sum(losses.values()).backward()
        results.append((losses, {n: p.grad for n, p in m.named_parameters() if p.grad is not None}))
    assert len(seen["out"]) == 5 and all(seen["out"][i] is seen["inp"][i] for i in range(4))
    (got, got_grads), (want, want_grads) = results
    assert AUX_HEAD_KEYS <= set(got) and got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k
    rename = {"collaborative.adapter.downsample.0.0.weight": "collaborative.adapter.w.0",
              "collaborative.adapter.downsample.0.0.bias": "collaborative.adapter.w.1",
              "collaborative.adapter.downsample.0.1.weight": "collaborative.adapter.w.2",
              "collaborative.adapter.downsample.0.1.bias": "collaborative.adapter.w.3"}
    assert {rename.get(n, n) for n in got_grads} == set(want_grads)
    for n, g in got_grads.items():
        assert torch.equal(g, want_grads[rename.get(n, n)]), n


def test_eval_outputs_identical_without_aux_modules():
    torch.manual_seed(3)
    model = tiny_codino().eval()
    batch = [{k: v for k, v in x.items() if k != "instances"} for x in _batch(3)]
    with torch.no_grad():
        with_aux = model(batch)
        bare = copy.deepcopy(model)
        bare.collaborative = None
        without = bare(batch)
        # and a plain DINO (no projections either) with the same weights
        dino = tiny_model(num_classes=NUM_CLASSES, num_co_heads=0).eval()
        sd = {k: v for k, v in model.state_dict().items() if not k.startswith(("collaborative.", "query_head.transformer.aux_pos_trans"))}
        dino.load_state_dict(sd, strict=True)
        plain = dino(batch)
    for a, b, c in zip(with_aux, without, plain):
        a, b, c = a["instances"], b["instances"], c["instances"]
        assert len(a) > 0
        for x in (b, c):
            assert torch.equal(a.pred_boxes.tensor, x.pred_boxes.tensor)
            assert torch.equal(a.scores, x.scores) and torch.equal(a.pred_classes, x.pred_classes)


def test_tiny_codino_overfits_to_ap50(tmp_path):
    """The learning check of test_dino_overfit.py (same data, model, optimiser, criterion: AP50 >= 90 of the
    one-to-one head), with the collaborative branch on."""
    from test_dino_overfit import make_data, overfit_evaluator, train_until_ap50

    torch.manual_seed(0)
    inputs, dicts = make_data()
    evaluator = overfit_evaluator("codetr_test_codino_overfit", dicts, tmp_path)
    model = tiny_model(num_queries=15, num_dn_queries=10, embed_dim=32, width=16, num_co_heads=2)
    model.collaborative = tiny_collaborative(embed_dim=32, num_gn_groups=8)
    history = train_until_ap50(model, inputs, evaluator)
    print(f"\ntiny Co-DINO overfit: history {history}")
    assert history[-1][1] >= 90.0, history


@pytest.mark.parametrize("module", ["atss", "rcnn"])
def test_eval_module_switch_evaluates_an_auxiliary_head(module):
    torch.manual_seed(4)
    model = tiny_codino()
    model.eval_module = module
    model.eval()
    batch = [{k: v for k, v in x.items() if k != "instances"} for x in _batch(4)]
    with torch.no_grad():
        out = model(batch)
    for x, o in zip(batch, out):
        inst = o["instances"]
        assert len(inst) > 0 and inst.image_size == (x["height"], x["width"])
        b = inst.pred_boxes.tensor
        assert (b[:, 2] <= x["width"]).all() and (b[:, 3] <= x["height"]).all() and (inst.pred_classes < NUM_CLASSES).all()
    with pytest.raises(ValueError, match="eval_module"):
        tiny_model(num_classes=NUM_CLASSES).__class__(
            backbone=model.backbone, neck=model.neck, query_head=model.query_head, pixel_mean=[0, 0, 0],
            pixel_std=[1, 1, 1], eval_module=module,
        )


def test_co_dino_configs_and_documented_overrides():
    import os

    from detectron2.config import LazyConfig, instantiate

    root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
    cfg = LazyConfig.load(os.path.join(root, "co_dino_r50.py"))
    assert cfg.model.query_head.transformer.num_co_heads == 2 and cfg.model.eval_module == "detr"
    rcnn, atss = cfg.model.collaborative.aux_heads
    assert (rcnn.loss_rpn_cls_weight, rcnn.loss_rpn_bbox_weight, rcnn.loss_cls_weight, rcnn.loss_bbox_weight) == (12, 12, 12, 120)
    assert (atss.loss_cls_weight, atss.loss_bbox_weight, atss.loss_centerness_weight) == (12, 24, 12)
    assert cfg.dataloader.train.mapper.augmentations._target_.__name__ == "detr_train_augmentation"
    lsj = LazyConfig.load(os.path.join(root, "co_dino_r50_lsj.py"))
    assert lsj.model.with_attn_mask is False and lsj.model.collaborative is not None
    assert lsj.dataloader.train.dataset.mapper.augmentations._target_.__name__ == "lsj_train_augmentation"
    assert lsj.dataloader.train.dataset.mapper.augmentations.image_size == 1024
    assert lsj.dataloader.train.dataset._target_.__name__ == "CopyPasteDataset"  # official LSJ + copy-paste
    # DINO baseline override
    base = LazyConfig.apply_overrides(cfg, ["model.collaborative=null", "model.query_head.transformer.num_co_heads=0"])
    assert base.model.collaborative is None and base.model.query_head.transformer.num_co_heads == 0
    # 9-encoder variant (LSJ), num_classes followed by the aux heads
    c = LazyConfig.apply_overrides(lsj, ["model.query_head.transformer.num_encoder_layers=9", "model.query_head.num_classes=7"])
    model = instantiate(c.model)
    assert len(model.query_head.transformer.encoder.layers) == 9
    assert [h.num_classes for h in model.collaborative.aux_heads] == [7, 7] and model.collaborative.num_classes == 7
    assert model.collaborative.aux_heads[1].atss_cls.out_channels == 7


@pytest.mark.parametrize("config", [None, "co_dino_r50.py", "co_deformable_detr_r50.py"])
def test_training_graph_has_no_in_place_ops_on_views(config):
    """An in-place op on a view of a tensor that needs grad (e.g. ``nn.ReLU(inplace=True)`` after an ``nn.Linear`` on
    (B, N, C) inputs, whose output is a view of the 2-D matmul) puts a CopySlices node in the graph, whose backward
    copies the whole base tensor: 9 % of Co-Deformable-DETR R50's CPU training step at 384x384. The training graphs
    (one-to-one, denoising and positive-query passes, auxiliary heads) of the tiny Co-DINO and of the real R50 configs
    (random weights, one small image) have none."""
    import os

    from detectron2.config import LazyConfig, instantiate

    torch.manual_seed(0)
    if config is None:
        model, batch = tiny_codino(), _batch(0)
    else:
        root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
        model = instantiate(LazyConfig.load(os.path.join(root, config)).model)
        g = torch.Generator().manual_seed(0)
        batch = [random_input(96, 128, 3, num_classes=model.query_head.num_classes, name="a.jpg", generator=g)]
    model.train()
    with EventStorage():
        loss = sum(model(batch).values())
    names = autograd_node_names(loss)
    assert len(names) > 1000 and "AddmmBackward0" in names  # the walk reached the whole graph
    assert names.count("CopySlices") == 0, names.count("CopySlices")
