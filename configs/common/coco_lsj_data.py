# COCO with large-scale jitter (official *_lsj_* configs): flip, resize to 0.1..2.0 of 1024x1024 keeping the
# aspect ratio, crop or pad (value 114) to exactly 1024x1024. Pair it with ``model.with_attn_mask=False``.
# (The official LSJ recipe also uses copy-paste, which needs masks: not in this box-only pipeline.)
from detectron2.config import LazyCall as L

from codetr.data import lsj_train_augmentation

from .coco_data import dataloader

dataloader.train.mapper.augmentations = L(lsj_train_augmentation)(
    image_size=1024, min_scale=0.1, max_scale=2.0, pad_value=114.0
)
