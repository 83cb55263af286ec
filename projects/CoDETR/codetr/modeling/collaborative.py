"""Collaborative hybrid assignment: the part of Co-DETR that is not DETR.

A DETR-style detector trains with a *one-to-one* assignment (Hungarian matching): each GT box supervises one
query, so the encoder gets sparse supervision and the decoder few positives. Co-DETR adds, in training only:

1. **Encoder maps**. The query head gives its encoder output as multi-scale maps
   (``query_head.encoder_maps(enc_ctx)``; a deformable encoder's memory ``(B, sum h_l*w_l, C)`` cut back into the
   maps ``(B, C, h_l, w_l)`` it was flattened from, :func:`memory_to_maps`) and the ``adapter``
   (:class:`codetr.modeling.adapter.MultiScaleAdapter`) turns them into the auxiliary heads' pyramid. For a
   multi-scale DETR (Co-DINO, Co-Deformable-DETR) that is the identity path: the encoder maps themselves, plus one
   coarser map made from the last one by a 3x3 stride-2 conv + GroupNorm(32) (Co-DINO: 5 + 1 = 6 maps, strides
   4..128); for a single-scale one (Co-DAB-DETR) a simple feature pyramid. The auxiliary heads read these maps --
   never the neck's -- so their losses train the encoder.

2. **Auxiliary heads with one-to-many assignment** (``aux_heads``, index = position in the list). Co-DINO has
   two: head 0 is Faster R-CNN (:class:`codetr.modeling.rcnn.RCNNBranch`: RPN on 6 maps, RoI head on the first
   5) and head 1 is ATSS (:class:`codetr.modeling.atss.ATSSHead`). Each one assigns many anchors/RoIs to every GT
   and returns its losses (keys with the head index, e.g. ``loss_cls0``, ``loss_bbox1``; their x12 weights are
   set in the config) and its *positives*: per image, the boxes it assigned (RoIs or anchors, XYXY absolute),
   their labels (background = ``num_classes``) and their GT boxes.

3. **Customised positive queries** (:func:`get_aux_targets`). Per head, every image gets
   ``N = max(9, min(300, largest number of positives over the batch's images))`` query slots: its positives (a
   random subset when it has more than N) followed by random negatives of the same head as padding. Boxes and
   targets are divided by the image size (unpadded, or padded when ``with_attn_mask=False``) and turned into
   ``cxcywh``. Label weight is 1 on all N slots (negatives learn "background"); box weight is 1 on positives only.

4. **Extra decoder passes** (``query_head.positive_query_losses``). For head i the query head runs its decoder once
   more on these N queries, with the encoder memory unchanged, and returns the losses of every decoder layer
   against the head's targets (keys ``loss_cls_aux{i}``, ``d{k}.loss_iou_aux{i}``, ...). How the queries are made
   from the boxes is the query head's business (Co-DINO: content = LayerNorm_i(Linear_i(2C -> C)) of the boxes'
   sine embedding, reference = the boxes). No denoising, no attention mask, no Hungarian matching.

**The query-head protocol** (:class:`CollaborativeQueryHead`). The branch talks to the one-to-one query head
through three methods and nothing else, so any DETR whose head provides them can be trained collaboratively:

- ``encode(features, masks, image_sizes) -> enc_ctx``: run the encoder alone (used at eval time when an auxiliary
  head is evaluated); ``enc_ctx`` is the dict the head's training forward also returns (docs/design.md).
- ``encoder_maps(enc_ctx) -> list of (B, C, h_l, w_l)``: the encoder output as maps, finest first.
- ``positive_query_losses(enc_ctx, queries, head_idx) -> dict``: "run the decoder on these positive queries and
  return the losses against these targets"; ``queries`` is :func:`get_aux_targets`' dict.

At inference this module is not called; removing it (``model.collaborative = None``) leaves the detector's
eval outputs unchanged. For debugging, ``CoDETR(eval_module="atss" | "rcnn")`` evaluates the auxiliary head whose
``eval_name`` it is instead of the query head (:meth:`CollaborativeBranch.inference`); every auxiliary head has
one ``inference(maps, images) -> list[Instances]``.

**Masks** (Co-Deformable-DETR-mask). When an auxiliary head has a mask head (``with_mask``: an RCNNBranch built
with ``mask_head``, i.e. Mask R-CNN), it is trained with the other aux losses here, and at test time
:meth:`CollaborativeBranch.mask_inference` runs it on the query head's final detections over the encoder maps
(the meta-architecture calls it after the post-processor); ``eval_module="rcnn"`` returns the RoI head's own boxes
with their masks.
"""
from typing import Dict, List, Optional, Protocol, Sequence, Tuple, runtime_checkable

