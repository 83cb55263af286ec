"""The DINO transformer of Co-DINO: deformable encoder, two-stage (mixed) query selection, and the
decoder with iterative box refinement and "look forward twice"."""
import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from codetr.layers import MultiScaleDeformableAttention
from codetr.layers.ms_deform_attn import level_shapes as as_level_shapes

from .denoising import inverse_sigmoid
from .position_encoding import PositionEmbeddingSine, box_sine_embed

__all__ = [
    "FFN",
    "DeformableEncoderLayer",
    "DeformableEncoder",
    "DINODecoderLayer",
    "DINODecoder",
    "DINOTransformer",
    "MultiScaleTransformer",
    "encoder_output_proposals",
    "select_topk_proposals",
]


class FFN(nn.Module):
    """Linear-ReLU-Linear with residual; ``layers.0.0`` / ``layers.1`` as mmcv's FFN."""

    def __init__(self, embed_dim: int = 256, ffn_dim: int = 2048, dropout: float = 0.0):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Sequential(nn.Linear(embed_dim, ffn_dim), nn.ReLU(), nn.Dropout(dropout)),
            nn.Linear(ffn_dim, embed_dim),
            nn.Dropout(dropout),
        )

    def forward(self, x):
        return x + self.layers(x)


class DeformableEncoderLayer(nn.Module):
    """Post-norm encoder layer: deformable self-attention -> norm -> FFN -> norm."""

    def __init__(self, embed_dim=256, num_heads=8, num_levels=5, num_points=4, ffn_dim=2048, dropout=0.0):
        super().__init__()
        self.attentions = nn.ModuleList([MultiScaleDeformableAttention(embed_dim, num_heads, num_levels, num_points)])
        self.ffns = nn.ModuleList([FFN(embed_dim, ffn_dim, dropout)])
        self.norms = nn.ModuleList([nn.LayerNorm(embed_dim), nn.LayerNorm(embed_dim)])
        self.dropout = nn.Dropout(dropout)

    def forward(self, query, query_pos, reference_points, spatial_shapes, level_start_index, padding_mask, level_shapes=None):
        """query, query_pos: (B, S, C); reference_points: (B, S, L, 2); padding_mask: (B, S) -> (B, S, C).
        ``level_shapes``: optional list of the (h, w) of ``spatial_shapes`` as Python ints (see
        :class:`MultiScaleDeformableAttention`)."""
        attn = self.attentions[0](
            query + query_pos, reference_points, query, spatial_shapes, level_start_index, padding_mask, level_shapes=level_shapes
        )
        query = self.norms[0](query + self.dropout(attn))
        return self.norms[1](self.ffns[0](query))


class DeformableEncoder(nn.Module):
    """A stack of :class:`DeformableEncoderLayer`; the first ``num_checkpoint`` layers use activation checkpointing."""

    def __init__(self, num_layers=6, embed_dim=256, num_heads=8, num_levels=5, num_points=4, ffn_dim=2048, dropout=0.0, num_checkpoint=0):
        super().__init__()
        self.layers = nn.ModuleList(
            [DeformableEncoderLayer(embed_dim, num_heads, num_levels, num_points, ffn_dim, dropout) for _ in range(num_layers)]
        )
        self.num_checkpoint = num_checkpoint

    @staticmethod
    def reference_points(spatial_shapes, valid_ratios: torch.Tensor) -> torch.Tensor:
        """Pixel centres of every level, normalised by the valid extent: (B, S, L, 2) as (x, y).
        ``spatial_shapes``: (L, 2) int64 or a list of L (h, w) Python ints."""
        refs = []
        device = valid_ratios.device
        for lvl, (h, w) in enumerate(as_level_shapes(spatial_shapes)):
            ys, xs = torch.meshgrid(
                torch.arange(h, dtype=torch.float32, device=device) + 0.5,  # (not linspace: traceable with symbolic h, w)
                torch.arange(w, dtype=torch.float32, device=device) + 0.5,
                indexing="ij",
            )
            ys = ys.reshape(-1)[None] / (valid_ratios[:, None, lvl, 1] * h)
            xs = xs.reshape(-1)[None] / (valid_ratios[:, None, lvl, 0] * w)
            refs.append(torch.stack((xs, ys), -1))
        refs = torch.cat(refs, 1)
        return refs[:, :, None] * valid_ratios[:, None]

    def forward(self, query, query_pos, spatial_shapes, level_start_index, valid_ratios, padding_mask, level_shapes=None):
        """query, query_pos: (B, S, C) -> memory (B, S, C). ``level_shapes``: optional list of the (h, w) of
        ``spatial_shapes`` as Python ints (then no tensor value is read on the host)."""
        ref = self.reference_points(spatial_shapes if level_shapes is None else level_shapes, valid_ratios).to(query.dtype)
        for i, layer in enumerate(self.layers):
            if i < self.num_checkpoint and self.training and torch.is_grad_enabled():
                query = checkpoint(
                    layer, query, query_pos, ref, spatial_shapes, level_start_index, padding_mask, level_shapes, use_reentrant=False
                )
            else:
                query = layer(query, query_pos, ref, spatial_shapes, level_start_index, padding_mask, level_shapes)
        return query


