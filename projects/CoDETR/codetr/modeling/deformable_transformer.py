"""The Deformable-DETR transformer of Co-Deformable-DETR: the deformable encoder (shared with DINO), two-stage query
selection with "object" proposals, and a decoder with box refinement, fixed query positions and "look forward
twice"; plus Co-Deformable-DETR's positive-query projections."""
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from .denoising import inverse_sigmoid
from .position_encoding import PositionEmbeddingSine, box_sine_embed
from .transformer import DeformableEncoder, DINODecoderLayer, MultiScaleTransformer, select_topk_proposals

__all__ = ["DeformableDecoder", "DeformableDETRTransformer"]


class DeformableDecoder(nn.Module):
    """
    Deformable-DETR decoder with iterative box refinement: every layer reads the same ``query_pos``; after each layer
    the reference boxes are refined by that layer's regression branch, ``sigmoid(reg(out) + inverse_sigmoid(ref,
    1e-5))``, and detached before the next. The layers are :class:`DINODecoderLayer` (post-norm self-attention,
    deformable cross-attention, FFN); no final LayerNorm.
    """

    def __init__(self, num_layers=6, embed_dim=256, num_heads=8, num_levels=4, num_points=4, ffn_dim=2048, dropout=0.0):
        super().__init__()
        self.layers = nn.ModuleList(
            [DINODecoderLayer(embed_dim, num_heads, num_levels, num_points, ffn_dim, dropout) for _ in range(num_layers)]
        )
        self.embed_dim = embed_dim

    def project_memory(self, memory: torch.Tensor, padding_mask: Optional[torch.Tensor]) -> List[torch.Tensor]:
        """Every layer's cross-attention value projection of ``memory`` (see :meth:`DINODecoder.project_memory`)."""
        return [layer.attentions[1].project_value(memory, padding_mask) for layer in self.layers]

    def forward(
        self, query, query_pos, reference, memory, spatial_shapes, level_start_index, valid_ratios, padding_mask,
        reg_branches, memory_values: Optional[List[torch.Tensor]] = None, level_shapes=None,
    ) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """
        Args:
            query, query_pos: (B, N, C); reference: (B, N, 4) normalised cxcywh; memory: (B, S, C);
            valid_ratios: (B, L, 2); padding_mask: (B, S); reg_branches: one box MLP per layer;
            memory_values: optional :meth:`project_memory` output for this memory; level_shapes: optional list of
            the (h, w) of ``spatial_shapes`` as Python ints.

        Returns:
            hidden (num_layers, B, N, C), each layer's output; references: num_layers + 1 tensors (B, N, 4), the
            initial reference then each layer's refined boxes, not detached ("look forward twice").
        """
        if memory_values is not None and len(memory_values) != len(self.layers):
            raise ValueError(f"memory_values has {len(memory_values)} entries for {len(self.layers)} decoder layers")
        hidden, refs = [], [reference]
        ratios = torch.cat([valid_ratios, valid_ratios], -1)[:, None]
        for lid, layer in enumerate(self.layers):
            value = None if memory_values is None else memory_values[lid]
            ref_input = reference[:, :, None] * ratios
            query = layer(
                query, query_pos, ref_input, memory, spatial_shapes, level_start_index, padding_mask, None, value, level_shapes
            )
            new_ref = (reg_branches[lid](query) + inverse_sigmoid(reference, eps=1e-5)).sigmoid()
            reference = new_ref.detach()
            hidden.append(query)
            refs.append(new_ref)
        return torch.stack(hidden), refs


