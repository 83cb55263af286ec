"""The multi-scale adapter of Co-DETR: the encoder's maps -> the maps the auxiliary heads read.

The auxiliary heads are multi-scale detectors (Faster R-CNN, ATSS, FCOS, RetinaNet), while the encoder of a
single-scale DETR (DAB-DETR) outputs one stride-32 map. The paper's adapter builds a simple feature pyramid from
it; for a multi-scale DETR (Co-DINO, Co-Deformable-DETR) it is the identity on the encoder's levels, plus, as in
the official Co-DETR, coarser levels by stride-2 convolutions. One module covers both: for every output stride

* present among the inputs: that input map, unchanged (the same tensor);
* finer than the finest input (ratio 2^k): k transposed convs (2x2, stride 2), each followed by GroupNorm, with a
  ReLU between two stages (one chain per output level, as ViTDet's simple feature pyramid);
* coarser than the coarsest input (ratio 2^k): a 3x3 stride-2 conv + GroupNorm on the next finer output (the
  extra map of Co-DINO is the first such level).

Single-scale DAB-DETR: ``in_strides=(32,)``, ``out_strides=(8, 16, 32, 64, 128)``. Co-DINO (R50, Swin-L, ViT-L):
``(4, 8, 16, 32, 64)`` -> ``(4, ..., 128)``; Co-Deformable-DETR: ``(8, 16, 32, 64)`` -> ``(8, ..., 128)``: the
identity path (the encoder maps, unchanged: :attr:`MultiScaleAdapter.identity_levels`) + one stride-2 level, whose
conv + GN is the official ``query_head.downsample``.
"""
from typing import List, Sequence

from torch import Tensor, nn

__all__ = ["MultiScaleAdapter"]


def _log2_ratio(big: int, small: int) -> int:
    ratio, rem = divmod(big, small)
    if rem or ratio & (ratio - 1):
        raise ValueError(f"MultiScaleAdapter: stride {big} is not a power-of-two multiple of {small}")
    return ratio.bit_length() - 1


class MultiScaleAdapter(nn.Module):
    """List of encoder maps (B, C, h_l, w_l) at ``in_strides`` -> list of maps at ``out_strides`` (same C)."""

    def __init__(
        self,
        in_strides: Sequence[int],
        out_strides: Sequence[int],
        embed_dim: int = 256,
        num_gn_groups: int = 32,
    ):
        """
        Args:
            in_strides: strides of the input maps, finest first, increasing.
            out_strides: strides of the output maps, finest first, increasing; each one an input stride, or finer
                than the finest input, or coarser than the coarsest, by a power of two.
            embed_dim: channels of every map.
        """
        super().__init__()
        self.in_strides = [int(s) for s in in_strides]
        self.out_strides = [int(s) for s in out_strides]
        for name, strides in (("in_strides", self.in_strides), ("out_strides", self.out_strides)):
            if not strides or any(b <= a for a, b in zip(strides[:-1], strides[1:])):
                raise ValueError(f"MultiScaleAdapter: {name} must be non-empty and increasing, got {strides}")
        lo, hi = self.in_strides[0], self.in_strides[-1]
        self.upsample = nn.ModuleDict()
        self.downsample = nn.ModuleList()
        self._plan = []  # per output: ("in", index) | ("up", key) | ("down", index)
        prev = None
        for s in self.out_strides:
            if s in self.in_strides:
                self._plan.append(("in", self.in_strides.index(s)))
            elif s < lo:
                k = _log2_ratio(lo, s)
                stages: List[nn.Module] = []
                for i in range(k):
                    if i > 0:
                        stages.append(nn.ReLU())
                    stages += [nn.ConvTranspose2d(embed_dim, embed_dim, 2, stride=2), nn.GroupNorm(num_gn_groups, embed_dim)]
                self.upsample[f"s{s}"] = nn.Sequential(*stages)
                self._plan.append(("up", f"s{s}"))
            elif s > hi:
                if prev is None or _log2_ratio(s, prev) != 1:
                    raise ValueError(
                        f"MultiScaleAdapter: output stride {s} needs the output stride {s // 2} before it "
                        f"(out_strides {self.out_strides})"
                    )
                self.downsample.append(
                    nn.Sequential(
                        nn.Conv2d(embed_dim, embed_dim, 3, stride=2, padding=1), nn.GroupNorm(num_gn_groups, embed_dim)
                    )
                )
                self._plan.append(("down", len(self.downsample) - 1))
            else:
                raise ValueError(
                    f"MultiScaleAdapter: output stride {s} lies between the input strides {self.in_strides} "
                    "but is not one of them"
                )
            prev = s

    @property
    def is_identity(self) -> bool:
        """True when every output is an input map (no parameters)."""
        return all(kind == "in" for kind, _ in self._plan)

    @property
    def identity_levels(self) -> List[int]:
        """Indices of the outputs that are input maps, returned unchanged (the same tensors)."""
        return [i for i, (kind, _) in enumerate(self._plan) if kind == "in"]

    def forward(self, features: Sequence[Tensor]) -> List[Tensor]:
        """
        Args:
            features: one (B, C, h_l, w_l) map per ``in_strides`` entry.

        Returns:
            one (B, C, h, w) map per ``out_strides`` entry: inputs as given, upsampled maps of size
            (h_0 * 2^k, w_0 * 2^k), downsampled maps of size ceil(h / 2) of the previous output.
        """
        if len(features) != len(self.in_strides):
            raise ValueError(
                f"MultiScaleAdapter: expected {len(self.in_strides)} maps (strides {self.in_strides}), got {len(features)}"
            )
        outs: List[Tensor] = []
        for kind, key in self._plan:
            if kind == "in":
                outs.append(features[key])
            elif kind == "up":
                outs.append(self.upsample[key](features[0]))
            else:
                outs.append(self.downsample[key](outs[-1]))
        return outs
