"""The DAB-DETR transformer: a single-scale DETR whose queries are learned 4-D anchor boxes.

DAB-DETR ("DAB-DETR: Dynamic Anchor Boxes are Better Queries for DETR", Liu et al., ICLR 2022) runs on one map
(ResNet C5, stride 32). Facts as in the public implementations (github IDEA-Research/DAB-DETR, detrex
``projects/dab_detr``); the code here is ours:

* **Encoder** (6 post-norm layers): self-attention (``torch.nn.MultiheadAttention``) on the flattened map with
  query = key = x + pos * ``query_scale(x)`` (an MLP of the layer input scales the sine position embedding),
  value = x; FFN with PReLU.
* **Queries**: 300 learned anchors ``refpoint_embed`` (N, 4), in inverse-sigmoid space (cx, cy, w, h);
  the content part of every query starts at zero.
* **Decoder** (6 post-norm layers: self-attention, conditional cross-attention, FFN). Per layer, with the
  current anchor (x, y, w, h):

  - ``sine = PE(anchor)`` (B, N, 2C), order (y, x, w, h), temperature 10000; ``query_pos = ref_point_head(sine)``
    is the position part of the self-attention query and, in the first layer, of the cross-attention query;
  - the cross-attention's positional query is ``sine[..., :C]`` (the (y, x) part) times ``query_scale(content)``
    (1 in the first layer), with its x half multiplied by ``w_ref / w`` and its y half by ``h_ref / h``, where
    ``(w_ref, h_ref) = sigmoid(ref_anchor_head(content))``: the **width/height-modulated positional attention**;
  - conditional cross-attention (:class:`ConditionalCrossAttention`): per head the query is the concatenation
    [content part, positional part] and the key [content part, sine position of the pixel], so that the logit
    is a content dot product plus a positional one, scaled by 1/sqrt(2 * head_dim);
  - **anchor refinement**: ``anchor' = sigmoid(bbox_embed(out) + inverse_sigmoid(anchor))`` with ``out`` the
    layer output *before* the final LayerNorm; the next layer gets ``anchor'`` detached, the predictions of
    layer l+1 are made relative to the not-detached ``anchor'`` of layer l (both public implementations).

Choices: the decoder's self-attention is ``torch.nn.MultiheadAttention`` on (content + query_pos), i.e. one
projection of the sum where DAB-DETR projects content and position separately and adds (the same function
class with tied weights). The cross-attention logit cannot be written with ``nn.MultiheadAttention``, whose
input projection would mix the content and positional halves of each head, so its projections are separate
``nn.Linear`` layers and the attention itself is ``torch.nn.functional.scaled_dot_product_attention`` (torch's
standard attention, no kernel of ours). The anchors' (x, y) are initialised uniformly in [0, 1] and stay
learnable (detrex's ``random_refpoints_xy``; its attempt to freeze them has no effect in either implementation).
"""
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .denoising import inverse_sigmoid
from .position_encoding import PositionEmbeddingSine, box_sine_embed
from .transformer import FFN, SelfAttention

__all__ = [
    "MLP",
    "ConditionalCrossAttention",
    "DABEncoderLayer",
    "DABEncoder",
    "DABDecoderLayer",
    "DABDecoder",
    "DABTransformer",
]