import torch
from torch import Tensor, nn
from torchvision.ops import box_convert

from detectron2.structures import ImageList, Instances

__all__ = ["CollaborativeBranch", "CollaborativeQueryHead", "memory_to_maps", "get_aux_targets"]


@runtime_checkable
class CollaborativeQueryHead(Protocol):
    """What :class:`CollaborativeBranch` needs from a one-to-one DETR query head (see the module docstring)."""

    num_classes: int

    def encode(self, features: Sequence[Tensor], masks: Tensor, image_sizes: Optional[Tensor] = None) -> Dict:
        """Encoder only. ``features``: the neck's maps; ``masks`` (B, H, W) True on padding; ``image_sizes`` (B, 2)
        (h, w) of the box normalisation, stored in the returned ``enc_ctx["image_sizes"]``."""
        ...

    def encoder_maps(self, enc_ctx: Dict) -> List[Tensor]:
        """The encoder output as maps (B, C, h_l, w_l), finest first."""
        ...

    def positive_query_losses(self, enc_ctx: Dict, queries: Dict[str, Tensor], head_idx: int) -> Dict[str, Tensor]:
        """Decoder pass on the positive queries of auxiliary head ``head_idx`` (``queries``: :func:`get_aux_targets`'
        dict) and its losses at every decoder layer, keys ending in ``_aux{head_idx}``."""
        ...


def memory_to_maps(memory: Tensor, spatial_shapes: Tensor) -> List[Tensor]:
    """Encoder memory (B, S, C) -> list of contiguous (B, C, h_l, w_l), S = sum h_l * w_l (padded positions kept)."""
    if memory.dim() != 3:
        raise ValueError(f"memory_to_maps: memory must be (B, S, C), got {tuple(memory.shape)}")
    shapes = [(int(h), int(w)) for h, w in spatial_shapes.tolist()]
    total = sum(h * w for h, w in shapes)
    if total != memory.shape[1]:
        raise ValueError(f"memory_to_maps: spatial_shapes cover {total} tokens but memory has {memory.shape[1]}")
    b, _, c = memory.shape
    maps = []
    for chunk, (h, w) in zip(memory.split([h * w for h, w in shapes], dim=1), shapes):
        # contiguous NCHW: the strided view of the memory is neither NCHW nor channels-last for the conv
        # kernels, and a conv forward + backward on it is ~1.5x slower on the CPU (docs/collaborative.md)
        maps.append(chunk.transpose(1, 2).reshape(b, c, h, w).contiguous())
    return maps


