# Optimizer and 12-epoch schedule of the official Co-Deformable-DETR R50 config: AdamW lr 2e-4, weight decay 1e-4,
# lr x0.1 on the backbone and on every `sampling_offsets` / `reference_points` parameter (mmcv custom_keys), grad-norm
# clipping 0.1, lr x0.1 after epoch 11; 2 images x 8 GPUs.
from detectron2.config import LazyCall as L

from codetr.modeling.optim import LrFactorByPrefix

from .co_dino_schedule import ITERS_PER_EPOCH, lr_multiplier, optimizer, train

optimizer.params.lr_factor_func = L(LrFactorByPrefix)(
    factors={"backbone.": 0.1}, contains={"sampling_offsets": 0.1, "reference_points": 0.1}
)
train.output_dir = "./output/co_deformable_detr_r50"

__all__ = ["ITERS_PER_EPOCH", "lr_multiplier", "optimizer", "train"]
