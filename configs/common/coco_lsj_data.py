# COCO with large-scale jitter and copy-paste (official *_lsj_* configs): each image and a random source image
# are flipped, resized to 0.1..2.0 of 1024x1024 keeping the aspect ratio and cropped or padded (value 114) to
# exactly 1024x1024, boxes recomputed from the cropped masks; then up to 99 of the source's objects are pasted
# (CopyPaste(max_num_pasted=100)): covered parts leave the destination masks, boxes follow the masks, and mostly
# covered objects are dropped. The masks are used for pasting only (keep_masks=False: a box-only detector);
# instance models set keep_masks=True. Pair it with ``model.with_attn_mask=False``.
# Without copy-paste: dataloader.train.dataset.max_num_pasted=1 (nothing pasted, no source image read).
# The training set is the copy-paste dataset's ``dataset``; the loader's mapper is None (the dataset maps).
# Test (official LSJ test pipeline): resize to fit 1024x1024 keeping the aspect ratio; pair it with
# ``model.square_pad=1024, model.pad_value=114`` (the model pads, so boxes are rescaled by the resize factor).
import detectron2.data.transforms as T
from detectron2.config import LazyCall as L

from codetr.data import CopyPasteDataset, DetrDatasetMapper, lsj_train_augmentation

from .coco_data import dataloader

dataloader.train.dataset = L(CopyPasteDataset)(
    dataset=dataloader.train.dataset,
    mapper=L(DetrDatasetMapper)(
        is_train=True,
        augmentations=L(lsj_train_augmentation)(image_size=1024, min_scale=0.1, max_scale=2.0, pad_value=114.0),
        image_format="RGB",
        use_instance_mask=True,
        instance_mask_format="bitmask",  # as the official pipeline: masks rasterised, then resized and cropped
        recompute_boxes=True,
    ),
    max_num_pasted=100,
    keep_masks=False,
)
dataloader.train.mapper = None
dataloader.test.mapper.image_format = "${...train.dataset.mapper.image_format}"
dataloader.test.mapper.augmentations = [L(T.ResizeShortestEdge)(short_edge_length=1024, max_size=1024)]
