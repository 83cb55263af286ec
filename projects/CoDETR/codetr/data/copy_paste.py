"""Simple copy-paste augmentation (Ghiasi et al. 2021) as the official Co-DETR LSJ recipes use it.

Semantics (official pipeline: ``CopyPaste(max_num_pasted=100)`` after the LSJ load pipeline, through mmdet's
``MultiImageMixDataset``):

1. the destination image and a source image drawn uniformly from the dataset are each augmented on their own
   (LSJ: resize, crop, flip, pad to the same fixed size);
2. a random number of the source's objects, uniform in ``0 .. min(n, max_num_pasted - 1)``, is picked without
   replacement (all of them with ``selected=False``); with none picked the destination is returned unchanged;
3. the union of the picked masks replaces the destination's pixels there, and is removed from every
   destination mask; each destination box becomes the tight box of what is left of its mask;
4. a destination object is kept if its box moved by at most ``bbox_occluded_thr`` pixels on every side or
   more than ``mask_occluded_thr`` pixels of its mask are still visible; kept objects with an empty box
   (fully covered) are then dropped;
5. the picked source objects (boxes, classes, masks) are appended.

:func:`paste_instances` does steps 3-5 on two mapped images; :class:`CopyPasteDataset` wraps the training set
and its mapper and adds steps 1-2.
"""
import logging

import numpy as np
import torch
from detectron2.data import DatasetFromList
from detectron2.data import detection_utils as utils
from detectron2.structures import BitMasks, Boxes, Instances, PolygonMasks

__all__ = ["paste_instances", "CopyPasteDataset"]


def _as_bitmasks(masks, image_size) -> torch.Tensor:
    """(N, H, W) bool tensor from ``BitMasks`` or ``PolygonMasks``."""
    if isinstance(masks, BitMasks):
        return masks.tensor.to(torch.bool)
    if isinstance(masks, PolygonMasks):
        return BitMasks.from_polygon_masks(masks, *image_size).tensor
    raise TypeError(f"copy-paste needs BitMasks or PolygonMasks as gt_masks, got {type(masks).__name__}")


def paste_instances(dst_image: torch.Tensor, dst: Instances, src_image: torch.Tensor, src: Instances, *,
                    bbox_occluded_thr: float = 10.0, mask_occluded_thr: int = 300):
    """Paste all of ``src``'s objects onto the destination image.

    Args:
        dst_image, src_image: (C, H, W) images of the same size (any dtype).
        dst, src: ``Instances`` with ``gt_boxes``, ``gt_classes`` and ``gt_masks`` (``BitMasks`` or
            ``PolygonMasks``) in their image's coordinates.
        bbox_occluded_thr: a destination object whose recomputed box moved by at most this many pixels on
            every side is kept.
        mask_occluded_thr: ... as is one with more than this many mask pixels left visible.
    Returns:
        (image, instances): the pasted (C, H, W) image (``dst_image``'s dtype) and ``Instances`` with
        ``gt_boxes``, ``gt_classes`` and ``gt_masks`` (``BitMasks``): the kept destination objects, then the
        source objects (with no source object: the destination unchanged, its masks as ``BitMasks``).
    """
    if dst_image.shape != src_image.shape:
        raise ValueError(
            f"copy-paste needs destination and source images of the same size, got {tuple(dst_image.shape)} "
            f"and {tuple(src_image.shape)}: use a fixed-size augmentation (e.g. LSJ's FixedSizeCrop(pad=True))"
        )
    image_size = tuple(dst_image.shape[-2:])
    dst_masks = _as_bitmasks(dst.gt_masks, image_size)
    if len(src) == 0:
        out = Instances(image_size, gt_boxes=dst.gt_boxes, gt_classes=dst.gt_classes, gt_masks=BitMasks(dst_masks))
        return dst_image, out
    src_masks = _as_bitmasks(src.gt_masks, image_size)
    pasted = src_masks.any(dim=0)  # (H, W)
    dst_masks = dst_masks & ~pasted
    new_boxes = BitMasks(dst_masks).get_bounding_boxes().tensor
    old_boxes = dst.gt_boxes.tensor.to(new_boxes.dtype)
    keep = ((new_boxes - old_boxes).abs() <= bbox_occluded_thr).all(dim=1)
    keep |= dst_masks.flatten(1).sum(dim=1) > mask_occluded_thr
    keep &= (new_boxes[:, 2] > new_boxes[:, 0]) & (new_boxes[:, 3] > new_boxes[:, 1])  # fully covered

    image = torch.where(pasted, src_image.to(dst_image.dtype), dst_image)
    out = Instances(image_size)
    out.gt_boxes = Boxes(torch.cat([new_boxes[keep], src.gt_boxes.tensor.to(new_boxes.dtype)]))
    out.gt_classes = torch.cat([dst.gt_classes[keep], src.gt_classes])
    out.gt_masks = BitMasks(torch.cat([dst_masks[keep], src_masks]))
    return image, out


