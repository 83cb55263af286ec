"""Detection evaluators (boxes, and instance masks for the instance models) with the number of detections per
image set explicitly.

Co-DINO keeps its top 300 boxes per image (1000 for the ViT-L configs), but detectron2's
``COCOEvaluator`` scores only the top 100 unless ``max_dets_per_image`` is passed, and the official LVIS
numbers use up to 1000 detections per image where ``LVISEvaluator`` defaults to 300. One value,
``max_dets_per_image``, sets both; configs tie it to the model's top-k. ``tasks`` (from the config: ("bbox",)
for detectors, ("bbox", "segm") for instance models) is what the evaluator scores; the same detection limit
applies to every task. Each task gets its own evaluator (boxes ranked by ``scores``, masks by ``mask_scores``
when the model gives them, as the official Co-DINO-Inst evaluation); with an ``output_dir`` the predictions of
the second task go to ``<output_dir>/<task>/``.
"""
import contextlib
import os

import numpy as np
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation import COCOEvaluator, DatasetEvaluators, LVISEvaluator
from detectron2.structures import Instances

from ..data.checks import check_dataset_registered

__all__ = ["build_detection_evaluator", "lvis_numpy_compat"]


@contextlib.contextmanager
def lvis_numpy_compat():
    """Context in which ``np.float`` exists: the lvis package (0.5.3, its latest release) uses it, NumPy >= 1.24
    removed it, so ``LVISEval`` fails with AttributeError. Inside, the alias is the builtin float (what it always
    meant); on exit it is removed again, so the rest of the process sees NumPy unchanged."""
    added = "float" not in np.__dict__
    if added:
        np.float = float
    try:
        yield
    finally:
        if added:
            del np.float


_TASKS = ("bbox", "segm")


class _OneTask:
    """Mixin for an evaluator of one task. "segm": every output must carry ``pred_masks`` (pycocotools would
    otherwise turn the boxes into box-shaped masks and report a box AP as mask AP), and ``mask_scores``, when
    the model gives them (Co-DINO-Inst: predicted mask IoU x box score), rank the masks. "bbox": masks are
    dropped before the (costly) RLE encoding."""

    def process(self, inputs, outputs):
        (task,) = self._tasks
        outs = []
        for inp, out in zip(inputs, outputs):
            if "instances" in out:
                inst = out["instances"]
                inst = Instances(inst.image_size, **inst.get_fields())
                if task == "segm":
                    if not inst.has("pred_masks"):
                        raise ValueError(
                            f"evaluation task 'segm' needs pred_masks, but the model's output for image "
                            f"{inp.get('image_id')!r} has none: an instance model, or tasks=('bbox',)"
                        )
                    if inst.has("mask_scores"):
                        inst.scores = inst.mask_scores
                elif inst.has("pred_masks"):
                    inst.remove("pred_masks")
                out = dict(out, instances=inst)
            outs.append(out)
        super().process(inputs, outs)


class _COCOEvaluator(_OneTask, COCOEvaluator):
    pass


class _LVISEvaluator(_OneTask, LVISEvaluator):
    def evaluate(self):
        with lvis_numpy_compat():  # scoped to the lvis calls
            return super().evaluate()


def build_detection_evaluator(dataset_name: str, max_dets_per_image: int = 300, output_dir=None,
                              distributed: bool = True, tasks=("bbox",)):
    """COCOEvaluator or LVISEvaluator (by the dataset's ``evaluator_type``) for boxes and/or masks.

    Args:
        dataset_name: a registered detectron2 dataset name.
        max_dets_per_image: detections per image that count for AP (COCO: maxDets becomes
            [1, 10, max_dets_per_image]; LVIS: LVISResults(max_dets=...)). 300 for Co-DINO on COCO,
            1000 for the official LVIS protocol.
        output_dir: where the evaluator writes predictions (optional).
        distributed: gather predictions from all processes before evaluating.
        tasks: "bbox" (needs ``pred_boxes``) and/or "segm" (needs ``pred_masks``; ranked by ``mask_scores``
            when present) of the model's outputs.
    """
    check_dataset_registered(dataset_name)
    if isinstance(max_dets_per_image, bool) or not isinstance(max_dets_per_image, int) or max_dets_per_image < 1:
        raise ValueError(f"max_dets_per_image must be a positive int, got {max_dets_per_image!r}")
    tasks = (tasks,) if isinstance(tasks, str) else tuple(tasks)
    if not tasks or len(set(tasks)) != len(tasks) or not set(tasks) <= set(_TASKS):
        raise ValueError(f"tasks must be distinct items of {_TASKS}, got {tasks!r}")
    meta = MetadataCatalog.get(dataset_name)
    params = meta.get("synthetic_params")
    if params is not None:  # make sure the json file exists before the evaluator reads it
        from ..data.synthetic import ensure_synthetic_dataset

        ensure_synthetic_dataset(**params)
    evaluator_type = meta.get("evaluator_type", "coco")
    if evaluator_type == "coco" and meta.get("thing_dataset_id_to_contiguous_id") is None:
        # COCO-json loaders set the class-id mapping when the dataset is first loaded; without it the
        # evaluator would write contiguous ids as category ids and silently score 0 AP
        DatasetCatalog.get(dataset_name)
    if evaluator_type in ("coco", "lvis"):
        cls = _LVISEvaluator if evaluator_type == "lvis" else _COCOEvaluator
        # one evaluator per task: boxes ranked by box scores, masks by mask scores (when the model has them)
        evaluators = [
            cls(dataset_name, tasks=(task,), distributed=distributed, max_dets_per_image=max_dets_per_image,
                output_dir=output_dir if task == tasks[0] or output_dir is None else os.path.join(output_dir, task))
            for task in tasks
        ]
        return evaluators[0] if len(evaluators) == 1 else DatasetEvaluators(evaluators)
    raise ValueError(
        f"dataset {dataset_name!r} has evaluator_type={evaluator_type!r}; only 'coco' and 'lvis' "
        "evaluation are supported here"
    )
