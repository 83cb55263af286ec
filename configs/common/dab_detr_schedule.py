# Optimizer and 12-epoch schedule of (Co-)DAB-DETR R50: AdamW lr 1e-4 (backbone x0.1), weight decay 1e-4, grad-norm
# clipping 0.1, lr x0.1 after epoch 11; 2 images x 8 GPUs. DAB-DETR's own recipe (detrex dab_detr_r50_50ep) is
# the same optimizer for 50 epochs with the step at epoch 40: ``train.max_iter``, ``lr_multiplier.milestones``
# and ``lr_multiplier.num_updates`` (ITERS_PER_EPOCH iterations per epoch).
from .co_dino_schedule import ITERS_PER_EPOCH, lr_multiplier, optimizer, train

optimizer.lr = 1e-4
train.output_dir = "./output/co_dab_detr_r50"

__all__ = ["ITERS_PER_EPOCH", "lr_multiplier", "optimizer", "train"]
