"""The data configs and the demo config: settings, instantiation of mappers/model, LazyConfig round trip."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import pipeline_utils as pu  # noqa: E402

import detectron2.data.transforms as T  # noqa: E402
from detectron2.config import LazyConfig, instantiate  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from codetr.data import DetrDatasetMapper, RandomChoice  # noqa: E402


def _load(rel):
    return LazyConfig.load(os.path.join(pu.ROOT, "configs", rel))


def test_coco_lsj_lvis_data_configs():
    coco = _load("common/coco_data.py").dataloader
    assert coco.train.dataset.names == "coco_2017_train" and coco.train.dataset.filter_empty is True
    assert coco.test.dataset.filter_empty is False
    assert coco.evaluator.max_dets_per_image == 300
    mapper = instantiate(coco.train.mapper)
    assert isinstance(mapper, DetrDatasetMapper)
    augs = mapper.augmentations.augs
    assert isinstance(augs[0], T.RandomFlip) and isinstance(augs[1], RandomChoice)
    assert augs[1].choices[0].augs[0].short_edge_length == tuple(range(480, 801, 32))
    lsj = _load("common/coco_lsj_data.py").dataloader
    assert lsj.train.mapper is None and lsj.train.dataset.dataset.names == "coco_2017_train"
    mapper = instantiate(lsj.train.dataset.mapper)
    augs = mapper.augmentations.augs
    assert isinstance(augs[1], T.ResizeScale) and isinstance(augs[2], T.FixedSizeCrop)
    assert augs[2].crop_size == (1024, 1024) and augs[2].pad_value == 114.0 and augs[2].seg_pad_value == 0
    assert mapper.use_instance_mask and mapper.recompute_boxes and mapper.instance_mask_format == "bitmask"
    assert lsj.train.dataset.max_num_pasted == 100 and lsj.train.dataset.keep_masks is False
    assert OmegaConf.select(lsj, "test.mapper.image_format") == "RGB"
    lvis = _load("common/lvis_data.py").dataloader
    assert lvis.train.dataset.names == "lvis_v1_train" and lvis.test.dataset.names == "lvis_v1_val"
    assert lvis.evaluator.max_dets_per_image == 1000


def test_demo_config_builds_a_co_dino_and_round_trips(tmp_path):
    cfg = _load("demo/co_dino_synthetic.py")
    assert cfg.dataloader.train.dataset.names == "codetr_synthetic_train"
    assert cfg.train.device == "cpu" and cfg.train.clip_grad.max_norm == 0.1
    model = instantiate(cfg.model)
    assert model.collaborative is not None and len(model.collaborative.aux_heads) == 2
    from detectron2.data import MetadataCatalog

    # the model's classes match the dataset's (metadata is set at registration, before generation)
    assert model.query_head.num_classes == len(MetadataCatalog.get("codetr_synthetic_train").thing_classes) == 20
    path = str(tmp_path / "demo.yaml")
    LazyConfig.save(cfg, path)
    assert os.path.exists(path)
    again = LazyConfig.load(path)
    assert again.model.query_head.num_classes == 20 and again.train.max_iter == cfg.train.max_iter
