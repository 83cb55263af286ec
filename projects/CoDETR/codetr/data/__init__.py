"""codetr.data: dataset mapper (boxes, optionally instance masks), copy-paste, DETR/LSJ augmentations, the
embedded synthetic dataset (boxes and instance masks).

Importing this module registers the synthetic datasets ``codetr_synthetic_train`` / ``codetr_synthetic_val``
(generated under ``$CODETR_SYNTHETIC_ROOT`` or ``$DETECTRON2_DATASETS/codetr_synthetic`` on first use).
"""
from .augmentations import (
    DETR_MIN_SIZES,
    RandomChoice,
    detr_train_augmentation,
    lsj_train_augmentation,
    test_augmentation,
)
from .checks import (
    check_dataset_files,
    check_dataset_registered,
    check_num_classes,
    dataset_num_classes,
    get_detection_dataset_dicts,
)
from .copy_paste import CopyPasteDataset, paste_instances
from .coco_format import register_coco_dataset
from .mapper import DetrDatasetMapper
from .samplers import ResumableSampler
from .synthetic import (
    default_synthetic_root,
    ensure_synthetic_dataset,
    generate_synthetic_coco,
    register_synthetic_dataset,
    synthetic_class_names,
)

SYNTHETIC_TRAIN, SYNTHETIC_VAL = register_synthetic_dataset()

__all__ = [k for k in globals() if not k.startswith("_")]