class MLP(nn.Module):
    """``num_layers`` Linear layers with ReLU between them (module list ``layers``)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int):
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


class PReLUFFN(FFN):
    """:class:`FFN` (Linear-act-Linear + residual) with a PReLU activation, as DAB-DETR."""

    def __init__(self, embed_dim: int = 256, ffn_dim: int = 2048, dropout: float = 0.0):
        super().__init__(embed_dim, ffn_dim, dropout)
        self.layers[0][1] = nn.PReLU()


class ConditionalCrossAttention(nn.Module):
    """Cross-attention whose per-head logits are a content term plus a positional term.

    For head h (head_dim d = C / num_heads), query n and key s::

        logit[h, n, s] = (qc[n, h] . kc[s, h] + qs[n, h] . kp[s, h]) / sqrt(2 d)
        qc = Wqc content (+ Wqp query_pos in the first layer)    kc = Wkc memory (+ Wkp key_pos in the first layer)
        qs = Wqs query_sine                                       kp = Wkp key_pos

    then softmax over the non-padded keys, values ``Wv memory``, output ``Wo``. Returns the attention output
    (no residual).
    """

    def __init__(self, embed_dim: int = 256, num_heads: int = 8, dropout: float = 0.0, with_query_pos: bool = False):
        """
        Args:
            with_query_pos: add the projected ``query_pos`` and ``key_pos`` to the content query/key (DAB-DETR's
                first decoder layer only).
        """
        super().__init__()
        if embed_dim % num_heads != 0:
            raise ValueError(f"ConditionalCrossAttention: embed_dim {embed_dim} not divisible by num_heads {num_heads}")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.dropout = dropout
        self.query_content_proj = nn.Linear(embed_dim, embed_dim)
        self.query_pos_proj = nn.Linear(embed_dim, embed_dim) if with_query_pos else None
        self.query_sine_proj = nn.Linear(embed_dim, embed_dim)
        self.key_content_proj = nn.Linear(embed_dim, embed_dim)
        self.key_pos_proj = nn.Linear(embed_dim, embed_dim)
        self.value_proj = nn.Linear(embed_dim, embed_dim)
        self.out_proj = nn.Linear(embed_dim, embed_dim)

    def forward(
        self,
        query: Tensor,
        query_pos: Tensor,
        query_sine: Tensor,
        memory: Tensor,
        key_pos: Tensor,
        padding_mask: Optional[Tensor] = None,
    ) -> Tensor:
        """
        Args:
            query: (B, N, C) content; query_pos: (B, N, C); query_sine: (B, N, C) the modulated positional query.
            memory: (B, S, C); key_pos: (B, S, C) sine position of the keys; padding_mask: (B, S), True on padding.

        Returns:
            (B, N, C)
        """
        B, N, C = query.shape
        S = memory.shape[1]
        H, d = self.num_heads, C // self.num_heads
        q = self.query_content_proj(query)
        k = self.key_content_proj(memory)
        kp = self.key_pos_proj(key_pos)
        if self.query_pos_proj is not None:
            q = q + self.query_pos_proj(query_pos)
            k = k + kp
        qs = self.query_sine_proj(query_sine)
        # (B, H, N, 2d) / (B, H, S, 2d): per head [content, position]
        q = torch.cat([q.view(B, N, H, d), qs.view(B, N, H, d)], -1).transpose(1, 2)
        k = torch.cat([k.view(B, S, H, d), kp.view(B, S, H, d)], -1).transpose(1, 2)
        v = self.value_proj(memory).view(B, S, H, d).transpose(1, 2)
        mask = None
        if padding_mask is not None:
            mask = ~padding_mask[:, None, None, :]  # True = may attend
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0)
        return self.out_proj(out.transpose(1, 2).reshape(B, N, C))


class DABEncoderLayer(nn.Module):
    """Post-norm: self-attention -> norm -> FFN (PReLU) -> norm."""

    def __init__(self, embed_dim: int = 256, num_heads: int = 8, ffn_dim: int = 2048, dropout: float = 0.0):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(embed_dim, num_heads, dropout=dropout, batch_first=True)
        self.ffn = PReLUFFN(embed_dim, ffn_dim, dropout)
        self.norms = nn.ModuleList([nn.LayerNorm(embed_dim), nn.LayerNorm(embed_dim)])
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, pos: Tensor, padding_mask: Optional[Tensor]) -> Tensor:
        """x, pos: (B, S, C); padding_mask: (B, S) -> (B, S, C)."""
        q = x + pos
        attn = self.self_attn(q, q, x, key_padding_mask=padding_mask, need_weights=False)[0]
        x = self.norms[0](x + self.dropout(attn))
        return self.norms[1](self.ffn(x))


class DABEncoder(nn.Module):
    """Encoder layers; each layer's position embedding is scaled by ``query_scale`` (MLP) of its input."""

    def __init__(self, num_layers: int = 6, embed_dim: int = 256, num_heads: int = 8, ffn_dim: int = 2048, dropout: float = 0.0):
        super().__init__()
        self.layers = nn.ModuleList(DABEncoderLayer(embed_dim, num_heads, ffn_dim, dropout) for _ in range(num_layers))
        self.query_scale = MLP(embed_dim, embed_dim, embed_dim, 2)

    def forward(self, x: Tensor, pos: Tensor, padding_mask: Optional[Tensor]) -> Tensor:
        for layer in self.layers:
            x = layer(x, pos * self.query_scale(x), padding_mask)
        return x


