# COCO 2017 through detectron2's builtin names (coco_2017_train / coco_2017_val under $DETECTRON2_DATASETS),
# box-only, RGB, with the official DETR training augmentation (spec §2): flip, then either a multi-scale
# resize (short side 480..800 step 32, long side <= 1333) or resize {400,500,600} -> random crop 384..600 ->
# the same multi-scale resize. Images without annotations are dropped from training (mmdet filter_empty_gt).
# Test: 800 / 1333. Evaluation counts up to 300 detections per image (the model's top-k; COCOEvaluator's
# default of 100 would under-report AP).
from omegaconf import OmegaConf

from detectron2.config import LazyCall as L
from detectron2.data import build_detection_test_loader, build_detection_train_loader

from codetr.data import DetrDatasetMapper, detr_train_augmentation, get_detection_dataset_dicts, test_augmentation
from codetr.evaluation import build_detection_evaluator

dataloader = OmegaConf.create()

dataloader.train = L(build_detection_train_loader)(
    dataset=L(get_detection_dataset_dicts)(names="coco_2017_train", filter_empty=True),
    mapper=L(DetrDatasetMapper)(
        is_train=True,
        augmentations=L(detr_train_augmentation)(
            min_sizes=(480, 512, 544, 576, 608, 640, 672, 704, 736, 768, 800),
            max_size=1333,
            crop_resize_sizes=(400, 500, 600),
            crop_size=(384, 600),
        ),
        image_format="RGB",
    ),
    total_batch_size=16,
    num_workers=4,
)

dataloader.test = L(build_detection_test_loader)(
    dataset=L(get_detection_dataset_dicts)(names="coco_2017_val", filter_empty=False),
    mapper=L(DetrDatasetMapper)(
        is_train=False,
        augmentations=L(test_augmentation)(short_edge=800, max_size=1333),
        image_format="${...train.mapper.image_format}",
    ),
    num_workers=4,
)

# the model keeps 300 detections per image: evaluate AP with up to 300 (maxDets 1, 10, 300)
dataloader.evaluator = L(build_detection_evaluator)(
    dataset_name="${..test.dataset.names}", max_dets_per_image=300, output_dir=None
)
