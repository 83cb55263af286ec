"""DETRQueryHead: what every one-to-one query head shares (per-layer cls/reg branches, the encoder pass, the encoder
maps, per-layer predictions). Subclasses: :class:`codetr.modeling.dino_head.DINOHead`,
:class:`codetr.modeling.deformable_detr_head.DeformableDETRHead`."""
import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .collaborative import memory_to_maps
from .criterion import DETRCriterion
from .denoising import inverse_sigmoid

__all__ = ["DETRQueryHead", "reg_branch", "level_masks"]


def reg_branch(embed_dim: int) -> nn.Sequential:
    """The box MLP C-C-C-4 of a DETR head (``reg_branches.{l}.{0,2,4}`` as officially)."""
    return nn.Sequential(
        nn.Linear(embed_dim, embed_dim), nn.ReLU(), nn.Linear(embed_dim, embed_dim), nn.ReLU(), nn.Linear(embed_dim, 4)
    )


def level_masks(masks: torch.Tensor, features: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    """(B, H, W) image padding mask -> one (B, h_l, w_l) bool mask per level (nearest resize)."""
    m = masks[None].float()
    return [F.interpolate(m, size=f.shape[-2:]).to(torch.bool)[0] for f in features]


class DETRQueryHead(nn.Module):
    """
    Base of the one-to-one query heads: a multi-scale deformable ``transformer`` (with ``encode``, ``decoder``,
    ``embed_dim``), ``num_layers + 1`` classification / box branches (the last one scores the two-stage encoder
    proposals) and a :class:`DETRCriterion`. Implements ``encode`` and ``encoder_maps`` of
    :class:`codetr.modeling.collaborative.CollaborativeQueryHead`; subclasses add ``forward`` and
    ``positive_query_losses``.

    Args:
        transformer: the head's transformer.
        num_classes: number of foreground classes.
        criterion: a :class:`DETRCriterion` with the same ``num_classes``.
        ref_eps: eps of ``inverse_sigmoid`` on the reference boxes (DINO 1e-3, Deformable-DETR 1e-5).
    """

    def __init__(self, transformer: nn.Module, num_classes: int, criterion: DETRCriterion, ref_eps: float):
        super().__init__()
        if num_classes <= 0:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        if criterion.num_classes != num_classes:
            raise ValueError(f"criterion.num_classes={criterion.num_classes} differs from the head's num_classes={num_classes}")
        self.transformer = transformer
        self.criterion = criterion
        self.num_classes = num_classes
        self.ref_eps = ref_eps
        self.embed_dim = C = transformer.embed_dim
        num_pred = len(transformer.decoder.layers) + 1
        self.cls_branches = nn.ModuleList([nn.Linear(C, num_classes) for _ in range(num_pred)])
        self.reg_branches = nn.ModuleList([reg_branch(C) for _ in range(num_pred)])

    @property
    def num_co_heads(self) -> int:
        """Number of positive-query projections in the transformer (0: no collaborative branch)."""
        return len(self.transformer.aux_pos_trans)

    def reset_parameters(self):
        bias = -math.log((1 - 0.01) / 0.01)
        for m in self.cls_branches:
            nn.init.constant_(m.bias, bias)
        for m in self.reg_branches:
            nn.init.constant_(m[-1].weight, 0.0)
            nn.init.constant_(m[-1].bias, 0.0)

    def encode(self, features: Sequence[torch.Tensor], masks: torch.Tensor, image_sizes: Optional[torch.Tensor] = None) -> Dict:
        """Run the encoder on the neck's maps; returns ``enc_ctx`` (docs/design.md) with ``image_sizes``."""
        enc_ctx = self.transformer.encode(features, level_masks(masks, features))
        if image_sizes is None:
            image_sizes = torch.tensor([masks.shape[-2:]] * masks.shape[0], device=masks.device)
        enc_ctx["image_sizes"] = image_sizes
        return enc_ctx

    def encoder_maps(self, enc_ctx: Dict) -> List[torch.Tensor]:
        """The encoder memory cut back into its L maps (B, C, h_l, w_l), finest first."""
        return memory_to_maps(enc_ctx["memory"], enc_ctx["spatial_shapes"])

    def predict_layer(self, layer: int, hidden: torch.Tensor, ref: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Layer ``layer``'s logits (B, N, K) and boxes sigmoid(reg(h) + inverse_sigmoid(ref)) (B, N, 4) cxcywh."""
        logits = self.cls_branches[layer](hidden)
        boxes = (self.reg_branches[layer](hidden) + inverse_sigmoid(ref, eps=self.ref_eps)).sigmoid()
        return logits, boxes

    def predict(self, hidden: torch.Tensor, refs: List[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        """
        Every layer's outputs; ``refs[l]`` is layer l's input reference (layer l-1's undetached refined boxes).

        Returns:
            logits (L, B, N, num_classes), boxes (L, B, N, 4) normalised cxcywh.
        """
        outs = [self.predict_layer(lvl, hidden[lvl], refs[lvl]) for lvl in range(hidden.shape[0])]
        return torch.stack([o[0] for o in outs]), torch.stack([o[1] for o in outs])
