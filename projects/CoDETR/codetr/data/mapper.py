"""``DetrDatasetMapper``: the dataset mapper of the DETR-style detectors (boxes, optionally instance masks).

Reads the image (a clear ValueError naming the file when it can't be decoded), applies the augmentations,
and in training turns the non-crowd annotations into ``Instances(gt_boxes, gt_classes[, gt_masks])`` in the
augmented image's coordinates, through detectron2's ``transform_instance_annotations`` and
``annotations_to_instances``; instances emptied by a crop are dropped (an image may end with no instances,
which DETR-style losses handle). Keypoints are never loaded.
"""
import copy
import logging

import numpy as np
import torch
import detectron2.data.detection_utils as utils
import detectron2.data.transforms as T
from detectron2.structures import BitMasks, PolygonMasks

__all__ = ["DetrDatasetMapper"]


class DetrDatasetMapper:
    """
    Args:
        is_train: whether annotations are loaded (training) or dropped (inference).
        augmentations: list of detectron2 augmentations / transforms.
        image_format: format for :func:`detectron2.data.detection_utils.read_image` ("BGR", "RGB").
        use_instance_mask: keep the annotations' "segmentation" (polygons or COCO RLE) as ``gt_masks``
            (as detectron2's ``DatasetMapper``); an image whose instances are all gone still gets an empty
            ``gt_masks``.
        instance_mask_format: "polygon" (``PolygonMasks``; needs polygon annotations) or "bitmask"
            (``BitMasks`` (N, H, W) bool; polygons and RLE).
        recompute_boxes: replace each box by the tight box of its transformed mask (the official LSJ
            ``RandomCrop(recompute_bbox=True)``: a cropped object's box shrinks to its visible part).
            Needs ``use_instance_mask``.
    Returns per image the standard dict plus "image" (C, H, W) uint8 tensor and in training "instances".
    """

    def __init__(self, is_train: bool, augmentations, image_format: str = "BGR", *,
                 use_instance_mask: bool = False, instance_mask_format: str = "polygon",
                 recompute_boxes: bool = False):
        if recompute_boxes and not use_instance_mask:
            raise ValueError("DetrDatasetMapper: recompute_boxes=True needs use_instance_mask=True")
        if instance_mask_format not in ("polygon", "bitmask"):
            raise ValueError(f"instance_mask_format must be 'polygon' or 'bitmask', got {instance_mask_format!r}")
        self.is_train = is_train
        self.augmentations = T.AugmentationList(list(augmentations))
        self.image_format = image_format
        self.use_instance_mask = use_instance_mask
        self.instance_mask_format = instance_mask_format
        self.recompute_boxes = recompute_boxes
        logging.getLogger(__name__).info(
            f"[DetrDatasetMapper] augmentations used in {'training' if is_train else 'inference'}: "
            f"{self.augmentations}" + (f"; instance masks ({instance_mask_format})" if use_instance_mask else "")
        )

    def __call__(self, dataset_dict):
        dataset_dict = copy.deepcopy(dataset_dict)
        file_name = dataset_dict["file_name"]
        try:
            image = utils.read_image(file_name, format=self.image_format)
        except Exception as e:
            raise ValueError(f"cannot read image file {file_name!r}: {type(e).__name__}: {e}") from e
        utils.check_image_size(dataset_dict, image)

        aug_input = T.AugInput(image)
        transforms = self.augmentations(aug_input)
        image = aug_input.image
        image_shape = image.shape[:2]
        dataset_dict["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))

        annos = dataset_dict.pop("annotations", None)
        if not self.is_train or annos is None:
            return dataset_dict
        dropped = ("keypoints",) if self.use_instance_mask else ("segmentation", "keypoints")
        annos = [
            {k: v for k, v in obj.items() if k not in dropped} for obj in annos if obj.get("iscrowd", 0) == 0
        ]
        if self.use_instance_mask:
            for obj in annos:
                if "segmentation" not in obj:
                    raise ValueError(
                        f"{file_name}: use_instance_mask=True but an annotation has no 'segmentation'"
                    )
        annos = [utils.transform_instance_annotations(obj, transforms, image_shape) for obj in annos]
        try:
            instances = utils.annotations_to_instances(annos, image_shape, mask_format=self.instance_mask_format)
        except ValueError as e:
            if self.instance_mask_format != "polygon":
                raise
            raise ValueError(f"{file_name}: {e} (RLE masks need instance_mask_format='bitmask')") from e
        if self.use_instance_mask and not instances.has("gt_masks"):  # no annotations
            instances.gt_masks = (
                PolygonMasks([]) if self.instance_mask_format == "polygon"
                else BitMasks(torch.zeros((0, *image_shape), dtype=torch.bool))
            )
        if self.recompute_boxes:
            instances.gt_boxes = instances.gt_masks.get_bounding_boxes()
        dataset_dict["instances"] = utils.filter_empty_instances(instances)
        return dataset_dict
