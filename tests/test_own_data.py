"""One class count per config (every head reads model.query_head.num_classes), and the COCO-format template:
with only its documented edits it trains and evaluates on a generated dataset whose class count is not the demo's."""
import glob
import os
import re
import sys

import pytest
import torch
from omegaconf import DictConfig, ListConfig

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import pipeline_utils as pu  # noqa: E402  (sets CODETR_SYNTHETIC_ROOT before codetr.data is imported)

from detectron2.config import LazyConfig, instantiate  # noqa: E402

from codetr.data import generate_synthetic_coco, register_coco_dataset  # noqa: E402

CONFIGS = sorted(
    os.path.relpath(p, os.path.join(pu.ROOT, "configs"))
    for p in glob.glob(os.path.join(pu.ROOT, "configs", "**", "*.py"), recursive=True)
    if "/common/" not in p and not p.endswith("coco_format_template.py")
)


def _num_classes_values(node, path="model"):
    """(dotted path, resolved value) of every key named num_classes under ``node``."""
    found = []
    if isinstance(node, DictConfig):
        for k in node.keys():
            v = node[k]
            if k == "num_classes":
                found.append((f"{path}.{k}", v))
            else:
                found += _num_classes_values(v, f"{path}.{k}")
    elif isinstance(node, ListConfig):
        for i, v in enumerate(node):
            found += _num_classes_values(v, f"{path}.{i}")
    return found


@pytest.mark.parametrize("name", CONFIGS)
def test_every_head_reads_the_query_heads_num_classes(name):
    cfg = LazyConfig.load(os.path.join(pu.ROOT, "configs", name))
    before = _num_classes_values(cfg.model)
    assert any(p == "model.query_head.num_classes" for p, _ in before), name
    cfg = LazyConfig.apply_overrides(cfg, ["model.query_head.num_classes=7"])
    after = _num_classes_values(cfg.model)
    assert len(after) == len(before)
    assert all(v == 7 for _, v in after), f"{name}: heads not following model.query_head.num_classes: {after}"
    if cfg.model.get("collaborative") is not None:  # the branch and both auxiliary heads are among them
        assert {p for p, _ in after} >= {"model.collaborative.num_classes", "model.collaborative.aux_heads.0.num_classes",
                                         "model.collaborative.aux_heads.1.num_classes"}


def _make_dataset(root, num_classes):
    paths = {}
    for split, n, seed in (("train", 6, 1), ("val", 3, 2)):
        paths[split] = generate_synthetic_coco(root, n, num_classes=num_classes, image_size=(48, 64), seed=seed,
                                               split=split)
    return paths


def _edited_template(tmp_path, paths, num_classes):
    """The template copied elsewhere with exactly the edits its header documents (four paths, NUM_CLASSES)."""
    text = open(os.path.join(pu.ROOT, "configs", "demo", "coco_format_template.py")).read()
    edits = {"TRAIN_JSON": paths["train"], "TRAIN_IMAGES": os.path.join(os.path.dirname(paths["train"]), "train"),
             "VAL_JSON": paths["val"], "VAL_IMAGES": os.path.join(os.path.dirname(paths["val"]), "val")}
    for key, value in edits.items():
        text, n = re.subn(rf'^{key} = ".*"$', f"{key} = {value!r}", text, flags=re.M)
        assert n == 1, key
    text, n = re.subn(r"^NUM_CLASSES = \d+$", f"NUM_CLASSES = {num_classes}", text, flags=re.M)
    assert n == 1
    path = tmp_path / "my_dataset.py"
    path.write_text(text)
    return str(path)


@pytest.fixture
def free_template_names():
    """The template registers my_dataset_train / my_dataset_val: free them before and after (other tests load the
    template with its default paths, which would clash with this test's files)."""
    from detectron2.data import DatasetCatalog, MetadataCatalog

    def free():
        for n in ("my_dataset_train", "my_dataset_val"):
            if n in DatasetCatalog.list():
                DatasetCatalog.remove(n)
                MetadataCatalog.remove(n)

    free()
    yield
    free()


def test_template_trains_and_evaluates_on_a_three_class_dataset(tmp_path, free_template_names):
    from detectron2.data import MetadataCatalog

    paths = _make_dataset(str(tmp_path / "data"), num_classes=3)
    config = _edited_template(tmp_path, paths, 3)
    cfg = LazyConfig.load(config)
    torch.manual_seed(0)
    model = instantiate(cfg.model)
    assert model.query_head.num_classes == 3 and model.collaborative.num_classes == 3
    assert [h.num_classes for h in model.collaborative.aux_heads] == [3, 3]
    assert model.query_head.cls_branches[0].out_features == 3

    script = pu.load_train_script()
    out = str(tmp_path / "run")
    args = script.build_argument_parser().parse_args(
        ["--config-file", config, f"train.output_dir={out}", "train.max_iter=2", "train.checkpointer.period=100",
         "train.log_period=1"]
    )
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        results = script.main(args)
    finally:
        torch.set_num_threads(n)
    assert set(results) == {"bbox"} and 0.0 <= results["bbox"]["AP"] <= 100.0
    assert MetadataCatalog.get("my_dataset_val").thing_classes == ["red square", "green square", "blue square"]
    assert os.path.isfile(os.path.join(out, "model_final.pth")) and os.path.isfile(os.path.join(out, "metrics.png"))

    # loading the same config again (same files) is fine; a class count that is not the json's stops the script
    # before training, naming both numbers
    wrong = _edited_template(tmp_path, paths, 5)
    args = script.build_argument_parser().parse_args(["--config-file", wrong, f"train.output_dir={out}_wrong"])
    with pytest.raises(ValueError, match="num_classes=5 .* has 3 classes"):
        script.main(args)


def test_register_coco_dataset_is_idempotent_and_rejects_other_files(tmp_path):
    paths = _make_dataset(str(tmp_path), num_classes=2)
    image_root = os.path.join(str(tmp_path), "val")
    assert register_coco_dataset("codetr_test_own_val", paths["val"], image_root) == "codetr_test_own_val"
    assert register_coco_dataset("codetr_test_own_val", paths["val"], image_root) == "codetr_test_own_val"
    with pytest.raises(ValueError, match="already registered"):
        register_coco_dataset("codetr_test_own_val", paths["train"], image_root)
    from detectron2.data import DatasetCatalog

    assert len(DatasetCatalog.get("codetr_test_own_val")) == 3
