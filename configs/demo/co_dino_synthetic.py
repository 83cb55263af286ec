# A small Co-DINO trained from scratch on the embedded synthetic dataset, on a CPU (no download needed).
#
#   python tools/lazyconfig_train_net.py --config-file configs/demo/co_dino_synthetic.py
#
# Same architecture as Co-DINO R50 (DINO query head + collaborative branch with the Faster R-CNN and ATSS
# auxiliary heads and their customised positive queries), shrunk to run on a laptop: a ResNet-18-shaped backbone at
# half width (stages of 32/64/128/256 channels, from scratch), 3 backbone levels + 1 extra (strides 8..64; aux maps
# 8..128), 128-d transformer with 2 encoder / 2 decoder layers (FFN 256), 50 queries, 10 denoising queries; images
# resized to a short side of 160..224 (test 224); AdamW 1e-3, 900 iterations of batch 2 (lr x0.1 after 750),
# evaluated every 300. See README "Train, evaluate, demo" for the measured time and AP.
from fvcore.common.param_scheduler import MultiStepParamScheduler

import torch
from detectron2.config import LazyCall as L
from detectron2.modeling.backbone import BasicStem, ResNet
from detectron2.modeling.backbone.resnet import BasicBlock
from detectron2.solver import get_default_optimizer_params

from codetr.modeling import (
    ChannelMapper,
    CoDETR,
    DETRCriterion,
    DETRPostProcessor,
    DINOHead,
    DINOTransformer,
    HungarianMatcher,
)
from codetr.modeling.adapter import MultiScaleAdapter
from codetr.modeling.atss import ATSSHead
from codetr.modeling.collaborative import CollaborativeBranch
from codetr.modeling.rcnn import RCNNBranch

from ..common.synthetic_data import dataloader

dataloader.train.total_batch_size = 2
dataloader.train.mapper.augmentations[1].short_edge_length = (160, 192, 224)
dataloader.train.mapper.augmentations[1].max_size = 352
dataloader.test.mapper.augmentations[0].short_edge_length = 224
dataloader.test.mapper.augmentations[0].max_size = 352

WIDTH = 32  # backbone channels of the first stage (ResNet-18: 64)
DIM = 128
AUX_STRIDES = (8, 16, 32, 64, 128)

model = L(CoDETR)(
    backbone=L(ResNet)(
        stem=L(BasicStem)(in_channels=3, out_channels=WIDTH, norm="BN"),
        stages=[  # ResNet-18's 2 basic blocks per stage, at WIDTH x 1, 2, 4, 8 channels
            L(ResNet.make_stage)(
                block_class=BasicBlock, num_blocks=2, in_channels=WIDTH * 2 ** max(i - 1, 0), out_channels=WIDTH * 2**i,
                stride_per_block=[1 if i == 0 else 2, 1], norm="BN",
            )
            for i in range(4)
        ],
        out_features=["res3", "res4", "res5"],
        freeze_at=0,
    ),
    neck=L(ChannelMapper)(
        in_features=["res3", "res4", "res5"], in_channels=[2 * WIDTH, 4 * WIDTH, 8 * WIDTH], out_channels=DIM, num_extra=1
    ),
    query_head=L(DINOHead)(
        transformer=L(DINOTransformer)(
            embed_dim=DIM,
            num_heads=4,
            num_levels=4,
            num_points=4,
            num_encoder_layers=2,
            num_decoder_layers=2,
            ffn_dim=256,
            dropout=0.0,
            num_queries=50,
            num_co_heads=2,
        ),
        num_classes=20,  # the one class count: the collaborative branch and its aux heads read it
        num_dn_queries=10,
        label_noise_ratio=0.5,
        box_noise_scale=1.0,
        criterion=L(DETRCriterion)(
            num_classes="${..num_classes}",
            matcher=L(HungarianMatcher)(cost_class=2.0, cost_bbox=5.0, cost_giou=2.0),
            loss_cls_weight=1.0,
            loss_bbox_weight=5.0,
            loss_giou_weight=2.0,
            cls_loss="qfl",
        ),
    ),
    postprocessor=L(DETRPostProcessor)(max_per_img=100, soft_nms=True),
    collaborative=L(CollaborativeBranch)(
        aux_heads=[
            L(RCNNBranch)(
                num_classes="${...num_classes}",
                in_channels=DIM,
                strides=AUX_STRIDES,
                num_roi_levels=4,
                rpn_pre_nms_topk=(500, 500),
                rpn_post_nms_topk=(100, 100),
                roi_batch_size_per_image=64,
                fc_dim=128,
                loss_rpn_cls_weight=12.0,
                loss_rpn_bbox_weight=12.0,
                loss_cls_weight=12.0,
                loss_bbox_weight=120.0,
                head_index=0,
            ),
            L(ATSSHead)(
                num_classes="${...num_classes}",
                in_channels=DIM,
                feat_channels=DIM,
                strides=AUX_STRIDES,
                loss_cls_weight=12.0,
                loss_bbox_weight=24.0,
                loss_centerness_weight=12.0,
                head_index=1,
            ),
        ],
        num_classes="${..query_head.num_classes}",
        max_queries=50,
        # the encoder maps (identity path) + one 3x3 stride-2 conv + GN; after the heads, so that the initialisation
        # draws the same numbers as before the adapter
        adapter=L(MultiScaleAdapter)(in_strides=AUX_STRIDES[:-1], out_strides=AUX_STRIDES, embed_dim=DIM),
    ),
    pixel_mean=[123.675, 116.28, 103.53],
    pixel_std=[58.395, 57.12, 57.375],
    input_format="RGB",
    with_attn_mask=True,
    size_divisibility=32,
)

optimizer = L(torch.optim.AdamW)(
    params=L(get_default_optimizer_params)(base_lr="${..lr}"),
    lr=1e-3,
    betas=(0.9, 0.999),
    weight_decay=1e-4,
)

MAX_ITER = 900
lr_multiplier = L(MultiStepParamScheduler)(values=[1.0, 0.1], milestones=[750], num_updates=MAX_ITER)

train = dict(
    output_dir="./output/demo_co_dino_synthetic",
    init_checkpoint="",
    max_iter=MAX_ITER,
    amp=dict(enabled=False, precision="bf16"),
    clip_grad=dict(enabled=True, max_norm=0.1, norm_type=2.0),
    grad_accum_steps=1,
    model_ema=dict(enabled=False, momentum=1e-4, gamma=2000),
    activation_checkpointing=dict(enabled=False, module_types=[]),
    ddp=dict(broadcast_buffers=False, find_unused_parameters=False, fp16_compression=False),
    checkpointer=dict(period=300, max_to_keep=3),
    eval_period=300,  # after iterations 300 and 600, and at the end: the AP curve of metrics.png
    log_period=20,
    device="cpu",
    seed=42,
)