class DeformableDETRTransformer(MultiScaleTransformer):
    """
    The transformer of (Co-)Deformable-DETR, two-stage with mixed query selection.

    ``select_queries`` scores every encoder token as a proposal, takes the top-K by the first class's logit
    ("object" score, the encoder learns binary labels), and turns the detached top-K boxes into the decoder's query
    positions: ``pos_trans_norm(pos_trans(sine embedding))`` (2C -> 2C), whose first half is ``query_pos``; the
    content queries are the head's learned embedding.

    With ``num_co_heads > 0`` the positive queries of auxiliary head i (:meth:`positive_queries`) are
    ``aux_pos_trans_norm[i](aux_pos_trans[i](sine embedding))`` split into (query_pos, query), plus
    ``pos_feats_norm[i](pos_feats_trans[i](features))`` on the content and the learned scalar
    ``head_pos_embed.weight[i]`` on the position (an (num_co_heads, 1) embedding, as the official R50 model).
    """

    def __init__(
        self,
        embed_dim: int = 256,
        num_heads: int = 8,
        num_levels: int = 4,
        num_points: int = 4,
        num_encoder_layers: int = 6,
        num_decoder_layers: int = 6,
        ffn_dim: int = 2048,
        dropout: float = 0.0,
        num_queries: int = 300,
        num_checkpoint: int = 0,
        pos_temperature: float = 10000.0,
        pos_offset: float = -0.5,
        num_co_heads: int = 0,
    ):
        super().__init__()
        C = embed_dim
        self.embed_dim = C
        self.num_levels = num_levels
        self.num_queries = num_queries
        self.position_embedding = PositionEmbeddingSine(C // 2, temperature=pos_temperature, normalize=True, offset=pos_offset)
        self.level_embeds = nn.Parameter(torch.empty(num_levels, C))
        self.encoder = DeformableEncoder(num_encoder_layers, C, num_heads, num_levels, num_points, ffn_dim, dropout, num_checkpoint)
        self.decoder = DeformableDecoder(num_decoder_layers, C, num_heads, num_levels, num_points, ffn_dim, dropout)
        self.enc_output = nn.Linear(C, C)
        self.enc_output_norm = nn.LayerNorm(C)
        self.pos_trans = nn.Linear(2 * C, 2 * C)
        self.pos_trans_norm = nn.LayerNorm(2 * C)
        self.num_co_heads = num_co_heads
        if num_co_heads > 0:
            self.head_pos_embed = nn.Embedding(num_co_heads, 1)
        else:
            self.head_pos_embed = None
        self.aux_pos_trans = nn.ModuleList([nn.Linear(2 * C, 2 * C) for _ in range(num_co_heads)])
        self.aux_pos_trans_norm = nn.ModuleList([nn.LayerNorm(2 * C) for _ in range(num_co_heads)])
        self.pos_feats_trans = nn.ModuleList([nn.Linear(C, C) for _ in range(num_co_heads)])
        self.pos_feats_norm = nn.ModuleList([nn.LayerNorm(C) for _ in range(num_co_heads)])
        self.reset_parameters()

    def proposal_embed(self, boxes: torch.Tensor) -> torch.Tensor:
        """(B, N, 4) normalised cxcywh -> (B, N, 2C) sine embedding (x, y, w, h; T = 10000)."""
        return box_sine_embed(boxes, self.embed_dim // 2, 10000.0, "xywh")

    def select_queries(self, enc_ctx: Dict[str, torch.Tensor], cls_branch: nn.Module, reg_branch: nn.Module, query_embed: torch.Tensor):
        """
        Two-stage mixed query selection.

        Args:
            query_embed: (K, C) the head's learned content queries; K = number of queries.

        Returns:
            query (B, K, C), query_pos (B, K, C), reference (B, K, 4) detached initial boxes (cxcywh);
            enc_logits (B, S, num_classes) and enc_boxes (B, S, 4) of **every** encoder token (the encoder loss).
        """
        B = enc_ctx["memory"].shape[0]
        enc_logits, enc_unact = self.encoder_proposals(enc_ctx, cls_branch, reg_branch)
        K = min(query_embed.shape[0], enc_logits.shape[1])
        topk = select_topk_proposals(enc_logits[..., 0], enc_unact, K)
        topk_unact = torch.gather(enc_unact, 1, topk[..., None].expand(-1, -1, 4)).detach()
        reference = topk_unact.sigmoid()
        query_pos = self.pos_trans_norm(self.pos_trans(self.proposal_embed(reference)))[..., : self.embed_dim]
        query = query_embed[:K][None].expand(B, -1, -1)
        return query, query_pos, reference, enc_logits, enc_unact.sigmoid()

    def positive_queries(self, ref_boxes: torch.Tensor, feats: torch.Tensor, head_idx: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """
        Queries of the positive boxes of auxiliary head ``head_idx``.

        Args:
            ref_boxes: (B, N, 4) normalised cxcywh; feats: (B, N, C) the boxes' features (RoI features, or the
                encoder map at the anchor).

        Returns:
            query (B, N, C), query_pos (B, N, C).
        """
        if not 0 <= head_idx < self.num_co_heads:
            raise ValueError(f"head_idx {head_idx} out of range for num_co_heads={self.num_co_heads}")
        C = self.embed_dim
        # the official code embeds sigmoid(inverse_sigmoid(boxes, 1e-5)): the boxes clamped to [0, 1] up to eps
        boxes = inverse_sigmoid(ref_boxes, eps=1e-5).sigmoid()
        out = self.aux_pos_trans_norm[head_idx](self.aux_pos_trans[head_idx](self.proposal_embed(boxes)))
        query_pos, query = out[..., :C], out[..., C:]
        query = query + self.pos_feats_norm[head_idx](self.pos_feats_trans[head_idx](feats))
        query_pos = query_pos + self.head_pos_embed.weight[head_idx]
        return query, query_pos
