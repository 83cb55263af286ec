# Optimizer, 12-epoch schedule and training options of the official R50 Co-DINO configs:
# AdamW lr 2e-4 (backbone x0.1), weight decay 1e-4, grad-norm clipping 0.1, lr x0.1 after epoch 11.
import torch
from detectron2.config import LazyCall as L
from detectron2.solver import get_default_optimizer_params
from fvcore.common.param_scheduler import MultiStepParamScheduler

from codetr.modeling.optim import LrFactorByPrefix

optimizer = L(torch.optim.AdamW)(
    params=L(get_default_optimizer_params)(
        base_lr="${..lr}",
        lr_factor_func=L(LrFactorByPrefix)(factors={"backbone.": 0.1}),
    ),
    lr=2e-4,
    betas=(0.9, 0.999),
    weight_decay=1e-4,
)

# COCO train2017: 117,266 images with annotations; 16 images per iteration -> 7,330 iterations per epoch.
ITERS_PER_EPOCH = 7330
lr_multiplier = L(MultiStepParamScheduler)(
    values=[1.0, 0.1],
    milestones=[11 * ITERS_PER_EPOCH],  # fvcore: len(values) - 1 milestones when num_updates is given
    num_updates=12 * ITERS_PER_EPOCH,
)

train = dict(
    output_dir="./output/co_dino_r50",
    init_checkpoint="detectron2://ImageNetPretrained/torchvision/R-50.pkl",
    max_iter=12 * ITERS_PER_EPOCH,
    amp=dict(enabled=False, precision="float16"),
    clip_grad=dict(enabled=True, max_norm=0.1, norm_type=2.0),
    ddp=dict(broadcast_buffers=False, find_unused_parameters=False, fp16_compression=False),
    checkpointer=dict(period=ITERS_PER_EPOCH, max_to_keep=100),
    eval_period=ITERS_PER_EPOCH,
    log_period=20,
    device="cuda",
)