class CopyPasteDataset(torch.utils.data.Dataset):
    """The training set with copy-paste (the official ``MultiImageMixDataset`` + ``CopyPaste``; see the module
    docstring): item ``i`` is ``mapper`` applied to image ``i`` and to a source image drawn uniformly from the
    same dataset, then some of the source's objects pasted. Use it as the train loader's ``dataset`` with
    ``mapper=None`` (it maps the images itself).

    Args:
        dataset: a list of dataset dicts.
        mapper: a training mapper returning "image" (C, H, W) and "instances" with ``gt_masks``
            (:class:`DetrDatasetMapper` with ``use_instance_mask=True``), and images of one fixed size.
        max_num_pasted: the number of pasted objects is uniform in ``0 .. min(n, max_num_pasted - 1)``
            (1: copy-paste off, no source image is read).
        bbox_occluded_thr, mask_occluded_thr: see :func:`paste_instances`.
        selected: False pastes every source object.
        keep_masks: False drops ``gt_masks`` from the output (a box-only detector trained with copy-paste,
            as the official box-only LSJ configs).
    """

    def __init__(self, dataset, mapper, *, max_num_pasted: int = 100, bbox_occluded_thr: float = 10.0,
                 mask_occluded_thr: int = 300, selected: bool = True, keep_masks: bool = True):
        if getattr(mapper, "use_instance_mask", True) is False:
            raise ValueError("CopyPasteDataset needs a mapper that loads instance masks (use_instance_mask=True)")
        if max_num_pasted < 1:
            raise ValueError(f"max_num_pasted must be >= 1, got {max_num_pasted}")
        if len(dataset) == 0:
            raise ValueError("CopyPasteDataset: the dataset is empty")
        self.dataset = dataset if isinstance(dataset, DatasetFromList) else DatasetFromList(list(dataset), copy=False)
        self.mapper = mapper
        self.max_num_pasted = int(max_num_pasted)
        self.bbox_occluded_thr = bbox_occluded_thr
        self.mask_occluded_thr = mask_occluded_thr
        self.selected = selected
        self.keep_masks = keep_masks
        logging.getLogger(__name__).info(
            f"[CopyPasteDataset] {len(self.dataset)} images, up to {max_num_pasted - 1} objects pasted per image"
        )

    def __len__(self):
        return len(self.dataset)

    def _select(self, inst: Instances) -> Instances:
        if not self.selected:
            return inst
        n = len(inst)
        num = np.random.randint(0, min(n + 1, self.max_num_pasted))
        return inst[torch.as_tensor(np.random.choice(n, size=num, replace=False), dtype=torch.long)]

    def __getitem__(self, idx):
        dst = self.mapper(self.dataset[idx])
        if self.selected and self.max_num_pasted == 1:  # nothing is ever pasted: skip the source image
            if not self.keep_masks and "instances" in dst and dst["instances"].has("gt_masks"):
                dst["instances"].remove("gt_masks")
            return dst
        src = self.mapper(self.dataset[np.random.randint(len(self.dataset))])
        for d in (dst, src):
            if "instances" not in d or not d["instances"].has("gt_masks"):
                raise ValueError(f"{d['file_name']}: copy-paste needs instances with gt_masks from the mapper")
        image, inst = paste_instances(
            dst["image"], dst["instances"], src["image"], self._select(src["instances"]),
            bbox_occluded_thr=self.bbox_occluded_thr, mask_occluded_thr=self.mask_occluded_thr,
        )
        inst = utils.filter_empty_instances(inst)
        if not self.keep_masks:
            inst.remove("gt_masks")
        dst["image"], dst["instances"] = image, inst
        return dst