def get_aux_targets(
    positives: List[Dict[str, Tensor]],
    image_sizes: Sequence[Tuple[int, int]],
    num_classes: int,
    min_queries: int = 9,
    max_queries: int = 300,
    generator: Optional[torch.Generator] = None,
) -> Dict[str, Tensor]:
    """Build the positive queries of one auxiliary head for a batch.

    Args:
        positives: per image ``boxes`` (M_i, 4), ``labels`` (M_i,), ``target_boxes`` (M_i, 4), XYXY absolute;
            background label = ``num_classes``; optionally ``feats`` (M_i, C), the boxes' features (auxiliary
            heads built with ``return_feats=True``; Co-Deformable-DETR's positive queries read them).
        image_sizes: per image (h, w) used for normalisation.
        min_queries, max_queries: N = max(min_queries, min(max_queries, max_i #positives_i)).

    Returns:
        dict with ``ref_boxes`` (B, N, 4) normalised cxcywh (the query anchors), ``labels`` (B, N) int64,
        ``label_weights`` (B, N) (all ones), ``boxes`` (B, N, 4) normalised cxcywh targets, ``box_weights``
        (B, N) (1 on positives), and ``feats`` (B, N, C) when the positives have them. Positives come first in each row. When an image has fewer negatives than padding
        slots they are drawn with repetition; with none at all the slots are zero boxes labelled background.
    """
    if len(positives) != len(image_sizes):
        raise ValueError(f"get_aux_targets: {len(positives)} positives entries for {len(image_sizes)} image_sizes")
    if len(positives) == 0:
        raise ValueError("get_aux_targets: empty batch")
    fg_masks = [(p["labels"] >= 0) & (p["labels"] < num_classes) for p in positives]
    # one host sync for the batch: N is a shape
    num_fg = torch.stack([m.sum() for m in fg_masks]).tolist()
    n = max(min_queries, min(max_queries, max(num_fg)))

    with_feats = all("feats" in p for p in positives)
    refs, labels, targets, box_w, feats = [], [], [], [], []
    for p, fg, nf, (h, w) in zip(positives, fg_masks, num_fg, image_sizes):
        device = p["boxes"].device
        pos_idx = fg.nonzero().squeeze(1)
        if nf > n:
            pos_idx = pos_idx[torch.randperm(nf, generator=generator).to(device)[:n]]
        num_pad = n - pos_idx.numel()
        neg_idx = (p["labels"] == num_classes).nonzero().squeeze(1)
        if num_pad > 0 and neg_idx.numel() >= num_pad:
            neg_idx = neg_idx[torch.randperm(neg_idx.numel(), generator=generator).to(device)[:num_pad]]
        elif num_pad > 0 and neg_idx.numel() > 0:
            neg_idx = neg_idx[torch.randint(neg_idx.numel(), (num_pad,), generator=generator).to(device)]
        else:
            neg_idx = neg_idx[:0]
        idx = torch.cat([pos_idx, neg_idx])
        factor = p["boxes"].new_tensor([w, h, w, h])
        ref = box_convert(p["boxes"][idx] / factor, "xyxy", "cxcywh")
        lab = p["labels"][idx]
        tgt = box_convert(p["target_boxes"][idx] / factor, "xyxy", "cxcywh")
        feat = p["feats"][idx] if with_feats else None
        short = n - idx.numel()
        if short > 0:  # no negatives to pad with
            ref = torch.cat([ref, ref.new_zeros(short, 4)])
            tgt = torch.cat([tgt, tgt.new_zeros(short, 4)])
            lab = torch.cat([lab, lab.new_full((short,), num_classes)])
            if with_feats:
                feat = torch.cat([feat, feat.new_zeros(short, feat.shape[1])])
        bw = ref.new_zeros(n)
        bw[: pos_idx.numel()] = 1.0
        refs.append(ref)
        labels.append(lab)
        targets.append(tgt)
        box_w.append(bw)
        feats.append(feat)
    ref_boxes = torch.stack(refs)
    out = {
        "ref_boxes": ref_boxes,
        "labels": torch.stack(labels),
        "label_weights": ref_boxes.new_ones(ref_boxes.shape[:2]),
        "boxes": torch.stack(targets),
        "box_weights": torch.stack(box_w),
    }
    if with_feats:
        out["feats"] = torch.stack(feats)
    return out


