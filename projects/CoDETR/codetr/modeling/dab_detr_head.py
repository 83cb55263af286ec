"""DABDETRHead: the one-to-one query head of (Co-)DAB-DETR, a single-scale DETR, and its positive-query decoder
passes. Transformer: :mod:`.dab_transformer`; losses: :mod:`.criterion`; detections: :mod:`.postprocess`."""
import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .collaborative import memory_to_maps
from .criterion import DETRCriterion, validate_targets
from .dab_transformer import MLP, DABTransformer
from .denoising import inverse_sigmoid
from .position_encoding import box_sine_embed
from .query_head import level_masks

__all__ = ["DABDETRHead"]

# the anchors' smallest side / coordinate: the width/height-modulated attention divides by w and h
ANCHOR_EPS = 1e-3


class DABDETRHead(nn.Module):
    """
    The one-to-one query head of Co-DAB-DETR (implements
    :class:`codetr.modeling.collaborative.CollaborativeQueryHead`).

    Training: encoder on the one projected map (C5, stride 32) -> the ``num_queries`` learned anchors with zero
    content through the decoder (anchor refinement layer by layer) -> one classification layer and one box MLP
    shared by every decoder layer (DAB-DETR's ``class_embed`` / ``bbox_embed``); Hungarian-matched losses at every
    layer (the criterion's ``decoder_losses``: sigmoid focal, L1, GIoU). No two-stage proposals, no denoising.
    Eval: the last layer's logits and boxes.

    Positive queries (``num_co_heads > 0``): the boxes an auxiliary head assigned become the decoder's anchors,
    their content is ``aux_pos_trans_norm[i](aux_pos_trans[i](sine(box)))`` (Linear 2C -> C + LayerNorm of the
    boxes' sine embedding, one per auxiliary head), and the losses of every decoder layer go against the head's
    targets.

    Args:
        transformer: a :class:`DABTransformer`.
        num_classes: number of foreground classes.
        criterion: a :class:`DETRCriterion` with the same ``num_classes`` (default: DAB-DETR's, sigmoid focal 1 /
            L1 5 / GIoU 2, matching costs 2 / 5 / 2).
        num_co_heads: number of auxiliary heads whose positive queries this head decodes (0: DAB-DETR).
    """

    def __init__(
        self,
        *,
        transformer: DABTransformer,
        num_classes: int,
        criterion: Optional[DETRCriterion] = None,
        num_co_heads: int = 0,
    ):
        super().__init__()
        if num_classes <= 0:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        if criterion is None:
            criterion = DETRCriterion(num_classes=num_classes, cls_loss="focal", loss_cls_weight=1.0,
                                      loss_bbox_weight=5.0, loss_giou_weight=2.0)
        if criterion.num_classes != num_classes:
            raise ValueError(f"criterion.num_classes={criterion.num_classes} differs from the head's num_classes={num_classes}")
        if num_co_heads < 0:
            raise ValueError(f"num_co_heads must be >= 0, got {num_co_heads}")
        self.transformer = transformer
        self.criterion = criterion
        self.num_classes = num_classes
        self.embed_dim = C = transformer.embed_dim
        self.num_queries = transformer.num_queries
        self.class_embed = nn.Linear(C, num_classes)
        self.bbox_embed = MLP(C, C, 4, 3)
        self.aux_pos_trans = nn.ModuleList(nn.Linear(2 * C, C) for _ in range(num_co_heads))
        self.aux_pos_trans_norm = nn.ModuleList(nn.LayerNorm(C) for _ in range(num_co_heads))
        self.reset_parameters()

    @property
    def num_co_heads(self) -> int:
        return len(self.aux_pos_trans)

    def reset_parameters(self):
        nn.init.constant_(self.class_embed.bias, -math.log((1 - 0.01) / 0.01))
        nn.init.constant_(self.bbox_embed.layers[-1].weight, 0.0)
        nn.init.constant_(self.bbox_embed.layers[-1].bias, 0.0)

    # ------------------------------------------------------------------ the protocol's encoder side
    def encode(self, features: Sequence[torch.Tensor], masks: torch.Tensor, image_sizes: Optional[torch.Tensor] = None) -> Dict:
        """
        Args:
            features: one map (B, C, h, w) (the neck's projection of C5); masks: (B, H, W) True on padding;
            image_sizes: (B, 2) (h, w) of the box normalisation, stored in the returned dict.

        Returns:
            ``enc_ctx`` (:meth:`DABTransformer.encode`'s dict) with ``image_sizes``.
        """
        if len(features) != 1:
            raise ValueError(f"DABDETRHead is single-scale: expected 1 feature map, got {len(features)}")
        enc_ctx = self.transformer.encode(features[0], level_masks(masks, features)[0])
        if image_sizes is None:
            image_sizes = torch.tensor([masks.shape[-2:]] * masks.shape[0], device=masks.device)
        enc_ctx["image_sizes"] = image_sizes
        return enc_ctx

    def encoder_maps(self, enc_ctx: Dict) -> List[torch.Tensor]:
        """The encoder memory as its one map [(B, C, h, w)] (the adapter of the collaborative branch makes the pyramid)."""
        return memory_to_maps(enc_ctx["memory"], enc_ctx["spatial_shapes"])

    # ------------------------------------------------------------------ predictions
    def predict(self, hidden: torch.Tensor, refs: List[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            hidden: (L, B, N, C) every decoder layer's output; refs: L anchors (B, N, 4), layer l's boxes are
                predicted relative to ``refs[l]``.

        Returns:
            logits (L, B, N, num_classes), boxes (L, B, N, 4) normalised cxcywh =
            sigmoid(bbox_embed(hidden) + inverse_sigmoid(refs)).
        """
        logits = self.class_embed(hidden)
        boxes = (self.bbox_embed(hidden) + inverse_sigmoid(torch.stack(refs), eps=1e-3)).sigmoid()
        return logits, boxes

    def decode(self, enc_ctx: Dict, content: torch.Tensor, anchors: torch.Tensor):
        return self.transformer.decode(enc_ctx, content, anchors, self.bbox_embed)

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        features: Sequence[torch.Tensor],
        masks: torch.Tensor,
        targets: Optional[List[Dict[str, torch.Tensor]]] = None,
        image_sizes: Optional[torch.Tensor] = None,
    ):
        """
        Args:
            features: one map (B, C, h, w); masks: (B, H, W) bool padding mask (True on padding);
            targets: training only, per image ``labels`` (n,) int64, ``boxes`` (n, 4) normalised cxcywh, optional
            ``name``; image_sizes: (B, 2) (h, w) of the normalisation.

        Returns:
            training: (losses, enc_ctx): ``loss_cls`` / ``loss_bbox`` / ``loss_iou`` of the last layer and
            ``d{k}.``-prefixed ones of the others; ``enc_ctx`` as :meth:`encode`.
            eval: (logits (B, N, num_classes), boxes (B, N, 4) normalised cxcywh) of the last layer.
        """
        enc_ctx = self.encode(features, masks, image_sizes)
        if self.training:
            if targets is None:
                raise ValueError("DABDETRHead needs targets in training mode")
            validate_targets(targets, self.num_classes)
        content, anchors = self.transformer.queries(masks.shape[0])
        hidden, refs = self.decode(enc_ctx, content, anchors)
        if not self.training:
            logits, boxes = self.predict(hidden[-1:], refs[-1:])
            return logits[0], boxes[0]
        logits, boxes = self.predict(hidden, refs)
        return self.criterion.decoder_losses(logits, boxes, targets), enc_ctx

    # ------------------------------------------------------------------ positive queries (collaborative branch)
    def aux_query_content(self, ref_boxes: torch.Tensor, head_idx: int) -> torch.Tensor:
        """Content queries of auxiliary head ``head_idx``'s positive queries: LayerNorm_i(Linear_i(sine embedding
        (x, y, w, h order, temperature 10000) of the boxes clamped to [0, 1])); ref_boxes (B, N, 4) -> (B, N, C)."""
        if not 0 <= head_idx < self.num_co_heads:
            raise ValueError(f"head_idx {head_idx} out of range for num_co_heads={self.num_co_heads}")
        emb = box_sine_embed(ref_boxes.clamp(0.0, 1.0), self.embed_dim // 2, 10000.0, "xywh")
        return self.aux_pos_trans_norm[head_idx](self.aux_pos_trans[head_idx](emb))

    def positive_query_losses(self, enc_ctx: Dict, queries: Dict[str, torch.Tensor], head_idx: int) -> Dict[str, torch.Tensor]:
        """
        One extra decoder pass for the positive queries of auxiliary head ``head_idx``: their boxes, clamped to
        [ANCHOR_EPS, 1] (a zero-size padding box would divide the modulated attention by zero), are the DAB
        anchors, :meth:`aux_query_content` their content; no attention mask, no Hungarian matching; the
        criterion's losses at every decoder layer, scaled by ``lambda_1``.

        Args:
            queries: ``ref_boxes`` (B, N, 4) normalised cxcywh, ``labels``, ``label_weights``, ``boxes``,
                ``box_weights`` (:func:`codetr.modeling.collaborative.get_aux_targets`).

        Returns:
            ``loss_cls_aux{i}``, ``loss_bbox_aux{i}``, ``loss_iou_aux{i}`` and ``d{k}.``-prefixed keys.
        """
        ref_boxes = queries["ref_boxes"]
        anchors = ref_boxes.clamp(ANCHOR_EPS, 1.0)
        hidden, refs = self.decode(enc_ctx, self.aux_query_content(ref_boxes, head_idx), anchors)
        logits, boxes = self.predict(hidden, refs)
        return self.criterion.positive_query_losses(logits, boxes, queries, head_idx)
