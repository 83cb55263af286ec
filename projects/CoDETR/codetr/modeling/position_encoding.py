"""Sine position embeddings: of 2D feature maps (DETR style) and of boxes (for decoder queries)."""
import math

import torch
from torch import nn

__all__ = ["PositionEmbeddingSine", "box_sine_embed"]


def _sine_cos_interleave(x: torch.Tensor) -> torch.Tensor:
    """(..., F) -> (..., F) with sin on even and cos on odd features, interleaved (DETR convention)."""
    return torch.stack((x[..., 0::2].sin(), x[..., 1::2].cos()), dim=-1).flatten(-2)


class PositionEmbeddingSine(nn.Module):
    """
    The 2D sine position embedding of DETR, computed from a padding mask.

    Output channel layout: ``num_feats`` channels for y, then ``num_feats`` for x.
    With ``normalize=True`` the cumulative (valid-pixel) coordinates are divided by the valid
    extent of each image, so padding does not change the embedding of valid pixels.
    """

    def __init__(
        self,
        num_feats: int = 128,
        temperature: float = 20.0,
        normalize: bool = True,
        scale: float = 2 * math.pi,
        offset: float = 0.0,
        eps: float = 1e-6,
    ):
        super().__init__()
        self.num_feats = num_feats
        self.temperature = temperature
        self.normalize = normalize
        self.scale = scale
        self.offset = offset
        self.eps = eps

    def forward(self, mask: torch.Tensor) -> torch.Tensor:
        """
        Args:
            mask: (B, H, W) bool, True on padding.

        Returns:
            (B, 2 * num_feats, H, W) float32.
        """
        not_mask = (~mask).to(torch.float32)
        y_embed = not_mask.cumsum(1)
        x_embed = not_mask.cumsum(2)
        if self.normalize:
            y_embed = (y_embed + self.offset) / (y_embed[:, -1:, :] + self.eps) * self.scale
            x_embed = (x_embed + self.offset) / (x_embed[:, :, -1:] + self.eps) * self.scale
        dim_t = torch.arange(self.num_feats, dtype=torch.float32, device=mask.device)
        dim_t = self.temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / self.num_feats)
        pos_x = _sine_cos_interleave(x_embed[..., None] / dim_t)
        pos_y = _sine_cos_interleave(y_embed[..., None] / dim_t)
        return torch.cat((pos_y, pos_x), dim=-1).permute(0, 3, 1, 2)


def box_sine_embed(
    boxes: torch.Tensor, num_feats: int = 128, temperature: float = 10000.0, order: str = "yxwh"
) -> torch.Tensor:
    """
    Sine embedding of normalised boxes (or points), ``num_feats`` features per coordinate.

    Args:
        boxes: (..., 4) normalised (cx, cy, w, h), or (..., 2) normalised (x, y).
        order: "yxwh" (DINO decoder queries: y, x, w, h) or "xywh" (the input order; Co-DINO's
            positive-query projection).

    Returns:
        (..., num_feats * boxes.shape[-1])
    """
    if boxes.shape[-1] not in (2, 4):
        raise ValueError(f"boxes must end in 2 or 4 coordinates, got shape {tuple(boxes.shape)}")
    scale = 2 * math.pi
    dim_t = torch.arange(num_feats, dtype=torch.float32, device=boxes.device)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_feats)
    embeds = [_sine_cos_interleave(boxes[..., i, None].float() * scale / dim_t) for i in range(boxes.shape[-1])]
    if order == "yxwh":
        embeds[0], embeds[1] = embeds[1], embeds[0]
    elif order != "xywh":
        raise ValueError(f"order must be 'yxwh' or 'xywh', got {order!r}")
    return torch.cat(embeds, dim=-1).to(boxes.dtype)
