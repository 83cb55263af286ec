"""EVA-02-style plain ViT (the ViT-L of Co-DINO) as a Detectron2 backbone.

Architecture facts follow the official Co-DETR backbone (``mmdet/models/backbones/vit.py``):

* patch embedding: a ``patch_size`` x ``patch_size`` conv with stride ``patch_size``;
* absolute position embedding learned at the pre-training size (with a class-token slot), resized bicubically to
  the current token grid at every forward (Detectron2's ``get_abs_pos``);
* pre-norm blocks (LayerNorm eps 1e-6): attention with separate q/k/v projections, a bias on q and v only,
  2D rotary position embedding on q and k; an MLP that is a SwiGLU with a LayerNorm on its hidden features
  ("sub-LN", hidden size ``int(dim * mlp_ratio)``, ratio 8/3);
* most blocks attend inside non-overlapping windows (zero-padded to a multiple of the window); the blocks listed in
  ``global_block_indexes`` attend over the whole token grid;
* a final LayerNorm (eps 1e-5) on the stride-16 map.

RoPE: the EVA-02 "fast" 2D rotary embedding. Head channels are split in two halves (first: rows, second: columns);
inside each half channel pairs ``(2j, 2j+1)`` are rotated by the angle ``t * theta^(-j / n)`` where ``n`` = head_dim/4
is the number of frequencies and ``t`` the token's row (column) position *rescaled to the pre-training grid*:
``t = i / L * pt_seq_len`` for a grid (window or whole map) of length ``L``. Window blocks therefore use positions
inside their window and global blocks positions on the whole map, exactly as the official ``rope_win`` /
``get_rope`` (and ``rope_glb`` in LSJ mode, which equals the dynamic rule at the fixed LSJ input size).
The rotation itself and the frequency table come from timm (``build_rotary_pos_embed``, ``apply_rot_embed``).

Parameter names follow the official checkpoint (``patch_embed.proj``, ``pos_embed``, ``blocks.{i}.attn.q_proj``,
``q_bias``, ``v_bias``, ``out_norm``...), except the MLP, which is timm's ``SwiGLU``
(official ``w1/w2/ffn_ln/w3`` = our ``fc1_g/fc1_x/norm/fc2``); ``codetr.checkpoint.official`` maps them.
"""
from functools import partial
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint as cp
from timm.layers import DropPath, SwiGLU
from timm.layers.pos_embed_sincos import apply_rot_embed, build_rotary_pos_embed

from detectron2.layers import ShapeSpec
from detectron2.modeling.backbone import Backbone
from detectron2.modeling.backbone.utils import PatchEmbed, get_abs_pos, window_partition, window_unpartition

__all__ = [
    "EVA02ViT",
    "RopeAttention",
    "EVABlock",
    "rope_sin_cos",
    "COCO_GLOBAL_BLOCKS",
    "LVIS_GLOBAL_BLOCKS",
]

# Blocks with global attention in the official configs (all other blocks are windowed).
COCO_GLOBAL_BLOCKS = (3, 7, 11, 15, 19, 23)  # co_dino_5scale_vit_large_coco: window 24
LVIS_GLOBAL_BLOCKS = tuple(range(2, 24, 3))  # co_dino_5scale_lsj_vit_large_lvis: window 16, blocks 2, 5, ..., 23


