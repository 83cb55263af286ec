# A small Co-DINO-Inst (boxes + instance masks) trained from scratch on the embedded synthetic dataset, on a CPU:
#
#   python tools/lazyconfig_train_net.py --config-file configs/demo/co_dino_inst_synthetic.py
#
# configs/demo/co_dino_synthetic.py plus the Co-DINO-Inst mask branch of configs/co_dino_vitl_instance.py at demo
# size: the same heads (RefineMask-style stages 14/28/56/112, mask-IoU head) and losses at 128 channels on the
# encoder maps of strides 8..64 (semantic map: stride 8), 300 query-head RoIs per image with 64 sampled (25%
# positives). The synthetic annotations carry exact RLE masks (instance_mask_format="bitmask"); evaluation scores
# bbox and segm. Its training time and AP have not been measured yet (README "Instance segmentation").
from detectron2.config import LazyCall as L

from codetr.modeling.mask_head import InstanceMaskBranch, MaskIoUHead, RefineMaskHead

from .co_dino_synthetic import DIM, dataloader, lr_multiplier, model, optimizer, train

model.mask_branch = L(InstanceMaskBranch)(
    mask_head=L(RefineMaskHead)(in_channels=DIM, num_classes="${...query_head.num_classes}", conv_dim=DIM, semantic_stride=8),
    mask_iou_head=L(MaskIoUHead)(in_channels=DIM, num_classes="${...query_head.num_classes}", conv_dim=DIM, fc_dim=256),
    strides=(8, 16, 32, 64),
    num_proposals=300,
    batch_size_per_image=64,
)
dataloader.train.mapper.use_instance_mask = True
dataloader.train.mapper.instance_mask_format = "bitmask"
dataloader.evaluator.tasks = ("bbox", "segm")
train.output_dir = "./output/demo_co_dino_inst_synthetic"
