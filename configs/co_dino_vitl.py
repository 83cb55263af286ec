# Co-DINO with the EVA-02-style ViT-L (official co_dino_5scale_vit_large_coco, HEAD 2665352), COCO, 12 epochs.
#
#   python tools/lazyconfig_train_net.py --config-file configs/co_dino_vitl.py --num-gpus 8 \
#       dataloader.train.total_batch_size=16 train.init_checkpoint=<Objects365-pretrained Co-DINO ViT-L>
#   python tools/lazyconfig_train_net.py --config-file configs/co_dino_vitl.py --eval-only \
#       train.init_checkpoint=https://huggingface.co/zongzhuofan/co-detr-vit-large-coco/resolve/main/pytorch_model.pth
#
# The official checkpoint (mmdetection format) is converted on load (codetr.checkpoint.official).
#
# Model: ViT-L (patch 16, dim 1024, depth 24, 16 heads, SwiGLU 8/3 + sub-LN, 2D RoPE, q/v bias), window 24 with
# global blocks 3, 7, 11, 15, 19, 23, drop path 0.4, absolute position embedding pre-trained at 512 px; SFP neck
# to p2..p6 (strides 4..64); 1500 queries; denoising 300 queries, box noise 0.4, label noise 0.5; test: class-aware
# soft-NMS (IoU 0.8) keeping the top 1000 boxes, evaluated with up to 1000 detections per image.
# Optimizer: AdamW lr 5e-5, wd 0.01, layer-wise lr decay 0.8 over the 24 blocks (1-D params and biases: wd 0);
# linear warm-up over 500 iterations from 0.01; lr x0.1 after epoch 7; grad clip 0.1; EMA of the weights with
# momentum 1e-4 (evaluation uses the EMA model).
#
# GPU memory (not measured here: this project's CI has no GPU). The official model was trained with 1 image per
# GPU on 80 GB A100s at up to 1536 x 2400 px; users report out-of-memory on 24 GB cards even at batch 1
# (Sense-X/Co-DETR #121). Switches that trade speed for memory, from most to least effective:
#   * model.backbone.use_act_checkpoint=True (default, as official): recompute each ViT block in backward;
#   * model.query_head.transformer.num_checkpoint=6 (default): recompute the 6 encoder layers;
#   * train.amp.enabled=True train.amp.precision=bf16: bf16 autocast (the official model trains in fp32);
#   * smaller training images: dataloader.train.mapper.augmentations.max_size / min_sizes;
#   * train.grad_accum_steps=N with fewer GPUs keeps the effective batch of 16.
# Turning checkpointing off (use_act_checkpoint=False, num_checkpoint=0) is faster when memory allows.
from detectron2.config import LazyCall as L
from detectron2.solver import WarmupParamScheduler
from fvcore.common.param_scheduler import MultiStepParamScheduler

from codetr.data import detr_train_augmentation, test_augmentation
from codetr.modeling.backbone import COCO_GLOBAL_BLOCKS, SFP, EVA02ViT, vit_layer_decay_param_groups
from codetr.modeling.tta import TestTimeAugmentation  # noqa: F401 (model.test_time_aug below)

from .co_dino_r50 import dataloader, optimizer, train
from .co_dino_r50 import model
from .common.co_dino_schedule import ITERS_PER_EPOCH

# ---------------------------------------------------------------- model
model.backbone = L(EVA02ViT)(
    patch_size=16,
    embed_dim=1024,
    depth=24,
    num_heads=16,
    mlp_ratio=4 * 2 / 3,
    qkv_bias=True,
    drop_path_rate=0.4,
    pretrain_img_size=512,
    pretrain_use_cls_token=True,
    window_size=24,
    global_block_indexes=COCO_GLOBAL_BLOCKS,
    use_act_checkpoint=True,
)
model.neck = L(SFP)(in_channels=1024, out_channels=256, use_p2=True, in_feature="last_feat")
model.query_head.transformer.num_queries = 1500
model.query_head.transformer.num_checkpoint = 6  # official with_cp=6
model.query_head.num_dn_queries = 300
model.query_head.label_noise_ratio = 0.5
model.query_head.box_noise_scale = 0.4
model.postprocessor.max_per_img = 1000
model.postprocessor.soft_nms = True
model.size_divisibility = 32
# Test-time augmentation (codetr.modeling.tta), off as in the official config. The official code has none to copy:
# its ViT-L test pipeline is one scale, MultiScaleFlipAug(img_scale=(2048, 1280), flip=False), and the query head's
# aug_test_bboxes raises "Not implemented"; the TTA behind the reported 65.9 AP (65.4 without) is unpublished.
# To switch ours on (flip x 3 scales around the official test size; our choice, not measured on COCO here):
#   model.test_time_aug = L(TestTimeAugmentation)(min_sizes=[1024, 1280, 1536], max_size=2048, flip=True)
model.test_time_aug = None
# the collaborative branch (Faster R-CNN + ATSS, losses x12) comes with configs/co_dino_r50.py
# ViT-L COCO RoI head: ConvFCBBoxHead, 4 convs (GN) + 1 FC, class-agnostic regression, stds 0.05/0.05/0.1/0.1
_rcnn = model.collaborative.aux_heads[0]
_rcnn.num_conv = 4
_rcnn.conv_norm = "GN"
_rcnn.num_fc = 1
_rcnn.cls_agnostic_bbox_reg = True
_rcnn.bbox_reg_weights = (20.0, 20.0, 10.0, 10.0)

# ---------------------------------------------------------------- data: short side 480..1536, long side <= 2400
dataloader.train.mapper.augmentations = L(detr_train_augmentation)(
    min_sizes=tuple(range(480, 1537, 32)),
    max_size=2400,
    crop_resize_sizes=(400, 500, 600),
    crop_size=(384, 600),
    crop_max_size=4200,
)
dataloader.train.total_batch_size = 16  # 1 image per GPU x 16 GPUs (official)
dataloader.test.mapper.augmentations = L(test_augmentation)(short_edge=1280, max_size=2048)
dataloader.evaluator.max_dets_per_image = "${...model.postprocessor.max_per_img}"  # 1000

# ---------------------------------------------------------------- optimization
optimizer.lr = 5e-5
optimizer.weight_decay = 0.01
optimizer.params = L(vit_layer_decay_param_groups)(
    base_lr="${..lr}", weight_decay="${..weight_decay}", decay_rate=0.8, num_layers=24
)
lr_multiplier = L(WarmupParamScheduler)(
    scheduler=L(MultiStepParamScheduler)(
        values=[1.0, 0.1], milestones=[7 * ITERS_PER_EPOCH], num_updates=12 * ITERS_PER_EPOCH
    ),
    warmup_length=500 / (12 * ITERS_PER_EPOCH),
    warmup_method="linear",
    warmup_factor=0.01,
)
train.max_iter = 12 * ITERS_PER_EPOCH
train.output_dir = "./output/co_dino_vitl"
train.init_checkpoint = ""  # EVA-02 / Objects365 weights or the official Co-DINO ViT-L checkpoint
train.model_ema = dict(enabled=True, momentum=1e-4, gamma=2000)
train.clip_grad = dict(enabled=True, max_norm=0.1, norm_type=2.0)
