# Co-DINO ViT-L on LVIS v1 (official co_dino_5scale_lsj_vit_large_lvis, HEAD 2665352): 1203 classes, large-scale
# jitter at 1536 px, 16 epochs.
#
#   python tools/lazyconfig_train_net.py --config-file configs/co_dino_vitl_lvis.py --eval-only \
#       train.init_checkpoint=https://huggingface.co/zongzhuofan/co-detr-vit-large-lvis/resolve/main/pytorch_model.pth
#
# Differences from configs/co_dino_vitl.py (COCO): window 16 with global blocks 2, 5, 8, ..., 23 (the official
# use_lsj rope: at the fixed 1536 px input it equals the size-adaptive rope used here), drop path 0.3, 900 queries,
# with_attn_mask=False (LSJ: every image counts as its 1536 x 1536 padded size), LSJ training (flip, scale
# 0.1..2.0 of 1536, crop/pad to 1536 with 114, boxes from the cropped masks, copy-paste as common/coco_lsj_data.py
# - the masks serve copy-paste only), test: resize
# the long side to 1536 in the mapper, and the model pads to 1536 x 1536 with 114 before normalising
# (``model.square_pad``: detections are rescaled by original / resized size, not by the padded size); RoI head
# Shared2FC with class-specific regression;
# AdamW lr 5e-5, wd 0.05, backbone lr x0.1 (the official LVIS config has no layer decay), steps at epochs 9 and 15.
# LVIS evaluation counts up to 1000 detections per image as the official protocol (LVISEvaluator's default: 300),
# tied to the model's top-k (soft-NMS, 1000).
#
# GPU memory: see configs/co_dino_vitl.py (same switches). The 1536 x 1536 input is fixed, so memory per image does
# not vary; officially 1 image per GPU on 80 GB A100s.
import detectron2.data.transforms as T
from detectron2.config import LazyCall as L
from detectron2.solver import WarmupParamScheduler, get_default_optimizer_params
from fvcore.common.param_scheduler import MultiStepParamScheduler

from codetr.data import CopyPasteDataset, DetrDatasetMapper, lsj_train_augmentation
from codetr.modeling.optim import LrFactorByPrefix
from codetr.modeling.backbone import LVIS_GLOBAL_BLOCKS

from .co_dino_vitl import model, optimizer, train
from .common.lvis_data import dataloader

IMAGE_SIZE = 1536
LVIS_TRAIN_IMAGES = 100_170  # lvis_v1_train images
ITERS_PER_EPOCH = (LVIS_TRAIN_IMAGES + 15) // 16  # 16 images per iteration (before repeat-factor sampling)

# ---------------------------------------------------------------- model
model.backbone.window_size = 16
model.backbone.global_block_indexes = LVIS_GLOBAL_BLOCKS
model.backbone.drop_path_rate = 0.3
model.with_attn_mask = False
model.square_pad = IMAGE_SIZE  # pad in the model (pixel value 114), so post-processing knows the unpadded size
model.pad_value = 114.0
model.query_head.num_classes = 1203
model.query_head.transformer.num_queries = 900
model.postprocessor.max_per_img = 1000
_rcnn = model.collaborative.aux_heads[0]  # Shared2FCBBoxHead, class-specific, stds 0.1/0.1/0.2/0.2
_rcnn.num_conv = 0
_rcnn.conv_norm = ""
_rcnn.num_fc = 2
_rcnn.cls_agnostic_bbox_reg = False
_rcnn.bbox_reg_weights = (10.0, 10.0, 5.0, 5.0)

# ---------------------------------------------------------------- data (LVIS v1, repeat-factor sampling 0.001)
dataloader.train.dataset = L(CopyPasteDataset)(
    dataset=dataloader.train.dataset,
    mapper=L(DetrDatasetMapper)(
        is_train=True,
        augmentations=L(lsj_train_augmentation)(
            image_size=IMAGE_SIZE, min_scale=0.1, max_scale=2.0, pad_value=114.0
        ),
        image_format="RGB",
        use_instance_mask=True,
        instance_mask_format="bitmask",
        recompute_boxes=True,
    ),
    max_num_pasted=100,
    keep_masks=False,
)
dataloader.train.mapper = None
dataloader.train.sampler.repeat_factors.dataset_dicts = "${dataloader.train.dataset.dataset}"
dataloader.test.mapper.image_format = "RGB"
dataloader.train.total_batch_size = 16  # 1 image per GPU x 16 GPUs (official)
dataloader.test.mapper.augmentations = [
    L(T.ResizeShortestEdge)(short_edge_length=IMAGE_SIZE, max_size=IMAGE_SIZE),  # padding: model.square_pad
]
dataloader.evaluator.max_dets_per_image = "${...model.postprocessor.max_per_img}"  # 1000, the official protocol

# ---------------------------------------------------------------- optimization
optimizer.lr = 5e-5
optimizer.weight_decay = 0.05
optimizer.params = L(get_default_optimizer_params)(
    base_lr="${..lr}", lr_factor_func=L(LrFactorByPrefix)(factors={"backbone.": 0.1})
)
lr_multiplier = L(WarmupParamScheduler)(
    scheduler=L(MultiStepParamScheduler)(
        values=[1.0, 0.1, 0.01],
        milestones=[9 * ITERS_PER_EPOCH, 15 * ITERS_PER_EPOCH],
        num_updates=16 * ITERS_PER_EPOCH,
    ),
    warmup_length=500 / (16 * ITERS_PER_EPOCH),
    warmup_method="linear",
    warmup_factor=0.01,
)
train.max_iter = 16 * ITERS_PER_EPOCH
train.output_dir = "./output/co_dino_vitl_lvis"
train.model_ema = dict(enabled=False, momentum=1e-4, gamma=2000)  # the official LVIS config has no EMA hook
