"""Test-time augmentation for CoDETR: horizontal flip x several test scales, candidates merged, then the model's own
post-processing (``DETRPostProcessor.merge``: class-aware soft-NMS when configured, then ``max_per_img``).

Switched on in a config with ``model.test_time_aug = L(TestTimeAugmentation)(min_sizes=[...], max_size=..., flip=True)``;
``None`` (default) is the plain single-scale test. It has no parameters: checkpoints load unchanged.

The official code (github Sense-X/Co-DETR) has no test-time augmentation to reproduce: the ViT-L COCO config
(``projects/configs/co_dino_vit/co_dino_5scale_vit_large_coco.py``) tests at one scale, ``MultiScaleFlipAug`` with
``img_scale=(2048, 1280)`` (keep ratio: short side 1280, long side <= 2048) and ``flip=False``, and the query heads'
``aug_test_bboxes`` raises "Not implemented" (``projects/models/co_deformable_detr_head.py``), so the TTA behind the
reported 65.9 AP (65.4 without, Sense-X/Co-DETR #241) is not public. This module is our own: the scales and the
merge are documented choices, not the official ones.
"""
from typing import Dict, List, Sequence

import torch

from detectron2.modeling.test_time_augmentation import DatasetMapperTTA
from detectron2.structures import Boxes, Instances

__all__ = ["TestTimeAugmentation"]


class TestTimeAugmentation:
    """
    Args:
        min_sizes: short-side sizes of the test scales (keep ratio), e.g. ``[1024, 1280, 1536]`` for ViT-L.
        max_size: cap of the long side at every scale.
        flip: also run each scale horizontally flipped.
        batch_size: augmented images per forward pass.

    ``__call__(model, batched_inputs)`` takes the inputs of ``CoDETR.forward`` (each "image" as the test mapper
    made it, with "height"/"width" of the original) and returns its output format. Each input is re-resized from its
    given image by Detectron2's :class:`DatasetMapperTTA`; each augmented view's top-k candidates
    (``model.detection_candidates``) are mapped back to the original image by the inverse transforms, concatenated
    over the views, and merged by ``model.postprocessor.merge``.
    """

    def __init__(self, min_sizes: Sequence[int], max_size: int, flip: bool = True, batch_size: int = 2):
        if not min_sizes:
            raise ValueError("TestTimeAugmentation needs at least one test scale (min_sizes)")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.mapper = DatasetMapperTTA(list(min_sizes), max_size, flip)
        self.batch_size = batch_size

    def __repr__(self):
        m = self.mapper
        return f"TestTimeAugmentation(min_sizes={m.min_sizes}, max_size={m.max_size}, flip={m.flip})"

    @torch.no_grad()
    def __call__(self, model, batched_inputs: List[Dict]) -> List[Dict[str, Instances]]:
        results = []
        for x in batched_inputs:
            x = dict(x)
            x.setdefault("height", x["image"].shape[1])
            x.setdefault("width", x["image"].shape[2])
            views = self.mapper(x)
            boxes, scores, labels = [], [], []
            for i in range(0, len(views), self.batch_size):
                chunk = views[i : i + self.batch_size]
                for view, (b, s, l) in zip(chunk, zip(*model.detection_candidates(chunk))):
                    back = view["transforms"].inverse().apply_box(b.cpu().numpy())  # to the original image
                    boxes.append(torch.as_tensor(back, dtype=torch.float32, device=b.device))
                    scores.append(s)
                    labels.append(l)
            det = model.postprocessor.merge(torch.cat(boxes), torch.cat(scores), torch.cat(labels))
            size = (x["height"], x["width"])
            inst = Instances(size)
            inst.pred_boxes = Boxes(det["boxes"])
            inst.pred_boxes.clip(size)
            inst.scores = det["scores"]
            inst.pred_classes = det["labels"]
            results.append({"instances": inst})
        return results
