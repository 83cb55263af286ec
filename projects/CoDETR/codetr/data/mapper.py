"""``DetrDatasetMapper``: a box-only dataset mapper (no masks, no keypoints).

Reads the image (a clear ValueError naming the file when it can't be decoded), applies the augmentations,
and in training turns the non-crowd box annotations into ``Instances(gt_boxes, gt_classes)`` in the
augmented image's coordinates; boxes emptied by a crop are dropped (an image may end with no boxes,
which DETR-style losses handle).
"""
import copy
import logging

import numpy as np
import torch
import detectron2.data.detection_utils as utils
import detectron2.data.transforms as T

__all__ = ["DetrDatasetMapper"]


class DetrDatasetMapper:
    """
    Args:
        is_train: whether annotations are loaded (training) or dropped (inference).
        augmentations: list of detectron2 augmentations / transforms.
        image_format: format for :func:`detectron2.data.detection_utils.read_image` ("BGR", "RGB").
    Returns per image the standard dict plus "image" (C, H, W) uint8 tensor and in training "instances".
    """

    def __init__(self, is_train: bool, augmentations, image_format: str = "BGR"):
        self.is_train = is_train
        self.augmentations = T.AugmentationList(list(augmentations))
        self.image_format = image_format
        logging.getLogger(__name__).info(
            f"[DetrDatasetMapper] augmentations used in {'training' if is_train else 'inference'}: "
            f"{self.augmentations}"
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
        annos = [
            utils.transform_instance_annotations(
                {k: v for k, v in obj.items() if k not in ("segmentation", "keypoints")}, transforms, image_shape
            )
            for obj in annos
            if obj.get("iscrowd", 0) == 0
        ]
        instances = utils.annotations_to_instances(annos, image_shape)
        dataset_dict["instances"] = utils.filter_empty_instances(instances)
        return dataset_dict
