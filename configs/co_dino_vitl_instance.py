# Co-DINO-Inst ViT-L on COCO (official co_dino_5scale_vit_large_coco_instance, HEAD 2665352): configs/co_dino_vitl.py
# plus the mask branch; the official README reports 65.8 box / 56.6 mask AP on val2017 (Objects365 pre-trained).
#
#   python tools/lazyconfig_train_net.py --config-file configs/co_dino_vitl_instance.py --eval-only \
#       train.init_checkpoint=<the official Co-DINO-Inst ViT-L checkpoint, https://huggingface.co/zongzhuofan>
#
# The official checkpoint (mmdetection format) is converted on load: its mask_head.* / mask_iou_head.* keys land on
# model.mask_branch (codetr.checkpoint.official).
#
# Mask branch (codetr/modeling/mask_head.py, spec §6): RoIAlign 14 on the encoder maps of strides 4..64 (level by
# sqrt(area) / 56), a RefineMask-style head (stages 14/28/56/112, class-agnostic last stage, boundary-aware BCE,
# weight 1.33 x 6 x 2) and a mask-IoU head (MSE, weight 0.5 x 6 x 2). Training RoIs: the query head's top 1000
# last-layer predictions, IoU 0.5, 512 sampled with 25% positives, ground truth added. Test: the 1000 boxes after
# soft-NMS go through the mask head; mask score = predicted IoU x box score (segm AP ranks by it).
# Data: the DETR augmentation with instance masks (rasterised, then resized and cropped, as the official
# LoadAnnotations(with_mask=True); boxes are not recomputed after the crop, as the official RandomCrop here);
# evaluation of bbox and segm with up to 1000 detections per image.
from detectron2.config import LazyCall as L

from codetr.modeling.mask_head import InstanceMaskBranch, MaskIoUHead, RefineMaskHead

from .co_dino_vitl import dataloader, lr_multiplier, model, optimizer, train

NUM_DEC_LAYERS, LAMBDA_2 = 6, 2.0
model.mask_branch = L(InstanceMaskBranch)(
    mask_head=L(RefineMaskHead)(
        in_channels=256,
        num_classes="${...query_head.num_classes}",
        num_convs_instance=1,
        num_convs_semantic=2,
        conv_dim=256,
        stage_sizes=(14, 28, 56, 112),
        class_agnostic_last=True,
        semantic_stride=4,
        dilations=(1, 3, 5),
        loss_weight=1.33 * NUM_DEC_LAYERS * LAMBDA_2,
        stage_loss_weights=(0.5, 0.75, 0.75, 1.0),
        boundary_width=2,
        start_stage=1,
    ),
    mask_iou_head=L(MaskIoUHead)(
        in_channels=256,
        num_classes="${...query_head.num_classes}",
        roi_size=14,
        num_convs=2,
        conv_dim=256,
        num_fcs=1,
        fc_dim=1024,
        loss_weight=0.5 * NUM_DEC_LAYERS * LAMBDA_2,
    ),
    strides=(4, 8, 16, 32, 64),
    roi_size=14,
    num_proposals=1000,
    iou_threshold=0.5,
    batch_size_per_image=512,
    positive_fraction=0.25,
    test_chunk=150,
    mask_threshold=0.5,
)

dataloader.train.mapper.use_instance_mask = True
dataloader.train.mapper.instance_mask_format = "bitmask"
dataloader.evaluator.tasks = ("bbox", "segm")
train.output_dir = "./output/co_dino_vitl_instance"
