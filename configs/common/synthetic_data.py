# The embedded synthetic dataset (codetr_synthetic_train / codetr_synthetic_val: 20 classes = 5 shapes x 4
# colours, 1000 + 100 images of 224..320 px, objects from ~6 px to ~70% of the image, occlusion, crowded
# images), generated on first use under $CODETR_SYNTHETIC_ROOT or $DETECTRON2_DATASETS/codetr_synthetic.
# Small images: multi-scale training resize (short side 224..320) + flip; test at 256.
from omegaconf import OmegaConf

import detectron2.data.transforms as T
from detectron2.config import LazyCall as L
from detectron2.data import build_detection_test_loader, build_detection_train_loader

from codetr.data import DetrDatasetMapper, get_detection_dataset_dicts
from codetr.evaluation import build_detection_evaluator

dataloader = OmegaConf.create()

dataloader.train = L(build_detection_train_loader)(
    dataset=L(get_detection_dataset_dicts)(names="codetr_synthetic_train", filter_empty=True),
    mapper=L(DetrDatasetMapper)(
        is_train=True,
        augmentations=[
            L(T.RandomFlip)(horizontal=True),
            L(T.ResizeShortestEdge)(short_edge_length=(224, 256, 288, 320), max_size=448, sample_style="choice"),
        ],
        image_format="RGB",
    ),
    total_batch_size=4,
    num_workers=0,
)

dataloader.test = L(build_detection_test_loader)(
    dataset=L(get_detection_dataset_dicts)(names="codetr_synthetic_val", filter_empty=False),
    mapper=L(DetrDatasetMapper)(
        is_train=False,
        augmentations=[L(T.ResizeShortestEdge)(short_edge_length=256, max_size=448)],
        image_format="${...train.mapper.image_format}",
    ),
    num_workers=0,
)

dataloader.evaluator = L(build_detection_evaluator)(
    dataset_name="${..test.dataset.names}", max_dets_per_image=100, output_dir=None
)
