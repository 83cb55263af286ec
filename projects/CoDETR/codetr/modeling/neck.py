"""ChannelMapper neck: maps backbone levels to a common width and adds stride-2 extra levels."""
from typing import Dict, List, Sequence

import torch
from torch import nn

from detectron2.layers import Conv2d

__all__ = ["ChannelMapper", "InputProjection", "conv_gn"]


def conv_gn(in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, num_groups: int = 32,
            activation=None) -> Conv2d:
    """Conv2d (no bias, "same" padding) + GroupNorm (+ optional activation) as one detectron2 ``Conv2d``, mmcv's
    ConvModule(norm_cfg=GN). Parameters ``weight``, ``norm.weight``, ``norm.bias``: the checkpoint converter maps
    the official ConvModule names ``conv.weight``, ``gn.*`` onto them. Used by the ChannelMapper neck and the ATSS
    towers; the caller initialises the weight."""
    return Conv2d(
        in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2, bias=False,
        norm=nn.GroupNorm(num_groups, out_channels), activation=activation,
    )


class ChannelMapper(nn.Module):
    """
    One ``kernel_size`` conv + GN per input level, then ``num_extra`` 3x3 stride-2 conv + GN levels,
    the first applied to the **raw** last backbone level, the others to the previous extra level.

    Args:
        in_features: names of the backbone outputs, finest first (e.g. ["res2", ..., "res5"]).
        in_channels: their channel counts.
        out_channels: width of every output level.
        num_extra: number of extra stride-2 levels.
    """

    def __init__(
        self,
        in_features: Sequence[str],
        in_channels: Sequence[int],
        out_channels: int = 256,
        num_extra: int = 1,
        kernel_size: int = 1,
        num_groups: int = 32,
    ):
        super().__init__()
        if len(in_features) != len(in_channels):
            raise ValueError(
                f"in_features ({len(in_features)}) and in_channels ({len(in_channels)}) must have the same length"
            )
        self.in_features = list(in_features)
        self.out_channels = out_channels
        def xavier_conv_gn(*args):
            m = conv_gn(*args)
            nn.init.xavier_uniform_(m.weight)
            return m

        self.convs = nn.ModuleList([xavier_conv_gn(c, out_channels, kernel_size, 1, num_groups) for c in in_channels])
        self.extra_convs = nn.ModuleList(
            [xavier_conv_gn(in_channels[-1] if i == 0 else out_channels, out_channels, 3, 2, num_groups) for i in range(num_extra)]
        )

    @property
    def num_outs(self) -> int:
        return len(self.convs) + len(self.extra_convs)

    def forward(self, features: Dict[str, torch.Tensor]) -> List[torch.Tensor]:
        """
        Args:
            features: backbone outputs by name, each (B, C_i, H_i, W_i).

        Returns:
            list of ``num_outs`` maps (B, out_channels, h_l, w_l), finest first.
        """
        xs = [features[f] for f in self.in_features]
        outs = [conv(x) for conv, x in zip(self.convs, xs)]
        last = xs[-1]
        for conv in self.extra_convs:
            last = conv(last)
            outs.append(last)
        return outs


class InputProjection(nn.Module):
    """The neck of a single-scale DETR (DETR / DAB-DETR ``input_proj``): one backbone map through a 1x1 conv with
    bias (no norm) to the transformer width.

    Args:
        in_feature: name of the backbone output (DAB-DETR: "res5").
        in_channels: its channel count (ResNet-50 C5: 2048).
        out_channels: the transformer width.
    """

    def __init__(self, in_feature: str, in_channels: int, out_channels: int = 256):
        super().__init__()
        self.in_feature = in_feature
        self.out_channels = out_channels
        self.proj = nn.Conv2d(in_channels, out_channels, kernel_size=1)

    @property
    def num_outs(self) -> int:
        return 1

    def forward(self, features: Dict[str, torch.Tensor]) -> List[torch.Tensor]:
        """features: backbone outputs by name -> [(B, out_channels, h, w)] of ``in_feature``."""
        return [self.proj(features[self.in_feature])]
