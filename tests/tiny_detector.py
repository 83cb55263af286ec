"""A tiny stand-in detector with detectron2's interface, for pipeline tests (not a real model).

Training: returns a loss dict (multi-label classification of the classes present + L1 of one box).
Inference: returns ``[{"instances": Instances(pred_boxes, scores, pred_classes)}]`` in original-image
coordinates, ``num_queries`` boxes per image.
"""
from fvcore.common.param_scheduler import ParamScheduler
import torch
import torch.nn.functional as F
from torch import nn

from detectron2.structures import Boxes, ImageList, Instances


class TinyDetector(nn.Module):
    def __init__(self, num_classes: int, num_queries: int = 10, channels: int = 8):
        super().__init__()
        self.num_classes = num_classes
        self.num_queries = num_queries
        self.stem = nn.Conv2d(3, channels, 5, stride=4, padding=2)
        self.cls = nn.Linear(channels, num_queries * num_classes)
        self.box = nn.Linear(channels, num_queries * 4)
        self.register_buffer("pixel_mean", torch.tensor([103.5, 116.3, 123.7]).view(3, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor([57.4, 57.1, 58.4]).view(3, 1, 1), False)

    @property
    def device(self):
        return self.pixel_mean.device

    def forward(self, batched_inputs):
        images = [(x["image"].to(self.device).float() - self.pixel_mean) / self.pixel_std for x in batched_inputs]
        images = ImageList.from_tensors(images, 4)
        feat = F.relu(self.stem(images.tensor)).mean(dim=(2, 3))
        B = feat.shape[0]
        logits = self.cls(feat).view(B, self.num_queries, self.num_classes)
        boxes = self.box(feat).view(B, self.num_queries, 4).sigmoid()  # normalised cx, cy, w, h
        if self.training:
            present = torch.zeros(B, self.num_classes, device=self.device)
            target_box = torch.full((B, 4), 0.5, device=self.device)
            for i, x in enumerate(batched_inputs):
                inst = x["instances"].to(self.device)
                present[i, inst.gt_classes] = 1.0
                if len(inst) > 0:
                    h, w = images.image_sizes[i]
                    b = inst.gt_boxes.tensor[0]
                    scale = torch.tensor([w, h, w, h], device=self.device, dtype=b.dtype)
                    b = b / scale
                    target_box[i] = torch.stack([(b[0] + b[2]) / 2, (b[1] + b[3]) / 2, b[2] - b[0], b[3] - b[1]])
            loss_cls = F.binary_cross_entropy_with_logits(logits.max(dim=1).values, present)
            loss_box = F.l1_loss(boxes[:, 0], target_box)
            return {"loss_cls": loss_cls, "loss_box": loss_box}
        results = []
        probs = logits.sigmoid()
        for i, x in enumerate(batched_inputs):
            h, w = x.get("height", images.image_sizes[i][0]), x.get("width", images.image_sizes[i][1])
            scores, classes = probs[i].max(dim=1)
            cx, cy, bw, bh = boxes[i].unbind(-1)
            xyxy = torch.stack([(cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h], -1)
            inst = Instances((h, w))
            inst.pred_boxes = Boxes(xyxy)
            inst.scores = scores
            inst.pred_classes = classes
            results.append({"instances": inst})
        return results


class ConstantMultiplier(ParamScheduler):
    """An lr multiplier of 1 for any ``where`` (fvcore's ConstantParamScheduler rejects where == 1.0)."""

    def __call__(self, where: float) -> float:
        return 1.0
