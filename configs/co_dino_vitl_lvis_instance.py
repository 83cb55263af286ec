# Co-DINO-Inst ViT-L on LVIS v1 (official co_dino_5scale_lsj_vit_large_lvis_instance, HEAD 2665352):
# configs/co_dino_vitl_lvis.py plus the mask branch of configs/co_dino_vitl_instance.py with 1203 classes; the
# official README reports 67.3 box / 60.7 mask AP on LVIS v1 val (Objects365 pre-trained).
#
#   python tools/lazyconfig_train_net.py --config-file configs/co_dino_vitl_lvis_instance.py --eval-only \
#       train.init_checkpoint=<the official Co-DINO-Inst ViT-L LVIS checkpoint, https://huggingface.co/zongzhuofan>
#
# Training data as the LVIS box config: LSJ 1536 with copy-paste, here keeping the (pasted, occlusion-updated) masks
# as targets (the official LVIS instance config is an inference config: its training pipeline lists CopyPaste
# without the mixing dataset it needs). Evaluation: LVIS bbox and segm at 1000 detections per image.
from .co_dino_vitl_instance import model as _inst_model
from .co_dino_vitl_lvis import dataloader, lr_multiplier, model, optimizer, train

model.mask_branch = _inst_model.mask_branch
dataloader.train.dataset.keep_masks = True
dataloader.evaluator.tasks = ("bbox", "segm")
train.output_dir = "./output/co_dino_vitl_lvis_instance"
