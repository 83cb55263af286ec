# Co-DINO with Swin-L (official co_dino_5scale_swin_large_1x_coco), COCO, 12 epochs, DETR augmentation.
#
#   python tools/lazyconfig_train_net.py --config-file configs/co_dino_swinl.py --num-gpus 8 \
#       train.init_checkpoint=<Swin-L ImageNet-22k 384 weights, converted to detectron2 names>
#
# Model: Detectron2's SwinTransformer with the Swin-L shape (embed 192, depths 2/2/18/2, heads 6/12/24/48,
# window 12, pre-trained at 384 px), drop path 0.3 (official 1x; 0.5 for 2x, 0.6 for 3x); ChannelMapper on its
# four stages (192/384/768/1536 channels, strides 4..32) + one stride-64 level; everything else as Co-DINO R50:
# 900 queries, DN 100 (box noise 1.0), AdamW lr 2e-4 with backbone lr x0.1, wd 1e-4, lr x0.1 after epoch 11,
# soft-NMS top 300. The official checkpoints (Google Drive) convert on load: keys of the official Swin and of
# Detectron2's Swin are the same.
#
# GPU memory (not measured here: no GPU in this project's CI): trained officially with 1 image per GPU on 80 GB
# A100s; users report out-of-memory on 24 GB cards at batch 1 (Sense-X/Co-DETR #121). Memory-for-speed switches:
#   * model.query_head.transformer.num_checkpoint=6 (default, official with_cp=6): recompute the encoder layers;
#   * model.backbone.use_checkpoint=True: recompute every Swin block (off by default, as official);
#   * train.amp.enabled=True train.amp.precision=bf16: bf16 autocast (official: fp32);
#   * train.grad_accum_steps=N with fewer GPUs keeps the effective batch of 16.
from detectron2.config import LazyCall as L

from codetr.modeling.backbone import SwinL

from .co_dino_r50 import dataloader, lr_multiplier, model, optimizer, train  # incl. the collaborative branch

model.backbone = L(SwinL)(drop_path_rate=0.3, use_checkpoint=False, out_indices=(0, 1, 2, 3))
model.neck.in_features = ["p0", "p1", "p2", "p3"]
model.neck.in_channels = [192, 384, 768, 1536]
model.query_head.transformer.num_checkpoint = 6

dataloader.train.total_batch_size = 16  # 1 image per GPU x 16 GPUs (official)
train.output_dir = "./output/co_dino_swinl"
train.init_checkpoint = ""
