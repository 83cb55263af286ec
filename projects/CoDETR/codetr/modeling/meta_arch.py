"""CoDETR: the Detectron2 meta-architecture of Co-DETR (backbone, neck, query head, optional collaborative branch)."""
from typing import Dict, List, Optional

import torch
from torch import nn
from torchvision.ops import box_convert

from detectron2.modeling.postprocessing import detector_postprocess
from detectron2.structures import Boxes, ImageList, Instances

from .postprocess import DETRPostProcessor

__all__ = ["CoDETR"]


class CoDETR(nn.Module):
    """
    Co-DETR / DINO detector with Detectron2's model interface.

    ``forward(batched_inputs)`` returns a dict of losses in training and
    ``[{"instances": Instances(pred_boxes, scores, pred_classes)}]`` in eval, rescaled to each input's
    "height"/"width" when given.

    Args:
        backbone: a Detectron2 backbone returning a dict of feature maps.
        neck: maps that dict to the list of multi-scale maps of the query head.
        query_head: the one-to-one query head (:class:`DINOHead`); in training ``query_head(features, masks,
            targets, norm_sizes) -> (losses, enc_ctx)``, in eval ``-> (logits (B, N, K), boxes (B, N, 4) cxcywh)``.
        postprocessor: turns the eval outputs into detections (:class:`DETRPostProcessor`: top-k, optional
            soft-NMS); default ``DETRPostProcessor()`` (top 300 + soft-NMS, Co-DINO's).
        pixel_mean, pixel_std: per-channel normalisation, in ``input_format`` channel order.
        input_format: "RGB" or "BGR", the channel order of ``batched_inputs[i]["image"]``.
        with_attn_mask: if False every image counts as its padded size (no padding masks; boxes
            normalised by the padded size), as the official LSJ configs.
        size_divisibility: pad the batch to a multiple of this.
        square_pad: if > 0, pad every image (bottom/right) to ``square_pad`` x ``square_pad`` pixels with the pixel
            value ``pad_value`` *before* normalisation, as the official fixed-size LSJ test pipelines do
            (LVIS: 1536, value 114; detectron2's ViTDet calls it ``square_pad``). The detections are still
            post-processed with each image's unpadded size, so they are rescaled by original / resized. An image
            larger than ``square_pad`` is an error. 0 (default): pad the normalised batch with 0 to
            ``size_divisibility`` only.
        pad_value: the pixel value (input range, before normalisation) of the ``square_pad`` padding.
        collaborative: optional module of the auxiliary heads, called in training as
            ``collaborative(enc_ctx, images, gt_instances, query_head) -> dict of losses``.
            With ``None`` the model is exactly DINO. If one of its auxiliary heads has a mask head
            (Co-Deformable-DETR-mask: ``collaborative.with_mask``), eval runs it on the query head's final boxes over
            the encoder maps and adds ``pred_masks``.
        mask_branch: optional instance-mask branch (:class:`~codetr.modeling.mask_head.InstanceMaskBranch`,
            Co-DINO-Inst) on the encoder maps: in training its losses use the query head's last-layer
            predictions as RoIs and ``gt_masks``; in eval it adds ``pred_masks`` (and ``mask_scores``) to the
            detections, pasted at each input's "height"/"width".
        eval_module: which head makes the detections in eval mode: "detr" (the one-to-one query head, default),
            or "atss" / "rcnn" (an auxiliary head of ``collaborative``, to debug it; official 'one-stage' /
            'two-stage' eval modes).
        test_time_aug: optional :class:`codetr.modeling.tta.TestTimeAugmentation` (flip x test scales, merged by
            the post-processor); used in eval with ``eval_module="detr"``. ``None``: single-scale test.
    """

    def __init__(
        self,
        *,
        backbone: nn.Module,
        neck: nn.Module,
        query_head: nn.Module,
        pixel_mean,
        pixel_std,
        input_format: str = "RGB",
        with_attn_mask: bool = True,
        size_divisibility: int = 32,
        square_pad: int = 0,
        pad_value: float = 0.0,
        collaborative: Optional[nn.Module] = None,
        eval_module: str = "detr",
        postprocessor: Optional[nn.Module] = None,
        mask_branch: Optional[nn.Module] = None,
        test_time_aug=None,
    ):
        super().__init__()
        if input_format not in ("RGB", "BGR"):
            raise ValueError(f"input_format must be 'RGB' or 'BGR', got {input_format!r}")
        self.backbone = backbone
        self.neck = neck
        self.query_head = query_head
        self.postprocessor = postprocessor if postprocessor is not None else DETRPostProcessor()
        self.collaborative = collaborative
        num_co_heads = getattr(query_head, "num_co_heads", None)
        aux_heads = getattr(collaborative, "aux_heads", None)
        with_pos_queries = getattr(collaborative, "with_pos_queries", True)
        if num_co_heads is not None and aux_heads is not None and with_pos_queries and num_co_heads != len(aux_heads):
            raise ValueError(
                f"the query head has {num_co_heads} positive-query projections (num_co_heads) but the collaborative "
                f"branch has {len(aux_heads)} auxiliary heads: set num_co_heads to the number of auxiliary heads"
            )
        self.mask_branch = mask_branch
        if mask_branch is not None and eval_module != "detr":
            raise ValueError("the mask branch runs on the query head's detections: eval_module must be 'detr'")
        if eval_module not in ("detr", "atss", "rcnn"):
            raise ValueError(f"eval_module must be 'detr', 'atss' or 'rcnn', got {eval_module!r}")
        if eval_module != "detr" and collaborative is None:
            raise ValueError(f"eval_module={eval_module!r} needs the collaborative branch (collaborative is None)")
        self.eval_module = eval_module
        if self.aux_masks and mask_branch is not None:
            raise ValueError("both mask_branch and a collaborative mask head predict masks: keep one")
        if test_time_aug is not None and self.aux_masks:
            raise ValueError("test_time_aug merges boxes only: it cannot be combined with a collaborative mask head")
        if test_time_aug is not None and eval_module != "detr":
            raise ValueError("test_time_aug needs eval_module='detr' (it merges the query head's candidates)")
        if test_time_aug is not None and mask_branch is not None:
            raise ValueError("test_time_aug merges boxes only: it cannot be combined with a mask branch")
        self.test_time_aug = test_time_aug
        self.input_format = input_format
        self.with_attn_mask = with_attn_mask
        self.size_divisibility = size_divisibility
        if square_pad < 0:
            raise ValueError(f"square_pad must be >= 0, got {square_pad}")
        self.square_pad = int(square_pad)
        self.pad_value = float(pad_value)
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean, dtype=torch.float32).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std, dtype=torch.float32).view(-1, 1, 1), False)

    @property
    def aux_masks(self) -> bool:
        """Whether an auxiliary head of the collaborative branch predicts masks (Co-Deformable-DETR-mask)."""
        return self.collaborative is not None and bool(getattr(self.collaborative, "with_mask", False))

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    def preprocess_image(self, batched_inputs: List[Dict]):
        """
        Returns:
            images: ImageList (normalised, padded);
            masks: (B, H, W) bool, True on padding (all False when ``with_attn_mask=False``);
            norm_sizes: (B, 2) float (h, w) by which boxes are normalised.
        """
        if self.square_pad > 0:
            for i, x in enumerate(batched_inputs):
                h, w = x["image"].shape[-2:]
                if h > self.square_pad or w > self.square_pad:
                    raise ValueError(
                        f"image {self._image_name(x, i)} is {h}x{w}, larger than square_pad={self.square_pad}: "
                        "resize it in the mapper first (e.g. ResizeShortestEdge(max_size=square_pad))"
                    )
            # pad in pixel space (value pad_value, e.g. 114), then normalise: the official Pad -> Normalize order
            raw = [x["image"].to(self.device).float() for x in batched_inputs]
            images = ImageList.from_tensors(raw, self.size_divisibility, pad_value=self.pad_value,
                                            padding_constraints={"square_size": self.square_pad})
            images.tensor = (images.tensor - self.pixel_mean) / self.pixel_std
        else:
            images = [(x["image"].to(self.device) - self.pixel_mean) / self.pixel_std for x in batched_inputs]
            images = ImageList.from_tensors(images, self.size_divisibility)
        B, _, H, W = images.tensor.shape
        masks = torch.ones(B, H, W, dtype=torch.bool, device=self.device)
        if self.with_attn_mask:
            for i, (h, w) in enumerate(images.image_sizes):
                masks[i, :h, :w] = False
            norm_sizes = torch.tensor(images.image_sizes, dtype=torch.float32, device=self.device)
        else:
            masks[:] = False
            norm_sizes = torch.tensor([[H, W]] * B, dtype=torch.float32, device=self.device)
        return images, masks, norm_sizes

    @staticmethod
    def _image_name(x: Dict, i: int) -> str:
        for key in ("file_name", "image_id"):
            if key in x:
                return f"{x[key]!s} (batch index {i})"
        return f"#{i} of the batch"

    def prepare_targets(self, batched_inputs, gt_instances, norm_sizes) -> List[Dict[str, torch.Tensor]]:
        """gt Instances (XYXY pixels) -> per image ``labels``, ``boxes`` (cxcywh normalised), ``name``."""
        targets = []
        for i, (x, inst) in enumerate(zip(batched_inputs, gt_instances)):
            scale = norm_sizes[i].flip(0).repeat(2)  # (w, h, w, h), no host sync
            boxes = inst.gt_boxes.tensor.float()
            targets.append(
                dict(
                    labels=inst.gt_classes.to(torch.int64),
                    boxes=box_convert(boxes / scale, "xyxy", "cxcywh"),
                    name=self._image_name(x, i),
                )
            )
        return targets

    @torch.no_grad()
    def detection_candidates(self, batched_inputs: List[Dict]):
        """Eval: the post-processor's first step on the inputs as given (no rescaling to "height"/"width"):
        ``(boxes (B, k, 4) XYXY pixels of each input image, scores (B, k), labels (B, k))``."""
        images, masks, norm_sizes = self.preprocess_image(batched_inputs)
        logits, boxes = self.query_head(self.neck(self.backbone(images.tensor)), masks, None, norm_sizes)
        return self.postprocessor.candidates(logits, boxes, norm_sizes)

    def forward(self, batched_inputs: List[Dict]):
        if not self.training and self.test_time_aug is not None:
            return self.test_time_aug(self, batched_inputs)
        images, masks, norm_sizes = self.preprocess_image(batched_inputs)
        if self.training:
            for i, x in enumerate(batched_inputs):
                if "instances" not in x:
                    raise ValueError(f"image {self._image_name(x, i)}: training needs 'instances' in every input")
            gt_instances = [x["instances"].to(self.device) for x in batched_inputs]
            # The query head validates them (class ids, finite and non-degenerate boxes) before matching.
            targets = self.prepare_targets(batched_inputs, gt_instances, norm_sizes)
        features = self.neck(self.backbone(images.tensor))
        if self.training:
            losses, enc_ctx = self.query_head(features, masks, targets, norm_sizes)
            if self.collaborative is not None:
                losses.update(self.collaborative(enc_ctx, images, gt_instances, self.query_head))
            if self.mask_branch is not None:
                losses.update(self.mask_branch.losses(
                    self.query_head.encoder_maps(enc_ctx), enc_ctx["last_logits"], enc_ctx["last_boxes"], norm_sizes,
                    gt_instances))
            return losses
        if self.eval_module != "detr":  # an auxiliary head's detections (collaborative.py)
            dets = self.collaborative.inference(self.query_head, features, masks, images, norm_sizes, self.eval_module)
        elif self.mask_branch is not None or self.aux_masks:
            logits, boxes, enc_ctx = self.query_head(features, masks, None, norm_sizes, return_enc_ctx=True)
            dets = self.postprocessor(logits, boxes, norm_sizes)
        else:
            logits, boxes = self.query_head(features, masks, None, norm_sizes)
            dets = self.postprocessor(logits, boxes, norm_sizes)
        instances = self.detections_to_instances(dets, images.image_sizes)
        if self.eval_module == "detr" and self.mask_branch is not None:
            instances = self.mask_branch.inference(self.query_head.encoder_maps(enc_ctx), instances)
        elif self.eval_module == "detr" and self.aux_masks:  # Co-Deformable-DETR-mask: on the query head's boxes
            instances = self.collaborative.mask_inference(self.query_head, enc_ctx, instances)
        return self.rescale_instances(batched_inputs, instances, images.image_sizes)

    @staticmethod
    def detections_to_instances(dets: List[Dict[str, torch.Tensor]], image_sizes) -> List[Instances]:
        """The post-processor's per-image ``boxes`` / ``scores`` / ``labels`` (and ``masks``) -> ``Instances`` of
        each (h, w) in ``image_sizes`` (the inputs' sizes before padding), boxes clipped to it."""
        instances = []
        for det, image_size in zip(dets, image_sizes):
            inst = Instances(image_size)
            inst.pred_boxes = Boxes(det["boxes"])
            inst.pred_boxes.clip(image_size)
            inst.scores = det["scores"]
            inst.pred_classes = det["labels"]
            if "masks" in det:  # eval_module="rcnn" with a mask head: the RoI head's masks of its own boxes
                inst.pred_masks = det["masks"]
            instances.append(inst)
        return instances

    @staticmethod
    def rescale_instances(batched_inputs: List[Dict], instances: List[Instances], image_sizes) -> List[Dict]:
        """``[{"instances": ...}]`` rescaled from each input's size to its "height" / "width" (when given)."""
        results = []
        for x, inst, image_size in zip(batched_inputs, instances, image_sizes):
            height = x.get("height", image_size[0])
            width = x.get("width", image_size[1])
            results.append({"instances": detector_postprocess(inst, height, width)})
        return results
