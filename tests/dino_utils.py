"""Shared helpers of the DINO tests: a tiny CoDETR and synthetic inputs."""
import pytest
import torch
from torch import nn

from detectron2.modeling.backbone import Backbone
from detectron2.structures import Boxes, Instances

from codetr.modeling import ChannelMapper, CoDETR, DETRCriterion, DETRPostProcessor, DINOHead, DINOTransformer

CRITERION_KEYS = ("cls_loss", "lambda_1", "loss_cls_weight", "loss_bbox_weight", "loss_giou_weight", "matcher")
POSTPROCESS_KEYS = ("max_per_img", "soft_nms")


class TinyBackbone(Backbone):
    """Three strided conv + GN + ReLU stages: "p1" (stride 4), "p2" (8), "p3" (16)."""

    def __init__(self, width=32):
        super().__init__()
        chans = [3, width, width, width]
        strides = [4, 2, 2]
        self.stages = nn.ModuleList(
            [
                nn.Sequential(
                    nn.Conv2d(chans[i], chans[i + 1], 3 if s == 2 else 4, s, 1 if s == 2 else 0),
                    nn.GroupNorm(8, chans[i + 1]),
                    nn.ReLU(),
                    nn.Conv2d(chans[i + 1], chans[i + 1], 3, 1, 1),
                    nn.GroupNorm(8, chans[i + 1]),
                    nn.ReLU(),
                )
                for i, s in enumerate(strides)
            ]
        )

    def forward(self, x):
        out = {}
        for i, stage in enumerate(self.stages):
            x = stage(x)
            out[f"p{i + 1}"] = x
        return out


def tiny_model(
    num_classes=3, num_queries=20, num_dn_queries=10, num_co_heads=0, embed_dim=64, layers=2, with_attn_mask=True, width=32, **head_kwargs
):
    """A CoDETR small enough for CPU tests: 4 levels (strides 4..32), width 64. ``head_kwargs`` go to the DINOHead,
    its DETRCriterion (CRITERION_KEYS) or the DETRPostProcessor (POSTPROCESS_KEYS)."""
    crit_kw = {k: head_kwargs.pop(k) for k in CRITERION_KEYS if k in head_kwargs}
    post_kw = {k: head_kwargs.pop(k) for k in POSTPROCESS_KEYS if k in head_kwargs}
    backbone = TinyBackbone(width)
    neck = ChannelMapper(["p1", "p2", "p3"], [width] * 3, embed_dim, num_extra=1, kernel_size=1, num_groups=8)
    transformer = DINOTransformer(
        embed_dim=embed_dim,
        num_heads=4,
        num_levels=4,
        num_points=2,
        num_encoder_layers=layers,
        num_decoder_layers=layers,
        ffn_dim=2 * embed_dim,
        num_queries=num_queries,
        num_co_heads=num_co_heads,
    )
    head = DINOHead(
        transformer=transformer,
        num_classes=num_classes,
        num_dn_queries=num_dn_queries,
        criterion=DETRCriterion(num_classes=num_classes, **crit_kw),
        **head_kwargs,
    )
    return CoDETR(
        backbone=backbone,
        neck=neck,
        query_head=head,
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
        with_attn_mask=with_attn_mask,
        size_divisibility=32,
        postprocessor=DETRPostProcessor(**post_kw),
    )


def tiny_deformable(num_classes=3, num_queries=20, num_co_heads=0, embed_dim=64, layers=2, width=32, **crit_kw):
    """A Co-Deformable-DETR / Deformable-DETR CoDETR small enough for CPU tests (4 levels, strides 4..32; its
    criterion: focal 2 / L1 5 / GIoU 2, binary encoder labels; top-100, no NMS)."""
    from codetr.modeling.deformable_detr_head import DeformableDETRHead
    from codetr.modeling.deformable_transformer import DeformableDETRTransformer

    transformer = DeformableDETRTransformer(
        embed_dim=embed_dim, num_heads=4, num_levels=4, num_points=2, num_encoder_layers=layers,
        num_decoder_layers=layers, ffn_dim=2 * embed_dim, num_co_heads=num_co_heads,
    )
    crit = dict(cls_loss="focal", loss_cls_weight=2.0, loss_bbox_weight=5.0, loss_giou_weight=2.0, binary_encoder_labels=True)
    crit.update(crit_kw)
    head = DeformableDETRHead(
        transformer=transformer, num_classes=num_classes, num_queries=num_queries,
        criterion=DETRCriterion(num_classes=num_classes, **crit),
    )
    neck = ChannelMapper(["p1", "p2", "p3"], [width] * 3, embed_dim, num_extra=1, kernel_size=1, num_groups=8)
    return CoDETR(
        backbone=TinyBackbone(width), neck=neck, query_head=head, pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375], size_divisibility=32, postprocessor=DETRPostProcessor(max_per_img=100, soft_nms=False),
    )


def random_input(h, w, n, num_classes=3, name=None, generator=None):
    """A batched_inputs item with n random (valid) boxes."""
    g = generator
    inst = Instances((h, w))
    if n:
        xy = torch.rand(n, 2, generator=g) * torch.tensor([w * 0.6, h * 0.6])
        wh = 4 + torch.rand(n, 2, generator=g) * torch.tensor([w * 0.35, h * 0.35])
        inst.gt_boxes = Boxes(torch.cat([xy, xy + wh], 1))
    else:
        inst.gt_boxes = Boxes(torch.zeros(0, 4))
    inst.gt_classes = torch.randint(0, num_classes, (n,), generator=g)
    x = {"image": torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g), "instances": inst, "height": h, "width": w}
    if name is not None:
        x["file_name"] = name
    return x


@pytest.fixture
def one_thread():
    """One intra-op thread: the tests' tiny matrices run faster, and immune to spin-waiting on a loaded CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_dab(num_classes=3, num_queries=20, num_co_heads=0, embed_dim=64, layers=2, width=32, feature="p2", **crit_kw):
    """A (Co-)DAB-DETR CoDETR small enough for CPU tests: one map (``feature`` of TinyBackbone: "p2" stride 8) through
    a 1x1 projection, the DAB transformer, DAB-DETR's criterion (focal 1 / L1 5 / GIoU 2); top-100, no NMS."""
    from codetr.modeling import DABDETRHead, DABTransformer, InputProjection

    transformer = DABTransformer(embed_dim=embed_dim, num_heads=4, num_encoder_layers=layers, num_decoder_layers=layers,
                                 ffn_dim=2 * embed_dim, num_queries=num_queries)
    crit = dict(cls_loss="focal", loss_cls_weight=1.0, loss_bbox_weight=5.0, loss_giou_weight=2.0)
    crit.update(crit_kw)
    head = DABDETRHead(transformer=transformer, num_classes=num_classes, num_co_heads=num_co_heads,
                       criterion=DETRCriterion(num_classes=num_classes, **crit))
    return CoDETR(
        backbone=TinyBackbone(width), neck=InputProjection(feature, width, embed_dim), query_head=head,
        pixel_mean=[123.675, 116.28, 103.53], pixel_std=[58.395, 57.12, 57.375], size_divisibility=32,
        postprocessor=DETRPostProcessor(max_per_img=100, soft_nms=False),
    )


def autograd_node_names(t):
    """Class names of every node of ``t``'s autograd graph (each node once)."""
    seen, stack, names = set(), [t.grad_fn], []
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.append(type(node).__name__)
        stack.extend(n for n, _ in node.next_functions)
    return names
