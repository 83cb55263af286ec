"""tiny_synthetic.py with repeat-factor sampling (as configs/common/lvis_data.py), for the resume tests."""
from detectron2.config import LazyCall as L
from detectron2.data.samplers import RepeatFactorTrainingSampler

from .tiny_synthetic import dataloader, lr_multiplier, model, optimizer, train  # noqa: F401

dataloader.train.sampler = L(RepeatFactorTrainingSampler)(
    repeat_factors=L(RepeatFactorTrainingSampler.repeat_factors_from_category_frequency)(
        dataset_dicts="${dataloader.train.dataset}", repeat_thresh=0.5
    )
)