class SelfAttention(nn.Module):
    """Multi-head self-attention (module ``attn``) with positional embedding on query/key; returns the residual sum."""

    def __init__(self, embed_dim=256, num_heads=8, dropout=0.0):
        super().__init__()
        self.attn = nn.MultiheadAttention(embed_dim, num_heads, dropout=dropout, batch_first=True)
        self.dropout = nn.Dropout(dropout)

    def forward(self, query, query_pos, attn_mask=None):
        q = query + query_pos
        out = self.attn(q, q, query, attn_mask=attn_mask, need_weights=False)[0]
        return query + self.dropout(out)


class DINODecoderLayer(nn.Module):
    """Post-norm decoder layer: self-attention -> norm -> deformable cross-attention -> norm -> FFN -> norm."""

    def __init__(self, embed_dim=256, num_heads=8, num_levels=5, num_points=4, ffn_dim=2048, dropout=0.0):
        super().__init__()
        self.attentions = nn.ModuleList(
            [SelfAttention(embed_dim, num_heads, dropout), MultiScaleDeformableAttention(embed_dim, num_heads, num_levels, num_points)]
        )
        self.ffns = nn.ModuleList([FFN(embed_dim, ffn_dim, dropout)])
        self.norms = nn.ModuleList([nn.LayerNorm(embed_dim) for _ in range(3)])
        self.dropout = nn.Dropout(dropout)

    def forward(
        self, query, query_pos, reference_points, memory, spatial_shapes, level_start_index, padding_mask, attn_mask=None,
        memory_value=None, level_shapes=None,
    ):
        """
        query, query_pos: (B, N, C); reference_points: (B, N, L, 4); memory: (B, S, C) -> (B, N, C).
        ``memory_value``: optional (B, S, C), the cross-attention's ``project_value(memory, padding_mask)``
        computed beforehand (shared by several decoder passes); ``memory`` is then not read.
        """
        query = self.norms[0](self.attentions[0](query, query_pos, attn_mask))
        cross = self.attentions[1]
        if memory_value is None:
            attn = cross(
                query + query_pos, reference_points, memory, spatial_shapes, level_start_index, padding_mask, level_shapes=level_shapes
            )
        else:
            attn = cross(
                query + query_pos, reference_points, memory_value, spatial_shapes, level_start_index, value_projected=True,
                level_shapes=level_shapes,
            )
        query = self.norms[1](query + self.dropout(attn))
        return self.norms[2](self.ffns[0](query))