class DABDecoderLayer(nn.Module):
    """Post-norm: self-attention -> norm -> conditional cross-attention -> norm -> FFN (PReLU) -> norm."""

    def __init__(
        self, embed_dim: int = 256, num_heads: int = 8, ffn_dim: int = 2048, dropout: float = 0.0, first: bool = False
    ):
        super().__init__()
        self.self_attn = SelfAttention(embed_dim, num_heads, dropout)
        self.cross_attn = ConditionalCrossAttention(embed_dim, num_heads, dropout, with_query_pos=first)
        self.ffn = PReLUFFN(embed_dim, ffn_dim, dropout)
        self.norms = nn.ModuleList([nn.LayerNorm(embed_dim) for _ in range(3)])
        self.dropout = nn.Dropout(dropout)

    def forward(
        self,
        query: Tensor,
        query_pos: Tensor,
        query_sine: Tensor,
        memory: Tensor,
        key_pos: Tensor,
        padding_mask: Optional[Tensor],
        attn_mask: Optional[Tensor] = None,
    ) -> Tensor:
        """query, query_pos, query_sine: (B, N, C); memory, key_pos: (B, S, C) -> (B, N, C)."""
        query = self.norms[0](self.self_attn(query, query_pos, attn_mask))
        attn = self.cross_attn(query, query_pos, query_sine, memory, key_pos, padding_mask)
        query = self.norms[1](query + self.dropout(attn))
        return self.norms[2](self.ffn(query))


