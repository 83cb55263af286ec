"""The discriminability analysis of the Co-DETR paper: how strongly the encoder features (and the decoder's
cross-attention) single out the objects.

* **Discriminability score** of an image: for every encoder level l, the L2 norm over channels at every position,
  divided by its maximum over the image (so each level peaks at 1), resized (bilinear) to the finest level and
  averaged over the levels: a map in (0, 1].
* **Attention discriminability**: the same with, in place of the feature norms, the attention mass that the last
  decoder layer's cross-attention puts on every position of every level (its sampling locations splatted with the
  bilinear weights by which they are read, times their attention weights, summed over queries, heads and points).
* **IoF-IoB curve**: foreground = image pixels inside any ground-truth box, background = the rest; for a threshold
  t, IoF(t) = fraction of foreground pixels with score > t and IoB(t) the same for background. Over a dataset the
  pixels of all images are pooled. The curve, IoF against IoB, runs from (0, 0) (t >= max score) to (1, 1)
  (t below every score), monotone; its area is 1 for a score that ranks every foreground pixel above every
  background pixel and 0.5 for one that does not tell them apart.

:class:`DiscriminabilityProbe` reads both maps out of a :class:`~codetr.modeling.CoDETR` model with forward hooks
(the model is not modified); tools/analyze_discriminability.py runs it over a dataset or an image folder.
"""
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from codetr.layers.ms_deform_attn import ms_deform_attn_pytorch

__all__ = [
    "discriminability_score",
    "feature_level_maps",
    "attention_level_maps",
    "foreground_mask",
    "IoFIoBCurve",
    "DiscriminabilityProbe",
]


def discriminability_score(level_maps: Sequence[torch.Tensor], out_size: Optional[Tuple[int, int]] = None) -> torch.Tensor:
    """
    Args:
        level_maps: L non-negative maps (h_l, w_l), finest first (feature norms or attention mass).
        out_size: optional (H, W) to resize the result to (bilinear), e.g. the image size.

    Returns:
        (h_0, w_0) float32 (or ``out_size``): the mean over levels of map_l / max(map_l), each resized to the
        finest level's size. A level whose maximum is 0 contributes zeros.
    """
    if not level_maps:
        raise ValueError("discriminability_score needs at least one level map")
    h0, w0 = level_maps[0].shape[-2:]
    acc = torch.zeros(h0, w0, dtype=torch.float32, device=level_maps[0].device)
    for m in level_maps:
        if m.dim() != 2:
            raise ValueError(f"level maps must be (h, w), got shape {tuple(m.shape)}")
        m = m.float()
        m = m / m.max().clamp_min(torch.finfo(torch.float32).tiny)
        if m.shape != (h0, w0):
            m = F.interpolate(m[None, None], size=(h0, w0), mode="bilinear", align_corners=False)[0, 0]
        acc += m
    score = acc / len(level_maps)
    if out_size is not None and tuple(out_size) != (h0, w0):
        score = F.interpolate(score[None, None], size=tuple(out_size), mode="bilinear", align_corners=False)[0, 0]
    return score


def _split_levels(flat: torch.Tensor, spatial_shapes: torch.Tensor, valid_sizes: Sequence[Tuple[int, int]]):
    """(S, ...) flattened multi-scale tensor -> per level (h_l, w_l, ...) cropped to the valid (h, w)."""
    out, start = [], 0
    for (h, w), (vh, vw) in zip(spatial_shapes.tolist(), valid_sizes):
        out.append(flat[start : start + h * w].view(h, w, *flat.shape[1:])[:vh, :vw])
        start += h * w
    return out


def feature_level_maps(memory: torch.Tensor, spatial_shapes: torch.Tensor, valid_sizes) -> List[torch.Tensor]:
    """
    Args:
        memory: (S, C) encoder output of one image (levels flattened, finest first).
        spatial_shapes: (L, 2) rows (h_l, w_l); valid_sizes: per level (h, w) not covered by padding.

    Returns:
        L maps (h, w): the L2 norm over channels at every valid position.
    """
    return [m.float().norm(dim=-1) for m in _split_levels(memory, spatial_shapes, valid_sizes)]


def attention_level_maps(
    locations: torch.Tensor, weights: torch.Tensor, spatial_shapes: torch.Tensor, valid_sizes
) -> List[torch.Tensor]:
    """
    The attention mass on every position of every level.

    Args:
        locations: (Q, H, L, P, 2) normalised (x, y) sampling locations of one image's queries;
        weights: (Q, H, L, P) their attention weights; spatial_shapes, valid_sizes as :func:`feature_level_maps`.

    Returns:
        L maps (h, w): sum over queries, heads and points of weight x the bilinear coefficient with which the
        location reads that position (the transpose of the sampling, obtained as the gradient of
        sum(weights * sampled values) with respect to the values, so it matches the op exactly).
    """
    Q, H, L, P, _ = locations.shape
    S = int(spatial_shapes.prod(1).sum())
    value = torch.zeros(1, S, H, 1, dtype=torch.float64, device=locations.device, requires_grad=True)
    with torch.enable_grad():
        out = ms_deform_attn_pytorch(value, spatial_shapes, None, locations[None].double(), weights[None].double())
        (grad,) = torch.autograd.grad(out.sum(), value)
    mass = grad[0, :, :, 0].sum(1)  # (S,)
    return [m.float() for m in _split_levels(mass, spatial_shapes, valid_sizes)]


