"""The real CoDETR of configs/demo/co_dino_synthetic.py (ResNet-18 Co-DINO, 20 classes, both auxiliary heads) on a
tiny 20-class synthetic dataset and the tiny pipeline settings of tiny_synthetic.py: a few CPU iterations in seconds."""
import os

from detectron2.config import LazyConfig

from codetr.data import register_synthetic_dataset

from .tiny_synthetic import dataloader, lr_multiplier, optimizer, train  # noqa: F401

register_synthetic_dataset("tinysynth20", num_train=8, num_val=4, num_classes=20, image_size=(64, 96), seed=5)
model = LazyConfig.load(os.path.join(os.path.dirname(__file__), "..", "..", "configs", "demo", "co_dino_synthetic.py")).model
dataloader.train.dataset.names = "tinysynth20_train"
dataloader.test.dataset.names = "tinysynth20_val"
optimizer.lr = 1e-4
train.output_dir = "./output/tiny_codetr"
train.max_iter = 4
train.checkpointer = dict(period=2, max_to_keep=10)