class DINODecoder(nn.Module):
    """
    DINO decoder: query positions are an MLP (``ref_point_head``) of the sine embedding of the
    current reference boxes; after each layer the reference is refined by the layer's regression
    branch applied to the **un-normalised** output, and detached before the next layer.
    """

    def __init__(self, num_layers=6, embed_dim=256, num_heads=8, num_levels=5, num_points=4, ffn_dim=2048, dropout=0.0):
        super().__init__()
        self.layers = nn.ModuleList(
            [DINODecoderLayer(embed_dim, num_heads, num_levels, num_points, ffn_dim, dropout) for _ in range(num_layers)]
        )
        self.ref_point_head = nn.Sequential(nn.Linear(2 * embed_dim, embed_dim), nn.ReLU(), nn.Linear(embed_dim, embed_dim))
        self.norm = nn.LayerNorm(embed_dim)
        self.embed_dim = embed_dim

    def project_memory(self, memory: torch.Tensor, padding_mask: Optional[torch.Tensor]) -> List[torch.Tensor]:
        """
        Every layer's cross-attention value projection of ``memory`` (B, S, C) -> list of num_layers (B, S, C).

        Pass the list as ``memory_values`` to run several decoder passes over the same memory (Co-DETR: the
        one-to-one pass and one pass per auxiliary head) while projecting the memory once per layer: the
        results are those of separate passes, at a fraction of the cost (the projection is a (B*S, C) x (C, C)
        matmul per layer, forward and backward, while the queries number a few hundred).
        """
        return [layer.attentions[1].project_value(memory, padding_mask) for layer in self.layers]

    def forward(
        self, query, reference, memory, spatial_shapes, level_start_index, valid_ratios, padding_mask, reg_branches, attn_mask=None,
        memory_values: Optional[List[torch.Tensor]] = None, level_shapes=None,
    ) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """
        Args:
            query: (B, N, C) content queries; reference: (B, N, 4) normalised cxcywh boxes.
            memory: (B, S, C); valid_ratios: (B, L, 2); padding_mask: (B, S).
            reg_branches: one regression MLP per layer.
            attn_mask: optional (N, N) bool self-attention mask (True = blocked).
            memory_values: optional :meth:`project_memory` output for this ``memory`` and ``padding_mask``.
            level_shapes: optional list of the (h, w) of ``spatial_shapes`` as Python ints.

        Returns:
            hidden: (num_layers, B, N, C), the final-LayerNorm'ed output of every layer;
            references: list of num_layers + 1 tensors (B, N, 4): the initial reference, then each
            layer's refined boxes (not detached: "look forward twice").
        """
        if memory_values is not None and len(memory_values) != len(self.layers):
            raise ValueError(f"memory_values has {len(memory_values)} entries for {len(self.layers)} decoder layers")
        hidden, refs = [], [reference]
        ratios = torch.cat([valid_ratios, valid_ratios], -1)[:, None]
        for lid, layer in enumerate(self.layers):
            ref_input = reference[:, :, None] * ratios
            query_pos = self.ref_point_head(box_sine_embed(ref_input[:, :, 0], self.embed_dim // 2, 10000.0, "yxwh"))
            value = None if memory_values is None else memory_values[lid]
            query = layer(
                query, query_pos, ref_input, memory, spatial_shapes, level_start_index, padding_mask, attn_mask, value, level_shapes
            )
            new_ref = (reg_branches[lid](query) + inverse_sigmoid(reference, eps=1e-3)).sigmoid()
            reference = new_ref.detach()
            hidden.append(self.norm(query))
            refs.append(new_ref)
        return torch.stack(hidden), refs


def encoder_output_proposals(memory: torch.Tensor, padding_mask: torch.Tensor, spatial_shapes):
    """
    Two-stage proposals: one box per token at its cell centre (normalised by the valid extent)
    with w = h = 0.05 * 2^level. ``spatial_shapes``: (L, 2) int64 or a list of L (h, w) Python ints.

    Returns:
        output_memory: (B, S, C), memory zeroed at padded or invalid tokens;
        proposals_unact: (B, S, 4) inverse-sigmoid proposals, +inf at padded or invalid tokens
        (valid: every coordinate in (0.01, 0.99)).
    """
    B = memory.shape[0]
    proposals, start = [], 0
    for lvl, (h, w) in enumerate(as_level_shapes(spatial_shapes)):
        m = padding_mask[:, start : start + h * w].view(B, h, w)
        valid_h = (~m[:, :, 0]).sum(1).to(torch.float32)
        valid_w = (~m[:, 0, :]).sum(1).to(torch.float32)
        gy, gx = torch.meshgrid(
            torch.arange(h, dtype=torch.float32, device=memory.device),
            torch.arange(w, dtype=torch.float32, device=memory.device),
            indexing="ij",
        )
        grid = torch.stack([gx, gy], -1)[None]
        scale = torch.stack([valid_w, valid_h], -1).view(B, 1, 1, 2)
        grid = (grid + 0.5) / scale
        wh = torch.full_like(grid, 0.05 * (2.0**lvl))
        proposals.append(torch.cat([grid, wh], -1).view(B, -1, 4))
        start += h * w
    proposals = torch.cat(proposals, 1)
    valid = ((proposals > 0.01) & (proposals < 0.99)).all(-1, keepdim=True)
    proposals = torch.log(proposals / (1 - proposals))
    invalid = padding_mask[..., None] | ~valid
    proposals = proposals.masked_fill(invalid, float("inf"))
    output_memory = memory.masked_fill(invalid, 0.0)
    return output_memory, proposals


def select_topk_proposals(scores: torch.Tensor, coords_unact: torch.Tensor, k: int) -> torch.Tensor:
    """
    Indices (B, k) of the k best-scoring *valid* encoder proposals.

    ``scores``: (B, S) selection score per token; ``coords_unact``: (B, S, 4) its inverse-sigmoid box, +inf at
    padded or invalid tokens (:func:`encoder_output_proposals`). Those tokens carry zeroed memory, so their score is
    one constant; if the valid tokens' scores fall below it (as the auxiliary heads' losses can push them early in
    training), a plain top-k fills the queries with boxes that are ``sigmoid(inf) = 1`` -- outside the image and with
    zero gradient, and training stalls until the scores happen to cross back (the tiny Co-DINO overfit test sat at
    AP50 0 for ~120 iterations). They are ranked last here (the official code ranks them by their
    score); only when k exceeds the number of valid tokens is one of them chosen.
    """
    invalid = torch.isinf(coords_unact).any(-1)
    return scores.masked_fill(invalid, float("-inf")).topk(k, dim=1)[1]


class MultiScaleTransformer(nn.Module):
    """
    What the deformable DETRs share: ``encode`` flattens the multi-scale features (sine position + learned level
    embedding ``level_embeds``) and runs the deformable ``encoder``; ``encoder_proposals`` scores one two-stage
    proposal per encoder token (``enc_output`` + ``enc_output_norm``, then the given cls/reg branches).
    Subclasses set ``num_levels``, ``position_embedding``, ``level_embeds``, ``encoder``, ``enc_output``,
    ``enc_output_norm``.
    """

    @staticmethod
    def valid_ratios(mask: torch.Tensor) -> torch.Tensor:
        """(B, H, W) padding mask -> (B, 2) valid fraction as (w, h)."""
        _, H, W = mask.shape
        valid_h = (~mask[:, :, 0]).sum(1).to(torch.float32) / H
        valid_w = (~mask[:, 0, :]).sum(1).to(torch.float32) / W
        return torch.stack([valid_w, valid_h], -1)

    def encode(self, features: Sequence[torch.Tensor], masks: Sequence[torch.Tensor]) -> Dict[str, torch.Tensor]:
        """
        Args:
            features: L maps (B, C, h_l, w_l); masks: L padding masks (B, h_l, w_l), True on padding.

        Returns:
            dict with ``memory`` (B, S, C), ``spatial_shapes`` (L, 2), ``level_start_index`` (L,),
            ``valid_ratios`` (B, L, 2), ``mask_flatten`` (B, S), and ``level_shapes``: the rows of
            ``spatial_shapes`` as a list of Python ints (what traceable code reads instead of the tensor).
        """
        if len(features) != self.num_levels:
            raise ValueError(f"expected {self.num_levels} feature levels, got {len(features)}")
        srcs, poss, flat_masks, shapes = [], [], [], []
        for lvl, (feat, mask) in enumerate(zip(features, masks)):
            shapes.append((feat.shape[-2], feat.shape[-1]))
            pos = self.position_embedding(mask).to(feat.dtype)
            srcs.append(feat.flatten(2).transpose(1, 2))
            poss.append(pos.flatten(2).transpose(1, 2) + self.level_embeds[lvl].view(1, 1, -1).to(feat.dtype))
            flat_masks.append(mask.flatten(1))
        src = torch.cat(srcs, 1)
        pos = torch.cat(poss, 1)
        mask_flatten = torch.cat(flat_masks, 1)
        device = src.device
        if torch.compiler.is_compiling() or torch.compiler.is_exporting():
            # sizes may be symbolic (dynamic shapes): keep them in the graph, not specialised to this input's
            spatial_shapes = torch.stack(
                [torch.stack([torch.scalar_tensor(d, dtype=torch.int64, device=device) for d in hw]) for hw in shapes]
            )
        else:
            spatial_shapes = torch.as_tensor(shapes, dtype=torch.int64, device=device)
        level_start_index = torch.cat([spatial_shapes.new_zeros(1), spatial_shapes.prod(1).cumsum(0)[:-1]])
        valid_ratios = torch.stack([self.valid_ratios(m) for m in masks], 1)
        memory = self.encoder(src, pos, spatial_shapes, level_start_index, valid_ratios, mask_flatten, shapes)
        return dict(
            memory=memory,
            spatial_shapes=spatial_shapes,
            level_shapes=shapes,
            level_start_index=level_start_index,
            valid_ratios=valid_ratios,
            mask_flatten=mask_flatten,
        )

    def reset_parameters(self):
        """As mmdet's deformable transformers: xavier on every matrix, the deformable attentions' own init, normal
        level embeddings."""
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for m in self.modules():
            if isinstance(m, MultiScaleDeformableAttention):
                m.reset_parameters()
        nn.init.normal_(self.level_embeds)

    def encoder_proposals(self, enc_ctx: Dict[str, torch.Tensor], cls_branch: nn.Module, reg_branch: nn.Module):
        """
        Two-stage proposals of every encoder token.

        Returns:
            enc_logits (B, S, num_classes); enc_coords_unact (B, S, 4): inverse-sigmoid boxes, +inf at padded or
            invalid tokens.
        """
        shapes = enc_ctx.get("level_shapes", enc_ctx["spatial_shapes"])
        out_memory, proposals = encoder_output_proposals(enc_ctx["memory"], enc_ctx["mask_flatten"], shapes)
        out_memory = self.enc_output_norm(self.enc_output(out_memory))
        return cls_branch(out_memory), reg_branch(out_memory) + proposals.to(out_memory.dtype)


class DINOTransformer(MultiScaleTransformer):
    """
    The transformer of the one-to-one branch.

    ``encode`` flattens the multi-scale features (sine position + learned level embedding) and runs
    the deformable encoder; ``select_queries`` does two-stage mixed query selection (top-K encoder
    proposals as reference boxes, learned content queries); ``decoder`` is a :class:`DINODecoder`.
    """

    def __init__(
        self,
        embed_dim: int = 256,
        num_heads: int = 8,
        num_levels: int = 5,
        num_points: int = 4,
        num_encoder_layers: int = 6,
        num_decoder_layers: int = 6,
        ffn_dim: int = 2048,
        dropout: float = 0.0,
        num_queries: int = 900,
        num_checkpoint: int = 0,
        pos_temperature: float = 20.0,
        num_co_heads: int = 0,
    ):
        super().__init__()
        self.embed_dim = embed_dim
        self.num_levels = num_levels
        self.num_queries = num_queries
        self.position_embedding = PositionEmbeddingSine(embed_dim // 2, temperature=pos_temperature, normalize=True)
        self.level_embeds = nn.Parameter(torch.empty(num_levels, embed_dim))
        self.encoder = DeformableEncoder(num_encoder_layers, embed_dim, num_heads, num_levels, num_points, ffn_dim, dropout, num_checkpoint)
        self.decoder = DINODecoder(num_decoder_layers, embed_dim, num_heads, num_levels, num_points, ffn_dim, dropout)
        self.enc_output = nn.Linear(embed_dim, embed_dim)
        self.enc_output_norm = nn.LayerNorm(embed_dim)
        self.query_embed = nn.Embedding(num_queries, embed_dim)
        # positive-query projections of Co-DINO's auxiliary heads: Linear(2C -> C) + LayerNorm(C) of the positive
        # queries' box embeddings, one per auxiliary head (official names; none for DINO)
        self.aux_pos_trans = nn.ModuleList([nn.Linear(2 * embed_dim, embed_dim) for _ in range(num_co_heads)])
        self.aux_pos_trans_norm = nn.ModuleList([nn.LayerNorm(embed_dim) for _ in range(num_co_heads)])
        self.reset_parameters()

    def reset_parameters(self):
        super().reset_parameters()
        nn.init.normal_(self.query_embed.weight)
        for m in self.aux_pos_trans:
            nn.init.zeros_(m.bias)

    def select_queries(self, enc_ctx: Dict[str, torch.Tensor], cls_branch: nn.Module, reg_branch: nn.Module, num_queries: Optional[int] = None):
        """
        Two-stage mixed query selection.

        Returns:
            query: (B, K, C) learned content queries; reference: (B, K, 4) detached initial boxes (cxcywh);
            topk_logits: (B, K, num_classes) and topk_boxes: (B, K, 4) of the encoder proposals (not
            detached; they feed the encoder loss).
        """
        memory = enc_ctx["memory"]
        K = num_queries or self.num_queries
        enc_logits, enc_coords_unact = self.encoder_proposals(enc_ctx, cls_branch, reg_branch)
        K = min(K, enc_logits.shape[1])
        topk = select_topk_proposals(enc_logits.max(-1)[0], enc_coords_unact, K)
        topk_logits = torch.gather(enc_logits, 1, topk[..., None].expand(-1, -1, enc_logits.shape[-1]))
        topk_unact = torch.gather(enc_coords_unact, 1, topk[..., None].expand(-1, -1, 4))
        topk_boxes = topk_unact.sigmoid()
        query = self.query_embed.weight[:K][None].expand(memory.shape[0], -1, -1)
        return query, topk_unact.detach().sigmoid(), topk_logits, topk_boxes
