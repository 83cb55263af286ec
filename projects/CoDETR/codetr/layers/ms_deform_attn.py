"""Multi-scale deformable attention (Deformable-DETR), the op and the module.

``ms_deform_attn`` runs the compiled kernels of ``codetr._C`` (C++ on the CPU, CUDA on a GPU);
``ms_deform_attn_pytorch`` is the pure-PyTorch reference with the same contract, used as the
fallback when the extension is unavailable and for export.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ms_deform_attn", "ms_deform_attn_pytorch", "MultiScaleDeformableAttention"]


def ms_deform_attn_pytorch(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    """
    Pure-PyTorch multi-scale deformable attention (bilinear sampling, zero padding,
    ``align_corners=False``).

    Args:
        value: (N, S, H, C), S = sum over levels of h_l * w_l.
        spatial_shapes: (L, 2) int64, rows (h_l, w_l).
        level_start_index: (L,) int64, offset of each level in S (unused here, kept for the contract).
        sampling_locations: (N, Lq, H, L, P, 2), normalised (x, y); outside [0, 1] reads zeros.
        attention_weights: (N, Lq, H, L, P).

    Returns:
        (N, Lq, H * C)
    """
    N, S, H, C = value.shape
    _, Lq, _, L, P, _ = sampling_locations.shape
    sizes = [int(h) * int(w) for h, w in spatial_shapes.tolist()]
    value_list = value.split(sizes, dim=1)
    grids = 2 * sampling_locations - 1
    sampled = []
    for lvl, (h, w) in enumerate(spatial_shapes.tolist()):
        # (N, h*w, H, C) -> (N*H, C, h, w)
        v = value_list[lvl].flatten(2).transpose(1, 2).reshape(N * H, C, int(h), int(w))
        # (N, Lq, H, P, 2) -> (N*H, Lq, P, 2)
        g = grids[:, :, :, lvl].transpose(1, 2).flatten(0, 1)
        sampled.append(F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False))
    # (N*H, C, Lq, L*P)
    sampled = torch.stack(sampled, dim=-2).flatten(-2)
    weights = attention_weights.transpose(1, 2).reshape(N * H, 1, Lq, L * P)
    out = (sampled * weights).sum(-1).view(N, H * C, Lq)
    return out.transpose(1, 2).contiguous()


def ms_deform_attn(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    """Multi-scale deformable attention; same contract as :func:`ms_deform_attn_pytorch`."""
    return ms_deform_attn_pytorch(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)


class MultiScaleDeformableAttention(nn.Module):
    """
    The attention module of Deformable-DETR: each query predicts ``num_points`` sampling offsets
    around its reference point on each of ``num_levels`` feature levels, per head, and a softmax
    over the ``num_levels * num_points`` sampled values.

    Parameter names (sampling_offsets, attention_weights, value_proj, output_proj) follow the
    official implementation so that released checkpoints map one to one. The module returns the
    attention output only; residual and dropout belong to the caller.
    """

    def __init__(self, embed_dim: int = 256, num_heads: int = 8, num_levels: int = 4, num_points: int = 4):
        super().__init__()
        if embed_dim % num_heads != 0:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.num_levels = num_levels
        self.num_points = num_points
        self.sampling_offsets = nn.Linear(embed_dim, num_heads * num_levels * num_points * 2)
        self.attention_weights = nn.Linear(embed_dim, num_heads * num_levels * num_points)
        self.value_proj = nn.Linear(embed_dim, embed_dim)
        self.output_proj = nn.Linear(embed_dim, embed_dim)
        self.reset_parameters()

    def reset_parameters(self):
        nn.init.constant_(self.sampling_offsets.weight, 0.0)
        # Offsets start on a ring of 8 directions (one per head when H = 8), the k-th point k+1 cells out.
        thetas = torch.arange(self.num_heads, dtype=torch.float32) * (2.0 * math.pi / self.num_heads)
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)
        grid = grid / grid.abs().max(-1, keepdim=True)[0]
        grid = grid.view(self.num_heads, 1, 1, 2).repeat(1, self.num_levels, self.num_points, 1)
        grid = grid * torch.arange(1, self.num_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.flatten())
        nn.init.constant_(self.attention_weights.weight, 0.0)
        nn.init.constant_(self.attention_weights.bias, 0.0)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.constant_(self.value_proj.bias, 0.0)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.constant_(self.output_proj.bias, 0.0)

    def forward(self, query, reference_points, value, spatial_shapes, level_start_index, value_padding_mask=None):
        """
        Args:
            query: (N, Lq, C), with its positional embedding already added.
            reference_points: (N, Lq, L, 2) normalised (x, y), or (N, Lq, L, 4) normalised (cx, cy, w, h)
                boxes whose half-size scales the offsets.
            value: (N, S, C).
            spatial_shapes: (L, 2) int64 rows (h, w); level_start_index: (L,) int64.
            value_padding_mask: optional (N, S) bool, True at padded positions (their values are zeroed).

        Returns:
            (N, Lq, C)
        """
        N, Lq, _ = query.shape
        S = value.shape[1]
        H, L, P = self.num_heads, self.num_levels, self.num_points
        value = self.value_proj(value)
        if value_padding_mask is not None:
            value = value.masked_fill(value_padding_mask[..., None], 0.0)
        value = value.view(N, S, H, self.embed_dim // H)
        offsets = self.sampling_offsets(query).view(N, Lq, H, L, P, 2)
        weights = self.attention_weights(query).view(N, Lq, H, L * P).softmax(-1).view(N, Lq, H, L, P)
        if reference_points.shape[-1] == 2:
            normalizer = torch.stack([spatial_shapes[..., 1], spatial_shapes[..., 0]], -1).to(offsets)
            locations = reference_points[:, :, None, :, None, :] + offsets / normalizer[None, None, None, :, None, :]
        elif reference_points.shape[-1] == 4:
            locations = (
                reference_points[:, :, None, :, None, :2]
                + offsets / P * reference_points[:, :, None, :, None, 2:] * 0.5
            )
        else:
            raise ValueError(
                f"reference_points must end in 2 (x, y) or 4 (cx, cy, w, h), got shape {tuple(reference_points.shape)}"
            )
        out = ms_deform_attn(value, spatial_shapes, level_start_index, locations.to(value.dtype), weights.to(value.dtype))
        return self.output_proj(out)
