"""Tiny pipeline-test config: the stand-in TinyDetector on a tiny synthetic dataset (CPU, seconds)."""
from omegaconf import OmegaConf

import torch
from detectron2.config import LazyCall as L
from detectron2.data import build_detection_test_loader, build_detection_train_loader
import detectron2.data.transforms as T
from detectron2.solver import get_default_optimizer_params

from codetr.data import DetrDatasetMapper, get_detection_dataset_dicts, register_synthetic_dataset
from codetr.evaluation import build_detection_evaluator
from tiny_detector import ConstantMultiplier, TinyDetector

register_synthetic_dataset("tinysynth", num_train=12, num_val=6, num_classes=4, image_size=(48, 64), seed=3)

model = L(TinyDetector)(num_classes=4, num_queries=10)

dataloader = OmegaConf.create()
dataloader.train = L(build_detection_train_loader)(
    dataset=L(get_detection_dataset_dicts)(names="tinysynth_train"),
    mapper=L(DetrDatasetMapper)(
        is_train=True,
        augmentations=[L(T.RandomFlip)(horizontal=True), L(T.ResizeShortestEdge)(short_edge_length=(48, 56, 64),
                                                                               max_size=96, sample_style="choice")],
        image_format="BGR",
    ),
    total_batch_size=2,
    num_workers=0,
    aspect_ratio_grouping=False,
)
dataloader.test = L(build_detection_test_loader)(
    dataset=L(get_detection_dataset_dicts)(names="tinysynth_val", filter_empty=False),
    mapper=L(DetrDatasetMapper)(
        is_train=False, augmentations=[L(T.ResizeShortestEdge)(short_edge_length=56, max_size=96)], image_format="BGR"
    ),
    num_workers=0,
)
dataloader.evaluator = L(build_detection_evaluator)(
    dataset_name="${..test.dataset.names}", max_dets_per_image=10, output_dir=None
)

optimizer = L(torch.optim.AdamW)(params=L(get_default_optimizer_params)(), lr=1e-2, weight_decay=1e-4)
lr_multiplier = L(ConstantMultiplier)()

train = dict(
    output_dir="./output/tiny",
    init_checkpoint="",
    max_iter=6,
    amp=dict(enabled=False, precision="bf16"),
    clip_grad=dict(enabled=True, max_norm=0.1, norm_type=2.0),
    grad_accum_steps=1,
    model_ema=dict(enabled=False, momentum=1e-4, gamma=2000),
    ddp=dict(broadcast_buffers=False, find_unused_parameters=False, fp16_compression=False),
    checkpointer=dict(period=3, max_to_keep=10),
    eval_period=0,
    log_period=2,
    device="cpu",
    seed=7,
)