class DABDecoder(nn.Module):
    """Decoder with anchor-derived positional queries, width/height modulation and layer-by-layer refinement."""

    def __init__(
        self,
        num_layers: int = 6,
        embed_dim: int = 256,
        num_heads: int = 8,
        ffn_dim: int = 2048,
        dropout: float = 0.0,
        modulate_hw_attn: bool = True,
    ):
        super().__init__()
        self.embed_dim = embed_dim
        self.layers = nn.ModuleList(
            DABDecoderLayer(embed_dim, num_heads, ffn_dim, dropout, first=(i == 0)) for i in range(num_layers)
        )
        self.ref_point_head = MLP(2 * embed_dim, embed_dim, embed_dim, 2)
        self.query_scale = MLP(embed_dim, embed_dim, embed_dim, 2)
        self.ref_anchor_head = MLP(embed_dim, embed_dim, 2, 2) if modulate_hw_attn else None
        self.norm = nn.LayerNorm(embed_dim)

    def positional_queries(self, query: Tensor, anchors: Tensor, layer_idx: int) -> Tuple[Tensor, Tensor]:
        """
        Args:
            query: (B, N, C) the content entering layer ``layer_idx``; anchors: (B, N, 4) cxcywh in (0, 1).

        Returns:
            query_pos (B, N, C) = ref_point_head(PE(anchor)); query_sine (B, N, C): the (y, x) half of PE(anchor),
            scaled by query_scale(query) (not in layer 0), x part times w_ref / w and y part times h_ref / h.
        """
        C = self.embed_dim
        sine = box_sine_embed(anchors, C // 2, 10000.0, "yxwh")  # (B, N, 2C): y, x, w, h
        query_pos = self.ref_point_head(sine)
        query_sine = sine[..., :C]
        if layer_idx > 0:
            query_sine = query_sine * self.query_scale(query)
        if self.ref_anchor_head is not None:
            ref_hw = self.ref_anchor_head(query).sigmoid()
            scale = torch.cat(
                [
                    (ref_hw[..., 1] / anchors[..., 3])[..., None].expand(-1, -1, C // 2),  # y half: h_ref / h
                    (ref_hw[..., 0] / anchors[..., 2])[..., None].expand(-1, -1, C // 2),  # x half: w_ref / w
                ],
                -1,
            )
            query_sine = query_sine * scale
        return query_pos, query_sine

    def forward(
        self,
        query: Tensor,
        anchors: Tensor,
        memory: Tensor,
        key_pos: Tensor,
        padding_mask: Optional[Tensor],
        bbox_embed: nn.Module,
        attn_mask: Optional[Tensor] = None,
    ) -> Tuple[Tensor, List[Tensor]]:
        """
        Args:
            query: (B, N, C) content queries (zeros for DAB-DETR's matching queries).
            anchors: (B, N, 4) initial anchors, cxcywh in (0, 1).
            memory, key_pos: (B, S, C) encoder output and its sine position embedding; padding_mask: (B, S).
            bbox_embed: the box regression MLP (C -> 4), shared by all layers.
            attn_mask: optional (N, N) bool self-attention mask (True = blocked).

        Returns:
            hidden: (num_layers, B, N, C) every layer's output after the final LayerNorm;
            references: num_layers tensors (B, N, 4), the anchor each layer's boxes are predicted relative to:
            the initial anchors, then each refined anchor (not detached).
        """
        hidden, refs = [], [anchors]
        for lid, layer in enumerate(self.layers):
            query_pos, query_sine = self.positional_queries(query, anchors, lid)
            query = layer(query, query_pos, query_sine, memory, key_pos, padding_mask, attn_mask)
            hidden.append(self.norm(query))
            if lid < len(self.layers) - 1:
                new_anchors = (bbox_embed(query) + inverse_sigmoid(anchors, eps=1e-3)).sigmoid()
                refs.append(new_anchors)
                anchors = new_anchors.detach()
        return torch.stack(hidden), refs


class DABTransformer(nn.Module):
    """The DAB-DETR transformer: :meth:`encode` one map, :meth:`queries` the learned anchors, ``decoder``."""

    def __init__(
        self,
        embed_dim: int = 256,
        num_heads: int = 8,
        num_encoder_layers: int = 6,
        num_decoder_layers: int = 6,
        ffn_dim: int = 2048,
        dropout: float = 0.0,
        num_queries: int = 300,
        modulate_hw_attn: bool = True,
        pos_temperature: float = 20.0,
        random_refpoints_xy: bool = True,
    ):
        super().__init__()
        self.embed_dim = embed_dim
        self.num_queries = num_queries
        self.position_embedding = PositionEmbeddingSine(embed_dim // 2, temperature=pos_temperature, normalize=True)
        self.encoder = DABEncoder(num_encoder_layers, embed_dim, num_heads, ffn_dim, dropout)
        self.decoder = DABDecoder(num_decoder_layers, embed_dim, num_heads, ffn_dim, dropout, modulate_hw_attn)
        self.refpoint_embed = nn.Embedding(num_queries, 4)
        self.random_refpoints_xy = random_refpoints_xy
        self.reset_parameters()

    def reset_parameters(self):
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        nn.init.normal_(self.refpoint_embed.weight)
        if self.random_refpoints_xy:
            with torch.no_grad():
                xy = torch.rand_like(self.refpoint_embed.weight[:, :2])
                self.refpoint_embed.weight[:, :2] = inverse_sigmoid(xy)

    def encode(self, feature: Tensor, mask: Tensor) -> Dict[str, Tensor]:
        """
        Args:
            feature: (B, C, h, w) the projected backbone map; mask: (B, h, w), True on padding.

        Returns:
            dict with ``memory`` (B, S, C), ``memory_pos`` (B, S, C) the sine embedding of the pixels,
            ``mask_flatten`` (B, S), ``spatial_shapes`` (1, 2) int64 [(h, w)], ``level_start_index`` (1,),
            ``valid_ratios`` (B, 1, 2) as (w, h) -- the layout of the multi-scale encoders, one level.
        """
        if feature.dim() != 4 or mask.shape != (feature.shape[0], *feature.shape[-2:]):
            raise ValueError(
                f"DABTransformer.encode: feature (B, C, h, w) and mask (B, h, w) expected, "
                f"got {tuple(feature.shape)} and {tuple(mask.shape)}"
            )
        if feature.shape[1] != self.embed_dim:
            raise ValueError(f"DABTransformer.encode: feature has {feature.shape[1]} channels, expected {self.embed_dim}")
        h, w = feature.shape[-2:]
        pos = self.position_embedding(mask).to(feature.dtype).flatten(2).transpose(1, 2)
        src = feature.flatten(2).transpose(1, 2)
        mask_flatten = mask.flatten(1)
        memory = self.encoder(src, pos, mask_flatten)
        valid_h = (~mask[:, :, 0]).sum(1).to(torch.float32) / h
        valid_w = (~mask[:, 0, :]).sum(1).to(torch.float32) / w
        return dict(
            memory=memory,
            memory_pos=pos,
            mask_flatten=mask_flatten,
            spatial_shapes=torch.as_tensor([[h, w]], dtype=torch.int64, device=feature.device),
            level_start_index=torch.zeros(1, dtype=torch.int64, device=feature.device),
            valid_ratios=torch.stack([valid_w, valid_h], -1)[:, None],
        )

    def queries(self, batch_size: int) -> Tuple[Tensor, Tensor]:
        """The matching queries: content (B, N, C) zeros and anchors (B, N, 4) = sigmoid(refpoint_embed)."""
        anchors = self.refpoint_embed.weight.sigmoid()[None].expand(batch_size, -1, -1)
        content = anchors.new_zeros(batch_size, self.num_queries, self.embed_dim)
        return content, anchors

    def decode(
        self,
        enc_ctx: Dict[str, Tensor],
        query: Tensor,
        anchors: Tensor,
        bbox_embed: nn.Module,
        attn_mask: Optional[Tensor] = None,
    ) -> Tuple[Tensor, List[Tensor]]:
        """The decoder on ``enc_ctx`` (from :meth:`encode`); see :meth:`DABDecoder.forward`."""
        return self.decoder(
            query, anchors, enc_ctx["memory"], enc_ctx["memory_pos"], enc_ctx["mask_flatten"], bbox_embed, attn_mask
        )
