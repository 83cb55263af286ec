# The DINO baseline of the demo: configs/demo/co_dino_synthetic.py without the collaborative branch (no auxiliary
# heads, no positive-query passes), everything else -- backbone, transformer, data, schedule, seed -- the same.
# Co-DINO vs DINO in one command: python tools/co_dino_vs_dino.py (README "Co-DINO vs DINO in miniature").
from .co_dino_synthetic import dataloader, lr_multiplier, model, optimizer, train

model.collaborative = None
model.query_head.transformer.num_co_heads = 0
train.output_dir = "./output/demo_dino_synthetic"
