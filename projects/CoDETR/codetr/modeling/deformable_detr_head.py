"""DeformableDETRHead: the one-to-one query head of (Co-)Deformable-DETR (two-stage, box refinement, mixed query
selection, look forward twice) and its positive-query decoder passes. Losses: :mod:`.criterion`; detections:
:mod:`.postprocess`."""
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

from .criterion import DETRCriterion, validate_targets
from .deformable_transformer import DeformableDETRTransformer
from .query_head import DETRQueryHead

__all__ = ["DeformableDETRHead"]


class DeformableDETRHead(DETRQueryHead):
    """
    The one-to-one query head of Co-Deformable-DETR (implements
    :class:`codetr.modeling.collaborative.CollaborativeQueryHead`).

    Training: encoder -> every token scored as a proposal (the encoder loss: all tokens, Hungarian-matched to the GT
    as class 0 with ``DETRCriterion(binary_encoder_labels=True)``) -> top-K "object" proposals as reference boxes,
    learned content queries ``query_embedding`` -> decoder; Hungarian-matched losses at every decoder layer.
    Eval: the last decoder layer's logits and boxes. No denoising queries.

    Args:
        transformer: a :class:`DeformableDETRTransformer` (its ``num_co_heads`` positive-query projections serve
            the collaborative branch; 0 for Deformable-DETR).
        num_classes: number of foreground classes.
        criterion: a :class:`DETRCriterion` with the same ``num_classes`` (default: Co-Deformable-DETR's, sigmoid
            focal 2 / L1 5 / GIoU 2, binary encoder labels).
        num_queries: number of decoder queries (300).
    """

    def __init__(
        self,
        *,
        transformer: DeformableDETRTransformer,
        num_classes: int,
        criterion: Optional[DETRCriterion] = None,
        num_queries: int = 300,
    ):
        if criterion is None:
            criterion = DETRCriterion(
                num_classes=num_classes, cls_loss="focal", loss_cls_weight=2.0, loss_bbox_weight=5.0,
                loss_giou_weight=2.0, binary_encoder_labels=True,
            )
        super().__init__(transformer, num_classes, criterion, ref_eps=1e-5)
        self.num_queries = num_queries
        self.query_embedding = nn.Embedding(num_queries, self.embed_dim)
        self.reset_parameters()

    # ------------------------------------------------------------------ shared pieces
    def decode(self, enc_ctx, query, query_pos, reference):
        """Run the decoder; reuses ``enc_ctx["memory_values"]`` (the per-layer value projections) when present."""
        return self.transformer.decoder(
            query,
            query_pos,
            reference,
            enc_ctx["memory"],
            enc_ctx["spatial_shapes"],
            enc_ctx["level_start_index"],
            enc_ctx["valid_ratios"],
            enc_ctx["mask_flatten"],
            self.reg_branches,
            memory_values=enc_ctx.get("memory_values"),
            level_shapes=enc_ctx.get("level_shapes"),
        )

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        features: Sequence[torch.Tensor],
        masks: torch.Tensor,
        targets: Optional[List[Dict[str, torch.Tensor]]] = None,
        image_sizes: Optional[torch.Tensor] = None,
        return_enc_ctx: bool = False,
    ):
        """
        Args:
            features: L maps (B, C, h_l, w_l), finest first; masks: (B, H, W) bool padding mask (True on padding);
            targets: training only, per image ``labels`` (n,) int64, ``boxes`` (n, 4) normalised cxcywh, optional
            ``name``; image_sizes: (B, 2) (h, w) of the normalisation; return_enc_ctx: eval only, also return
            ``enc_ctx`` (for a mask head reading the encoder maps).

        Returns:
            training: (losses, enc_ctx), as :meth:`DINOHead.forward` (``memory_values`` when ``num_co_heads > 0``);
            eval: (logits (B, K, num_classes), boxes (B, K, 4) normalised cxcywh) of the last layer (+ ``enc_ctx``
            with ``return_enc_ctx``).
        """
        enc_ctx = self.encode(features, masks, image_sizes)
        query, query_pos, reference, enc_logits, enc_boxes = self.transformer.select_queries(
            enc_ctx, self.cls_branches[-1], self.reg_branches[-1], self.query_embedding.weight
        )
        if self.training:
            if targets is None:
                raise ValueError("DeformableDETRHead needs targets in training mode")
            validate_targets(targets, self.num_classes)
            if self.num_co_heads > 0:
                enc_ctx["memory_values"] = self.transformer.decoder.project_memory(enc_ctx["memory"], enc_ctx["mask_flatten"])
        hidden, refs = self.decode(enc_ctx, query, query_pos, reference)
        if not self.training:
            last = hidden.shape[0] - 1
            logits, boxes = self.predict_layer(last, hidden[last], refs[last])
            return (logits, boxes, enc_ctx) if return_enc_ctx else (logits, boxes)
        logits, boxes = self.predict(hidden, refs)
        losses = self.criterion.encoder_losses(enc_logits, enc_boxes, targets)
        losses.update(self.criterion.decoder_losses(logits, boxes, targets))
        return losses, enc_ctx

    # ------------------------------------------------------------------ positive queries (collaborative branch)
    def positive_query_losses(self, enc_ctx: Dict, queries: Dict[str, torch.Tensor], head_idx: int) -> Dict[str, torch.Tensor]:
        """
        One extra decoder pass for the positive queries of auxiliary head ``head_idx`` (no attention mask, no
        Hungarian matching); the criterion's losses at every decoder layer, scaled by ``lambda_1``.

        Args:
            queries: ``ref_boxes`` (B, N, 4) normalised cxcywh, ``feats`` (B, N, C) their features (the auxiliary
                heads' ``return_feats=True``), ``labels``, ``label_weights``, ``boxes``, ``box_weights``
                (:func:`codetr.modeling.collaborative.get_aux_targets`).
        """
        if "feats" not in queries:
            raise ValueError(
                "Co-Deformable-DETR's positive queries need the auxiliary heads' features: build the heads with "
                "return_feats=True (configs/co_deformable_detr_r50.py does)"
            )
        ref_boxes = queries["ref_boxes"]
        query, query_pos = self.transformer.positive_queries(ref_boxes, queries["feats"], head_idx)
        hidden, refs = self.decode(enc_ctx, query, query_pos, ref_boxes)
        logits, boxes = self.predict(hidden, refs)
        return self.criterion.positive_query_losses(logits, boxes, queries, head_idx)
