"""Learning check: a tiny DINO overfits a few synthetic images to AP50 >= 0.9 (COCOEvaluator / pycocotools)."""
import resource
import time

import pytest
import torch

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation import COCOEvaluator
from detectron2.structures import BoxMode, Boxes, Instances
from detectron2.utils.events import EventStorage

from dino_utils import one_thread, tiny_model  # noqa: F401 (fixture)

COLORS = torch.tensor([[230, 40, 40], [40, 230, 40], [40, 40, 230]], dtype=torch.uint8)
DATASET = "codetr_test_dino_overfit"
MAX_ITERS = 150


def make_data(n_img=4, size=48, seed=0):
    """Images of dark noise with 1-3 solid rectangles, one colour per class (3 classes)."""
    g = torch.Generator().manual_seed(seed)
    inputs, dicts = [], []
    for i in range(n_img):
        img = (torch.rand(3, size, size, generator=g) * 40).to(torch.uint8)
        boxes, classes = [], []
        for _ in range(1 + i % 3):
            c = int(torch.randint(0, 3, (1,), generator=g))
            w, h = (int(v) for v in torch.randint(12, 28, (2,), generator=g))
            x0 = int(torch.randint(0, size - w, (1,), generator=g))
            y0 = int(torch.randint(0, size - h, (1,), generator=g))
            img[:, y0 : y0 + h, x0 : x0 + w] = COLORS[c][:, None, None]
            boxes.append([x0, y0, x0 + w, y0 + h])
            classes.append(c)
        inst = Instances((size, size))
        inst.gt_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32))
        inst.gt_classes = torch.tensor(classes)
        inputs.append({"image": img, "instances": inst, "height": size, "width": size, "image_id": i, "file_name": f"syn{i}.png"})
        dicts.append(
            {
                "file_name": f"syn{i}.png",
                "image_id": i,
                "height": size,
                "width": size,
                "annotations": [
                    {"bbox": b, "bbox_mode": BoxMode.XYXY_ABS, "category_id": c, "iscrowd": 0} for b, c in zip(boxes, classes)
                ],
            }
        )
    return inputs, dicts


def evaluate(model, inputs, evaluator):
    model.eval()
    evaluator.reset()
    with torch.no_grad():
        test_inputs = [{k: v for k, v in x.items() if k != "instances"} for x in inputs]
        evaluator.process(test_inputs, model(test_inputs))
    model.train()
    return evaluator.evaluate()["bbox"]


def overfit_evaluator(name, dicts, output_dir):
    """Register ``dicts`` as dataset ``name`` (replacing any earlier one) and return its COCOEvaluator."""
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    DatasetCatalog.register(name, lambda: dicts)
    MetadataCatalog.get(name).set(thing_classes=["red", "green", "blue"])
    return COCOEvaluator(name, tasks=("bbox",), distributed=False, output_dir=str(output_dir), max_dets_per_image=300)


def train_until_ap50(model, inputs, evaluator, target=90.0, max_iters=MAX_ITERS, lr=2e-3):
    """AdamW (lr 2e-3 unless given) on ``inputs`` until AP50 >= target (checked every 10 iterations from the 30th).

    Returns the history [(iteration, AP50, AP), ...]. Runs under an EventStorage (detectron2's RPN/RoI heads log).
    """
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    history = []
    with EventStorage():
        for it in range(1, max_iters + 1):
            losses = model(inputs)
            loss = sum(losses.values())
            assert torch.isfinite(loss), (it, {k: v.item() for k, v in losses.items()})
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            if it >= 30 and it % 10 == 0:
                res = evaluate(model, inputs, evaluator)
                history.append((it, res["AP50"], res["AP"]))
                if res["AP50"] >= target:
                    break
    return history


def test_tiny_dino_overfits_to_ap50(tmp_path, one_thread):
    torch.manual_seed(0)
    inputs, dicts = make_data()
    evaluator = overfit_evaluator(DATASET, dicts, tmp_path)
    model = tiny_model(num_queries=15, num_dn_queries=10, embed_dim=32, width=16)
    cpu0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.time()
    history = train_until_ap50(model, inputs, evaluator)
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    print(
        f"\ntiny DINO overfit: AP50={history[-1][1]:.1f} AP={history[-1][2]:.1f} after {history[-1][0]} iterations; "
        f"wall {time.time() - t0:.1f}s, cpu {cpu1.ru_utime - cpu0.ru_utime + cpu1.ru_stime - cpu0.ru_stime:.1f}s; history {history}"
    )
    assert history[-1][1] >= 90.0, history