def foreground_mask(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(H, W) bool: pixels whose centre lies inside any of ``boxes`` (n, 4) XYXY absolute."""
    boxes = boxes.reshape(-1, 4).float()
    xs = torch.arange(width, dtype=torch.float32) + 0.5
    ys = torch.arange(height, dtype=torch.float32) + 0.5
    in_x = (xs[None] >= boxes[:, 0:1]) & (xs[None] <= boxes[:, 2:3])  # (n, W)
    in_y = (ys[None] >= boxes[:, 1:2]) & (ys[None] <= boxes[:, 3:4])  # (n, H)
    return (in_y[:, :, None] & in_x[:, None, :]).any(0)


class IoFIoBCurve:
    """
    Accumulates foreground / background pixel counts above each threshold over images (pixels are pooled).

    Args:
        thresholds: increasing thresholds in [0, 1]; default 0, 0.01, ..., 1.
    """

    def __init__(self, thresholds: Optional[torch.Tensor] = None):
        t = torch.linspace(0, 1, 101, dtype=torch.float64) if thresholds is None else torch.as_tensor(thresholds, dtype=torch.float64)
        if t.dim() != 1 or len(t) < 2 or bool((t[1:] <= t[:-1]).any()):
            raise ValueError("thresholds must be a 1-d increasing sequence of at least 2 values")
        self.thresholds = t
        self.fg_above = torch.zeros(len(t), dtype=torch.float64)
        self.bg_above = torch.zeros(len(t), dtype=torch.float64)
        self.num_fg = 0
        self.num_bg = 0

    @staticmethod
    def _count_above(values: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
        v = values.reshape(-1).double().sort().values
        return (len(v) - torch.searchsorted(v, thresholds, right=True)).double()

    def add(self, score: torch.Tensor, fg: torch.Tensor) -> None:
        """score: (H, W) map; fg: (H, W) bool foreground mask of the same image."""
        if score.shape != fg.shape:
            raise ValueError(f"score {tuple(score.shape)} and foreground mask {tuple(fg.shape)} differ in shape")
        fg = fg.bool()
        self.fg_above += self._count_above(score[fg], self.thresholds)
        self.bg_above += self._count_above(score[~fg], self.thresholds)
        self.num_fg += int(fg.sum())
        self.num_bg += int((~fg).sum())

    def curve(self) -> Dict[str, List[float]]:
        """``threshold``, ``iof``, ``iob`` per threshold (nan for an empty class of pixels)."""
        iof = self.fg_above / self.num_fg if self.num_fg else torch.full_like(self.fg_above, float("nan"))
        iob = self.bg_above / self.num_bg if self.num_bg else torch.full_like(self.bg_above, float("nan"))
        return dict(threshold=self.thresholds.tolist(), iof=iof.tolist(), iob=iob.tolist())

    def area(self) -> float:
        """Area under IoF(IoB), the curve closed by (0, 0) and (1, 1) (trapezoids)."""
        c = self.curve()
        # thresholds decreasing: the points move from (0, 0) towards (1, 1), both coordinates non-decreasing
        x = torch.tensor([0.0] + c["iob"][::-1] + [1.0], dtype=torch.float64)
        y = torch.tensor([0.0] + c["iof"][::-1] + [1.0], dtype=torch.float64)
        return float(torch.trapezoid(y, x))


class DiscriminabilityProbe:
    """
    Reads the encoder output and the last decoder layer's cross-attention of a CoDETR model (eval mode,
    one image per forward) with forward hooks, and turns them into per-level maps.

    Usage::

        probe = DiscriminabilityProbe(model)
        with torch.no_grad():
            model([inputs])
        maps = probe.pop()   # {"encoder": [L maps], "attention": [L maps]}, cropped to the image's valid region
        probe.remove()
    """

    def __init__(self, model):
        head = model.query_head
        self._handles = [
            head.transformer.encoder.register_forward_hook(self._on_encoder),
            head.transformer.decoder.layers[-1].attentions[1].register_forward_hook(self._on_cross_attention),
        ]
        self._last: Dict[str, List[torch.Tensor]] = {}

    @staticmethod
    def _valid_sizes(padding_mask: torch.Tensor, spatial_shapes: torch.Tensor):
        """(S,) bool padding mask of one image -> per level (valid h, valid w)."""
        sizes = []
        for m in _split_levels(padding_mask, spatial_shapes, spatial_shapes.tolist()):
            sizes.append((int((~m[:, 0]).sum()), int((~m[0, :]).sum())))
        return sizes

    def _on_encoder(self, module, args, memory):
        _, _, spatial_shapes, _, _, padding_mask = args[:6]
        if memory.shape[0] != 1:
            raise ValueError(f"DiscriminabilityProbe runs one image per forward, got a batch of {memory.shape[0]}")
        self._valid = self._valid_sizes(padding_mask[0], spatial_shapes)
        self._last["encoder"] = feature_level_maps(memory[0], spatial_shapes, self._valid)

    def _on_cross_attention(self, module, args, output):
        query, reference_points, _, spatial_shapes = args[:4]
        locations, weights = module.sampling_locations_and_weights(query, reference_points, spatial_shapes)
        self._last["attention"] = attention_level_maps(locations[0], weights[0], spatial_shapes, self._valid)

    def pop(self) -> Dict[str, List[torch.Tensor]]:
        if set(self._last) != {"encoder", "attention"}:
            raise RuntimeError("run the model (eval mode, one image) before DiscriminabilityProbe.pop()")
        out, self._last = self._last, {}
        return out

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
