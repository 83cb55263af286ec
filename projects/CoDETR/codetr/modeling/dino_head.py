"""DINOHead: Co-DINO's one-to-one query head (transformer + per-layer predictions, denoising queries) and its
positive-query decoder passes for the collaborative branch. Losses: :mod:`.criterion`; detections:
:mod:`.postprocess`."""
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

from .criterion import DETRCriterion, validate_targets
from .denoising import CdnQueryGenerator
from .position_encoding import box_sine_embed
from .query_head import DETRQueryHead
from .transformer import DINOTransformer

__all__ = ["DINOHead"]


class DINOHead(DETRQueryHead):
    """
    The one-to-one query head of Co-DINO (implements :class:`codetr.modeling.collaborative.CollaborativeQueryHead`).

    Training: encoder -> two-stage query selection -> [denoising queries, matching queries] through
    the decoder; the ``criterion`` computes the losses on the encoder top-K, every decoder layer (Hungarian
    matching) and every denoising group. Eval: the last decoder layer's logits and boxes (turned into detections
    by :class:`codetr.modeling.postprocess.DETRPostProcessor`).

    Args:
        transformer: a :class:`DINOTransformer`; its ``num_co_heads`` positive-query projections
            (``transformer.aux_pos_trans.{i}``, Linear 2C->C, + ``aux_pos_trans_norm.{i}``) serve the
            collaborative branch's auxiliary heads (0 for DINO).
        num_classes: number of foreground classes.
        criterion: a :class:`DETRCriterion` with the same ``num_classes`` (default: Co-DINO's, QFL 1 / L1 5 / GIoU 2).
        num_dn_queries / label_noise_ratio / box_noise_scale: contrastive denoising settings.
    """

    def __init__(
        self,
        *,
        transformer: DINOTransformer,
        num_classes: int,
        criterion: Optional[DETRCriterion] = None,
        num_dn_queries: int = 100,
        label_noise_ratio: float = 0.5,
        box_noise_scale: float = 1.0,
    ):
        criterion = criterion if criterion is not None else DETRCriterion(num_classes=num_classes)
        super().__init__(transformer, num_classes, criterion, ref_eps=1e-3)
        self.num_queries = transformer.num_queries
        self.label_embedding = nn.Embedding(num_classes, self.embed_dim)
        self.dn_generator = CdnQueryGenerator(num_classes, num_dn_queries, label_noise_ratio, box_noise_scale)
        self.reset_parameters()

    # ------------------------------------------------------------------ shared pieces
    def decode(self, enc_ctx, query, reference, attn_mask=None):
        """Run the decoder; reuses ``enc_ctx["memory_values"]`` (the per-layer value projections) when present."""
        return self.transformer.decoder(
            query,
            reference,
            enc_ctx["memory"],
            enc_ctx["spatial_shapes"],
            enc_ctx["level_start_index"],
            enc_ctx["valid_ratios"],
            enc_ctx["mask_flatten"],
            self.reg_branches,
            attn_mask,
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
            features: L maps (B, C, h_l, w_l), finest first.
            masks: (B, H, W) bool image padding mask (True on padding).
            targets: training only: per image ``labels`` (n,) int64, ``boxes`` (n, 4) cxcywh normalised
                by ``image_sizes``, optional ``name``.
            image_sizes: (B, 2) (h, w) used for normalisation; stored in ``enc_ctx``.
            return_enc_ctx: eval only: also return ``enc_ctx`` (for a mask branch reading the encoder maps).

        Returns:
            training: (losses dict, enc_ctx dict). enc_ctx: ``memory`` (B, S, C), ``spatial_shapes`` (L, 2),
            ``level_start_index`` (L,), ``valid_ratios`` (B, L, 2), ``mask_flatten`` (B, S),
            ``image_sizes`` (B, 2) (h, w); with ``num_co_heads > 0`` also ``memory_values`` (the decoder's
            per-layer value projections of ``memory``, reused by :meth:`positive_query_losses`), and
            ``last_logits`` (B, P + K, num_classes) / ``last_boxes`` (B, P + K, 4) normalised cxcywh: the last
            decoder layer's predictions for the P denoising and K matching queries, detached (the training RoIs
            of a mask branch, as the official Co-DINO-Inst).
            eval: (logits (B, K, num_classes), boxes (B, K, 4) normalised cxcywh) of the last layer
            (+ ``enc_ctx`` with ``return_enc_ctx``).
        """
        enc_ctx = self.encode(features, masks, image_sizes)
        query, reference, enc_logits, enc_boxes = self.transformer.select_queries(enc_ctx, self.cls_branches[-1], self.reg_branches[-1])
        if not self.training:
            hidden, refs = self.decode(enc_ctx, query, reference)
            last = hidden.shape[0] - 1
            logits, boxes = self.predict_layer(last, hidden[last], refs[last])
            return (logits, boxes, enc_ctx) if return_enc_ctx else (logits, boxes)
        if targets is None:
            raise ValueError("DINOHead needs targets in training mode")
        validate_targets(targets, self.num_classes)
        if self.num_co_heads > 0:
            # the positive-query passes read the same memory: project it once per layer for all
            enc_ctx["memory_values"] = self.transformer.decoder.project_memory(enc_ctx["memory"], enc_ctx["mask_flatten"])
        K = query.shape[1]
        dn_query, dn_ref, attn_mask, dn_meta = self.dn_generator(targets, self.label_embedding, K)
        P = dn_meta["pad_size"]
        query = torch.cat([dn_query.to(query.dtype), query], 1)
        reference = torch.cat([dn_ref.sigmoid().to(reference.dtype), reference], 1)
        hidden, refs = self.decode(enc_ctx, query, reference, attn_mask if P > 0 else None)
        logits, boxes = self.predict(hidden, refs)
        enc_ctx["last_logits"], enc_ctx["last_boxes"] = logits[-1].detach(), boxes[-1].detach()
        if P == 0:
            # keep the label embedding in the graph (DDP with find_unused_parameters=False)
            logits = logits + self.label_embedding.weight[0, 0] * 0.0

        sizes = enc_ctx["image_sizes"]  # the GIoU loss is computed in pixels of these sizes, as officially
        losses = self.criterion.encoder_losses(enc_logits, enc_boxes, targets, image_sizes=sizes)
        # with P == 0 the denoising losses are zeros that still take part in the normaliser's all-reduce,
        # so that every process runs the same collectives whatever its ground truth
        dn_labels, dn_boxes, dn_w = self.dn_generator.dn_targets(targets, dn_meta, self.num_classes)
        dn_targets = (dn_labels, torch.ones_like(dn_w), dn_boxes, dn_w, sum(len(t["labels"]) for t in targets) * dn_meta["num_groups"])
        dn = (logits[:, :, :P], boxes[:, :, :P], dn_targets)
        losses.update(self.criterion.decoder_losses(logits[:, :, P:], boxes[:, :, P:], targets, dn=dn, image_sizes=sizes))
        return losses, enc_ctx

    # ------------------------------------------------------------------ positive queries (collaborative branch)
    @property
    def aux_pos_trans(self) -> nn.ModuleList:
        """The positive-query projections (registered as ``transformer.aux_pos_trans``)."""
        return self.transformer.aux_pos_trans

    @property
    def aux_pos_trans_norm(self) -> nn.ModuleList:
        """Their LayerNorms (registered as ``transformer.aux_pos_trans_norm``)."""
        return self.transformer.aux_pos_trans_norm

    def aux_query_content(self, ref_boxes: torch.Tensor, head_idx: int) -> torch.Tensor:
        """
        Co-DINO's content queries for positive queries of auxiliary head ``head_idx``:
        LayerNorm_i(Linear_i(sine embedding (x, y, w, h order) of the boxes clamped to [0, 1])).

        Args:
            ref_boxes: (B, N, 4) normalised cxcywh.

        Returns:
            (B, N, C)
        """
        if not 0 <= head_idx < self.num_co_heads:
            raise ValueError(f"head_idx {head_idx} out of range for num_co_heads={self.num_co_heads}")
        emb = box_sine_embed(ref_boxes.clamp(0.0, 1.0), self.embed_dim // 2, 10000.0, "xywh")
        t = self.transformer
        return t.aux_pos_trans_norm[head_idx](t.aux_pos_trans[head_idx](emb))

    def positive_query_losses(self, enc_ctx: Dict, queries: Dict[str, torch.Tensor], head_idx: int) -> Dict[str, torch.Tensor]:
        """
        One extra decoder pass for the positive queries of auxiliary head ``head_idx``: no denoising,
        no attention mask, no Hungarian matching; the criterion's losses at every decoder layer against the
        given per-query targets, scaled by ``lambda_1``.

        Args:
            enc_ctx: from :meth:`forward`.
            queries: ``ref_boxes`` (B, N, 4) normalised cxcywh (the queries' reference boxes), ``labels`` (B, N)
                int64 (num_classes = background), ``label_weights`` (B, N), ``boxes`` (B, N, 4) normalised cxcywh,
                ``box_weights`` (B, N); other keys (``feats``) are not used by Co-DINO.

        Returns:
            ``loss_cls_aux{i}``, ``loss_bbox_aux{i}``, ``loss_iou_aux{i}`` (last layer) and
            ``d{k}.``-prefixed keys for the earlier layers.
        """
        ref_boxes = queries["ref_boxes"]
        hidden, refs = self.decode(enc_ctx, self.aux_query_content(ref_boxes, head_idx), ref_boxes)
        logits, boxes = self.predict(hidden, refs)
        return self.criterion.positive_query_losses(logits, boxes, queries, head_idx,
                                                    image_sizes=enc_ctx["image_sizes"])