class CollaborativeBranch(nn.Module):
    """Auxiliary heads on the encoder maps + their positive queries through the query head's decoder.

    Called by the meta-architecture in training only::

        losses.update(self.collaborative(enc_ctx, images, gt_instances, self.query_head))
    """

    def __init__(
        self,
        *,
        aux_heads: Sequence[nn.Module],
        num_classes: int,
        adapter: nn.Module,
        min_queries: int = 9,
        max_queries: int = 300,
        with_pos_queries: bool = True,
    ):
        """
        Args:
            aux_heads: auxiliary heads in head-index order (Co-DINO: [RCNNBranch, ATSSHead]); each maps
                ``(features, images, gt_instances)`` to ``(losses, positives)`` and has
                ``inference(features, images) -> list[Instances]`` and an ``eval_name``.
            num_classes: foreground classes (background label = num_classes).
            adapter: maps the query head's encoder maps (list of (B, C, h_l, w_l), finest first) to the maps the
                auxiliary heads read (a :class:`codetr.modeling.adapter.MultiScaleAdapter`; Co-DINO:
                ``in_strides=(4, 8, 16, 32, 64), out_strides=(4, ..., 128)``: the encoder maps + one stride-2 map).
            min_queries, max_queries: bounds of the per-image number of positive-query slots (9, 300).
            with_pos_queries: run the positive-query decoder passes (False trains only the aux heads).
        """
        super().__init__()
        if len(aux_heads) == 0:
            raise ValueError("CollaborativeBranch: aux_heads is empty")
        for i, head in enumerate(aux_heads):
            index = getattr(head, "head_index", i)
            if index != i:
                raise ValueError(
                    f"CollaborativeBranch: aux_heads[{i}] ({type(head).__name__}) has head_index={index}: each head's "
                    "head_index must be its position in the list (it names its loss keys)"
                )
        if not isinstance(adapter, nn.Module):
            raise TypeError(
                f"CollaborativeBranch: adapter must be an nn.Module mapping the encoder maps to the auxiliary heads' "
                f"maps (e.g. MultiScaleAdapter), got {type(adapter).__name__}"
            )
        self.aux_heads = nn.ModuleList(aux_heads)
        self.num_classes = num_classes
        self.min_queries = min_queries
        self.max_queries = max_queries
        self.with_pos_queries = with_pos_queries
        self.adapter = adapter

    @property
    def with_mask(self) -> bool:
        """Whether an auxiliary head predicts masks (``mask_inference`` works)."""
        return any(getattr(h, "with_mask", False) for h in self.aux_heads)

    @staticmethod
    def _check_query_head(query_head) -> None:
        if not isinstance(query_head, CollaborativeQueryHead):
            missing = [m for m in ("encode", "encoder_maps", "positive_query_losses") if not hasattr(query_head, m)]
            raise TypeError(
                f"CollaborativeBranch: the query head {type(query_head).__name__} does not implement "
                f"CollaborativeQueryHead (missing {missing})"
            )

    def encoder_maps(self, query_head: "CollaborativeQueryHead", enc_ctx: Dict) -> List[Tensor]:
        """The auxiliary heads' maps: the query head's encoder maps through the adapter."""
        return list(self.adapter(list(query_head.encoder_maps(enc_ctx))))

    @staticmethod
    def _image_sizes(enc_ctx: Dict, images: ImageList) -> List[Tuple[int, int]]:
        sizes = enc_ctx.get("image_sizes", None)
        if sizes is None:
            sizes = images.image_sizes
        if isinstance(sizes, Tensor):
            sizes = sizes.tolist()
        return [(int(h), int(w)) for h, w in sizes]

    def forward(
        self, enc_ctx: Dict, images: ImageList, gt_instances: List[Instances], query_head: "CollaborativeQueryHead"
    ) -> Dict[str, Tensor]:
        """
        Args:
            enc_ctx: the query head's encoder context (docs/design.md), with ``image_sizes`` (the sizes boxes are
                normalised by).
            images: the batch's ImageList.
            gt_instances: per image ``gt_boxes`` (XYXY absolute) and ``gt_classes``.
            query_head: a :class:`CollaborativeQueryHead`.

        Returns:
            all auxiliary losses (aux heads and positive-query passes).
        """
        self._check_query_head(query_head)
        maps = self.encoder_maps(query_head, enc_ctx)
        sizes = self._image_sizes(enc_ctx, images)
        # the aux heads see the normalisation sizes (padded ones when with_attn_mask=False, as the official code)
        aux_images = ImageList(images.tensor, sizes)
        losses: Dict[str, Tensor] = {}
        all_positives = []
        for head in self.aux_heads:
            head_losses, positives = head(maps, aux_images, gt_instances)
            dup = set(head_losses) & set(losses)
            if dup:
                raise ValueError(f"CollaborativeBranch: auxiliary heads produce the same loss keys {sorted(dup)}")
            losses.update(head_losses)
            all_positives.append(positives)
        if not self.with_pos_queries:
            return losses
        for i, positives in enumerate(all_positives):
            queries = get_aux_targets(
                positives, sizes, self.num_classes, min_queries=self.min_queries, max_queries=self.max_queries
            )
            losses.update(query_head.positive_query_losses(enc_ctx, queries, i))
        return losses

    @torch.no_grad()
    def inference(
        self,
        query_head: "CollaborativeQueryHead",
        features: Sequence[Tensor],
        masks: Tensor,
        images: ImageList,
        image_sizes: Tensor,
        module: str,
    ) -> List[Dict[str, Tensor]]:
        """Detections of the auxiliary head whose ``eval_name`` is ``module`` ("atss", "rcnn") on the encoder maps.

        Args:
            query_head: runs the encoder (``encode``) on the neck ``features`` with padding ``masks``.
            image_sizes: (B, 2) the normalisation sizes (as in training).

        Returns:
            per image ``boxes`` (M, 4) XYXY pixels, ``scores`` (M,), ``labels`` (M,) -- the post-processor's format.
        """
        self._check_query_head(query_head)
        heads = [h for h in self.aux_heads if getattr(h, "eval_name", None) == module]
        if not heads:
            names = [getattr(h, "eval_name", None) for h in self.aux_heads]
            raise ValueError(f"CollaborativeBranch.inference: no auxiliary head named {module!r} (heads: {names})")
        enc_ctx = query_head.encode(features, masks, image_sizes)
        maps = self.encoder_maps(query_head, enc_ctx)
        sizes = self._image_sizes(enc_ctx, images)
        insts = heads[0].inference(maps, ImageList(images.tensor, sizes))
        dets = [{"boxes": i.pred_boxes.tensor, "scores": i.scores, "labels": i.pred_classes} for i in insts]
        for d, i in zip(dets, insts):
            if i.has("pred_masks"):
                d["masks"] = i.pred_masks
        return dets

    @torch.no_grad()
    def mask_inference(
        self, query_head: "CollaborativeQueryHead", enc_ctx: Dict, detections: List[Instances]
    ) -> List[Instances]:
        """Masks of the query head's detections by the auxiliary mask head, on the encoder maps (eval mode).

        Args:
            query_head: gives the encoder maps of ``enc_ctx`` (the eval forward's, ``return_enc_ctx=True``).
            detections: per image ``pred_boxes`` (XYXY pixels of the input image), ``scores``, ``pred_classes``.

        Returns:
            ``detections`` with ``pred_masks`` (R, 1, M, M) mask probabilities in each box (see
            :meth:`codetr.modeling.rcnn.RCNNBranch.mask_inference`).
        """
        heads = [h for h in self.aux_heads if getattr(h, "with_mask", False)]
        if not heads:
            raise ValueError("CollaborativeBranch.mask_inference: no auxiliary head has a mask head")
        return heads[0].mask_inference(self.encoder_maps(query_head, enc_ctx), detections)
