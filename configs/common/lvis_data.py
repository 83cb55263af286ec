# LVIS v1 (1203 classes) through detectron2's builtin names (lvis_v1_train / lvis_v1_val, images from coco/).
# DETR augmentation as for COCO; repeat-factor sampling (threshold 0.001) for the long tail.
# Evaluation: the official Co-DETR LVIS numbers count up to 1000 detections per image (LVISEvaluator's
# default is 300) - keep ``dataloader.evaluator.max_dets_per_image`` equal to the model's top-k.
from detectron2.config import LazyCall as L
from detectron2.data.samplers import RepeatFactorTrainingSampler

from .coco_data import dataloader

dataloader.train.dataset.names = "lvis_v1_train"
dataloader.train.sampler = L(RepeatFactorTrainingSampler)(
    repeat_factors=L(RepeatFactorTrainingSampler.repeat_factors_from_category_frequency)(
        dataset_dicts="${dataloader.train.dataset}", repeat_thresh=0.001
    )
)
dataloader.test.dataset.names = "lvis_v1_val"
dataloader.evaluator.max_dets_per_image = 1000