def rope_sin_cos(
    h: int, w: int, head_dim: int, pt_seq_len: int = 16, theta: float = 10000.0, device=None
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The (sin, cos) tables of the EVA-02 2D RoPE for an ``h`` x ``w`` token grid, each (h * w, head_dim), float32,
    tokens in row-major order, in the interleaved layout expected by ``timm``'s ``apply_rot_embed``."""
    if head_dim % 4 != 0:
        raise ValueError(f"2D RoPE needs head_dim divisible by 4, got head_dim={head_dim}")
    return build_rotary_pos_embed(
        feat_shape=[h, w],
        dim=head_dim,
        temperature=theta,
        in_pixels=False,
        ref_feat_shape=[pt_seq_len, pt_seq_len],
        device=device,
        dtype=torch.float32,
    )


class RopeAttention(nn.Module):
    """Multi-head self-attention with bias on q and v only and 2D RoPE on q and k.

    Input/output (B, H, W, C); ``rope`` is the (sin, cos) pair for the H x W grid, each (H * W, head_dim).
    """

    def __init__(self, dim: int, num_heads: int = 16, qkv_bias: bool = True):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"dim={dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=False)
        if qkv_bias:
            self.q_bias = nn.Parameter(torch.zeros(dim))
            self.v_bias = nn.Parameter(torch.zeros(dim))
        else:
            self.q_bias = None
            self.v_bias = None
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, rope: Tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        B, H, W, C = x.shape
        x = x.reshape(B, H * W, C)
        q = F.linear(x, self.q_proj.weight, self.q_bias)
        k = F.linear(x, self.k_proj.weight, None)
        v = F.linear(x, self.v_proj.weight, self.v_bias)
        # (B, heads, N, head_dim)
        q, k, v = (t.reshape(B, H * W, self.num_heads, self.head_dim).transpose(1, 2) for t in (q, k, v))
        sin, cos = rope
        q = apply_rot_embed(q, sin, cos).type_as(v)
        k = apply_rot_embed(k, sin, cos).type_as(v)
        x = F.scaled_dot_product_attention(q, k, v)  # scale head_dim ** -0.5
        x = x.transpose(1, 2).reshape(B, H * W, C)
        return self.proj(x).reshape(B, H, W, C)


class EVABlock(nn.Module):
    """Pre-norm transformer block: (window or global) RoPE attention, then a sub-LN SwiGLU MLP; drop path on both.

    Input/output (B, H, W, C).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4 * 2 / 3,
        qkv_bias: bool = True,
        drop_path: float = 0.0,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
        window_size: int = 0,
    ):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = RopeAttention(dim, num_heads=num_heads, qkv_bias=qkv_bias)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = SwiGLU(in_features=dim, hidden_features=int(dim * mlp_ratio), norm_layer=norm_layer)
        self.window_size = window_size

    def forward(self, x: torch.Tensor, rope: Tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        shortcut = x
        x = self.norm1(x)
        if self.window_size > 0:
            H, W = x.shape[1], x.shape[2]
            x, pad_hw = window_partition(x, self.window_size)
            x = self.attn(x, rope)
            x = window_unpartition(x, self.window_size, pad_hw, (H, W))
        else:
            x = self.attn(x, rope)
        x = shortcut + self.drop_path(x)
        return x + self.drop_path(self.mlp(self.norm2(x)))


class EVA02ViT(Backbone):
    """The EVA-02-style plain ViT of Co-DINO (ViT-L by default), one stride-``patch_size`` output map.

    Defaults are the official COCO ViT-L: dim 1024, depth 24, 16 heads, window 24 with global blocks 3, 7, ..., 23,
    absolute position embedding pre-trained at 512 px (32 x 32 + class token). Input (B, 3, H, W); output
    ``{out_feature: (B, embed_dim, ceil(H / 16), ceil(W / 16))}`` (the patch conv drops a partial last patch, so
    callers pad to a multiple of 16).
    """

    def __init__(
        self,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 1024,
        depth: int = 24,
        num_heads: int = 16,
        mlp_ratio: float = 4 * 2 / 3,
        qkv_bias: bool = True,
        drop_path_rate: float = 0.0,
        norm_eps: float = 1e-6,
        use_abs_pos: bool = True,
        pretrain_img_size: int = 512,
        pretrain_use_cls_token: bool = True,
        window_size: int = 24,
        global_block_indexes: Sequence[int] = COCO_GLOBAL_BLOCKS,
        rope_pt_seq_len: int = 16,
        rope_theta: float = 10000.0,
        use_act_checkpoint: bool = False,
        out_feature: str = "last_feat",
    ):
        """
        Args:
            patch_size: patch (and output stride) size.
            embed_dim, depth, num_heads, mlp_ratio: transformer size; the MLP hidden size is int(dim * mlp_ratio).
            qkv_bias: learn a bias on q and v (never on k).
            drop_path_rate: stochastic depth, linearly increasing from 0 at block 0 to this at the last block.
            norm_eps: eps of the block LayerNorms (the output LayerNorm uses PyTorch's default 1e-5, as official).
            use_abs_pos, pretrain_img_size, pretrain_use_cls_token: the absolute position embedding, stored at the
                pre-training grid (pretrain_img_size // patch_size)^2 (+1 class-token slot, unused) and resized
                bicubically to the input's grid.
            window_size: window of the windowed blocks (0: every block is global).
            global_block_indexes: blocks attending globally; every other block is windowed.
            rope_pt_seq_len: pre-training grid length the RoPE positions are rescaled to (16 for EVA-02).
            rope_theta: RoPE temperature.
            use_act_checkpoint: recompute each block in backward (training only) to save activation memory.
            out_feature: name of the output map.
        """
        super().__init__()
        if embed_dim % num_heads != 0:
            raise ValueError(f"embed_dim={embed_dim} is not divisible by num_heads={num_heads}")
        bad = [i for i in global_block_indexes if not 0 <= int(i) < depth]
        if bad:
            raise ValueError(f"global_block_indexes {bad} are outside [0, depth={depth})")
        if window_size < 0:
            raise ValueError(f"window_size must be >= 0, got {window_size}")
        self.patch_size = patch_size
        self.head_dim = embed_dim // num_heads
        if self.head_dim % 4 != 0:
            raise ValueError(f"2D RoPE needs embed_dim / num_heads divisible by 4, got {self.head_dim}")
        self.rope_pt_seq_len = rope_pt_seq_len
        self.rope_theta = rope_theta
        self.pretrain_use_cls_token = pretrain_use_cls_token
        self.use_act_checkpoint = use_act_checkpoint
        self.global_block_indexes = tuple(int(i) for i in global_block_indexes)

        self.patch_embed = PatchEmbed(
            kernel_size=(patch_size, patch_size), stride=(patch_size, patch_size), in_chans=in_chans,
            embed_dim=embed_dim,
        )
        if use_abs_pos:
            num_patches = (pretrain_img_size // patch_size) ** 2
            num_positions = num_patches + 1 if pretrain_use_cls_token else num_patches
            self.pos_embed = nn.Parameter(torch.zeros(1, num_positions, embed_dim))
        else:
            self.pos_embed = None

        dpr = [x.item() for x in torch.linspace(0, drop_path_rate, depth)]
        norm_layer = partial(nn.LayerNorm, eps=norm_eps)
        self.blocks = nn.ModuleList(
            EVABlock(
                dim=embed_dim,
                num_heads=num_heads,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                drop_path=dpr[i],
                norm_layer=norm_layer,
                window_size=0 if i in self.global_block_indexes else window_size,
            )
            for i in range(depth)
        )
        self.out_norm = nn.LayerNorm(embed_dim)

        self._out_features = [out_feature]
        self._out_feature_channels = {out_feature: embed_dim}
        self._out_feature_strides = {out_feature: patch_size}

        if self.pos_embed is not None:
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m):
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    @property
    def size_divisibility(self) -> int:
        return self.patch_size

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        if x.dim() != 4:
            raise ValueError(f"EVA02ViT expects images of shape (B, C, H, W), got {tuple(x.shape)}")
        x = self.patch_embed(x)  # (B, h, w, C)
        h, w = x.shape[1], x.shape[2]
        if self.pos_embed is not None:
            x = x + get_abs_pos(self.pos_embed, self.pretrain_use_cls_token, (h, w))

        ropes = {}

        def rope_for(block: EVABlock):
            size = (block.window_size, block.window_size) if block.window_size > 0 else (h, w)
            if size not in ropes:
                sin, cos = rope_sin_cos(*size, self.head_dim, self.rope_pt_seq_len, self.rope_theta, x.device)
                ropes[size] = (sin, cos)
            return ropes[size]

        for blk in self.blocks:
            rope = rope_for(blk)
            if self.use_act_checkpoint and self.training and torch.is_grad_enabled():
                x = cp.checkpoint(blk, x, rope, use_reentrant=False)
            else:
                x = blk(x, rope)
        x = self.out_norm(x)
        return {self._out_features[0]: x.permute(0, 3, 1, 2).contiguous()}

    def output_shape(self) -> Dict[str, ShapeSpec]:
        return {
            name: ShapeSpec(channels=self._out_feature_channels[name], stride=self._out_feature_strides[name])
            for name in self._out_features
        }
