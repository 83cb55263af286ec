# Train Co-DINO on your own COCO-format dataset (one annotation json + one image folder per split).
#
# 1. Copy this file anywhere (it imports its base config through codetr.model_zoo, not by a relative path).
# 2. Edit the five values of the EDIT block: the four paths and NUM_CLASSES, the number of categories in your json.
#    NUM_CLASSES is the only class count to set: the query head holds it and the collaborative branch and both
#    auxiliary heads read it by config interpolation; the training script stops before training, naming both
#    numbers, if it differs from the json's category count.
# 3. python tools/lazyconfig_train_net.py --config-file my_dataset.py
#    (any value can still be overridden on the command line, e.g. train.max_iter=2000 train.output_dir=out/x)
#
# The base is the small CPU Co-DINO of the demo (configs/demo/co_dino_synthetic.py: ResNet-18 from scratch,
# images at a short side of 160..224); for real data on GPUs base it on "co_dino_r50.py" instead (DETR
# augmentation, ImageNet-initialised R50; add train.device=cuda) -- the lines below work for both.
# Category ids in the json may be any integers: detectron2 maps them to 0..NUM_CLASSES-1 in sorted order.
from codetr import model_zoo
from codetr.data import register_coco_dataset

# ---------------------------------------------------------------- EDIT
TRAIN_JSON = "datasets/my_dataset/annotations/train.json"
TRAIN_IMAGES = "datasets/my_dataset/train"
VAL_JSON = "datasets/my_dataset/annotations/val.json"
VAL_IMAGES = "datasets/my_dataset/val"
NUM_CLASSES = 3
# ----------------------------------------------------------------

_base = model_zoo.get_config("demo/co_dino_synthetic.py")

model = _base.model
model.query_head.num_classes = NUM_CLASSES

dataloader = _base.dataloader
dataloader.train.dataset.names = register_coco_dataset("my_dataset_train", TRAIN_JSON, TRAIN_IMAGES)
dataloader.test.dataset.names = register_coco_dataset("my_dataset_val", VAL_JSON, VAL_IMAGES)

optimizer = _base.optimizer
lr_multiplier = _base.lr_multiplier
train = _base.train
train.output_dir = "./output/my_dataset"
