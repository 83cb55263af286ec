"""Co-DINO R50 with the auxiliary heads ATSS + RetinaNet; everything else as configs/co_dino_r50.py
(whose heads are Faster R-CNN + ATSS). The heads are one list, built by common/models/aux_heads.py with the x12
loss weights; the query head has one positive-query projection per head. The paper's ablation of the auxiliary
heads: more heads help at first, then their assignments conflict (compare with tools/benchmark_train.py converge)."""
from .co_dino_r50 import dataloader, lr_multiplier, model, optimizer, train
from .common.models.aux_heads import CO_DINO_STRIDES, atss, retinanet

model.collaborative.aux_heads = [atss(0, CO_DINO_STRIDES), retinanet(1, CO_DINO_STRIDES)]
model.query_head.transformer.num_co_heads = 2
train.output_dir = "./output/co_dino_r50_atss_retinanet"

__all__ = ["dataloader", "lr_multiplier", "model", "optimizer", "train"]
