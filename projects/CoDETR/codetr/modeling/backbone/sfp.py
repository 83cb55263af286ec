"""The simple feature pyramid (SFP) neck of Co-DINO's ViT: one stride-16 map -> p2..p6 (strides 4..64).

As the official ``mmdet/models/necks/sfp.py`` (module layout kept so parameter names match the official checkpoint):
every conv is bias-free and followed by a channels-first LayerNorm (eps 1e-6), GELU between stages; with input
channels C (1024 for ViT-L) and output channels D (256):

* p2: nearest x2, 3x3 C->C/2, LN, GELU, nearest x2, 3x3 C/2->C/4, LN, GELU, 1x1 C/4->D, LN, GELU, 3x3 D->D, LN
* p3: nearest x2, 3x3 C->C/2, LN, GELU, 1x1 C/2->D, LN, GELU, 3x3 D->D, LN
* p4: 1x1 C->D, LN, GELU, 3x3 D->D, LN
* p5: max-pool 3x3 s2 p1, 1x1 C->D, LN, GELU, 3x3 D->D, LN
* p6: max-pool 3x3 s2 p1, 3x3 s2 C->C, LN, GELU, 1x1 C->D, LN, GELU, 3x3 D->D, LN

Unlike Detectron2's ``SimpleFeaturePyramid`` (transposed convs, p6 by max-pooling p5), SFP upsamples by nearest
interpolation and builds p6 from the stride-16 map by a max-pool then a stride-2 conv.
"""
from typing import Dict, List, Sequence, Union

import torch
import torch.nn as nn
import torch.utils.checkpoint as cp

from detectron2.layers import ShapeSpec
from detectron2.layers.batch_norm import LayerNorm

__all__ = ["SFP"]


def _conv(cin: int, cout: int, k: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=k, stride=stride, padding=k // 2, bias=False)


class SFP(nn.Module):
    """Simple feature pyramid: (B, C, H, W) stride-``in_stride`` map -> list of (B, D, h_l, w_l), strides
    ``in_stride`` x (1/4, 1/2, 1, 2, 4) (p2..p6; p3..p6 when ``use_p2=False``)."""

    def __init__(
        self,
        in_channels: int = 1024,
        out_channels: int = 256,
        use_p2: bool = True,
        in_feature: str = "last_feat",
        in_stride: int = 16,
        use_act_checkpoint: bool = False,
    ):
        """
        Args:
            in_channels: channels C of the backbone map (divisible by 4).
            out_channels: channels D of every output level.
            use_p2: also build the stride in_stride/4 level (Co-DINO ViT: True, 5 levels).
            in_feature: key of the backbone output used when the input is a dict.
            in_stride: stride of the input map.
            use_act_checkpoint: recompute each level's convs in backward (training only).
        """
        super().__init__()
        if in_channels % 4 != 0:
            raise ValueError(f"SFP needs in_channels divisible by 4, got {in_channels}")
        C, D = in_channels, out_channels
        self.in_feature = in_feature
        self.use_p2 = use_p2
        self.use_act_checkpoint = use_act_checkpoint
        up = lambda: nn.Upsample(scale_factor=2, mode="nearest")  # noqa: E731
        if use_p2:
            self.p2 = nn.Sequential(
                up(), _conv(C, C // 2, 3), LayerNorm(C // 2), nn.GELU(),
                up(), _conv(C // 2, C // 4, 3), LayerNorm(C // 4), nn.GELU(),
                _conv(C // 4, D, 1), LayerNorm(D), nn.GELU(),
                _conv(D, D, 3), LayerNorm(D),
            )  # fmt: skip
        self.p3 = nn.Sequential(
            up(), _conv(C, C // 2, 3), LayerNorm(C // 2), nn.GELU(),
            _conv(C // 2, D, 1), LayerNorm(D), nn.GELU(),
            _conv(D, D, 3), LayerNorm(D),
        )  # fmt: skip
        self.p4 = nn.Sequential(_conv(C, D, 1), LayerNorm(D), nn.GELU(), _conv(D, D, 3), LayerNorm(D))
        self.p5 = nn.Sequential(
            nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
            _conv(C, D, 1), LayerNorm(D), nn.GELU(),
            _conv(D, D, 3), LayerNorm(D),
        )  # fmt: skip
        self.p6 = nn.Sequential(
            nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
            _conv(C, C, 3, stride=2), LayerNorm(C), nn.GELU(),
            _conv(C, D, 1), LayerNorm(D), nn.GELU(),
            _conv(D, D, 3), LayerNorm(D),
        )  # fmt: skip
        self._levels = (["p2"] if use_p2 else []) + ["p3", "p4", "p5", "p6"]
        scale = {"p2": 0.25, "p3": 0.5, "p4": 1, "p5": 2, "p6": 4}
        self._strides = [int(in_stride * scale[k]) for k in self._levels]
        self.out_channels = D
        for m in self.modules():  # official init: Xavier-uniform convs
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_uniform_(m.weight)

    @property
    def strides(self) -> List[int]:
        return list(self._strides)

    def output_shape(self) -> Dict[str, ShapeSpec]:
        return {k: ShapeSpec(channels=self.out_channels, stride=s) for k, s in zip(self._levels, self._strides)}

    def forward(self, features: Union[torch.Tensor, Dict[str, torch.Tensor], Sequence[torch.Tensor]]):
        """``features``: the backbone's dict (``in_feature`` is used), a list/tuple whose first map is used, or a
        tensor (B, C, H, W). Returns the list of levels, finest first."""
        if isinstance(features, dict):
            if self.in_feature not in features:
                raise KeyError(f"SFP: backbone output has no feature {self.in_feature!r} (has {list(features)})")
            x = features[self.in_feature]
        elif isinstance(features, (list, tuple)):
            x = features[0]
        else:
            x = features
        outs = []
        for name in self._levels:
            level = getattr(self, name)
            if self.use_act_checkpoint and self.training and torch.is_grad_enabled():
                outs.append(cp.checkpoint(level, x, use_reentrant=False))
            else:
                outs.append(level(x))
        return outs
