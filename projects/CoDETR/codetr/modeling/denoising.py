"""Contrastive denoising (DINO): noised ground-truth queries, their layout and attention mask."""
from typing import Dict, List, Tuple

import torch
from torch import nn
from torchvision.ops import box_convert

__all__ = ["CdnQueryGenerator", "inverse_sigmoid", "build_dn_attn_mask"]


def inverse_sigmoid(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """log(x / (1 - x)) with x clamped to [0, 1] and both terms to >= eps."""
    x = x.clamp(min=0, max=1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


def build_dn_attn_mask(single_pad: int, num_groups: int, num_queries: int, device=None) -> torch.Tensor:
    """
    Self-attention mask for [denoising queries, matching queries] (True = may not attend).

    Denoising group g occupies rows/cols [2g * single_pad, 2(g+1) * single_pad) (positives, then
    negatives). Matching queries cannot see any denoising query; a denoising group cannot see other
    groups; denoising queries see all matching queries.

    Returns:
        (P + num_queries, P + num_queries) bool, P = 2 * single_pad * num_groups.
    """
    pad = 2 * single_pad * num_groups
    size = pad + num_queries
    group = torch.arange(pad, device=device) // max(2 * single_pad, 1)
    mask = torch.zeros(size, size, dtype=torch.bool, device=device)
    mask[pad:, :pad] = True
    mask[:pad, :pad] = group[:, None] != group[None, :]
    return mask


class CdnQueryGenerator(nn.Module):
    """
    Builds DINO's contrastive denoising queries from the ground truth.

    ``num_groups = max(1, num_dn_queries // max_gt)`` (``max_gt``: the largest GT count in the batch).
    Every group holds ``single_pad = max_gt`` positive slots then ``max_gt`` negative slots per
    image; image b fills the first ``n_b`` slots of each half, the rest is padding (zero content,
    reference 0.5, background target). Labels are flipped to a uniformly random class with
    probability ``label_noise_ratio / 2``; box corners move by ``u * (w/2, h/2) * box_noise_scale``
    with u uniform in [0, 1) for positives and [1, 2) for negatives (random sign), clamped to [0, 1].
    """

    def __init__(self, num_classes: int, num_dn_queries: int = 100, label_noise_ratio: float = 0.5, box_noise_scale: float = 1.0):
        super().__init__()
        self.num_classes = num_classes
        self.num_dn_queries = num_dn_queries
        self.label_noise_ratio = label_noise_ratio
        self.box_noise_scale = box_noise_scale

    def forward(
        self, targets: List[Dict[str, torch.Tensor]], label_embedding: nn.Embedding, num_queries: int
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, Dict[str, int]]:
        """
        Args:
            targets: per image ``labels`` (n_b,) int64 and ``boxes`` (n_b, 4) normalised cxcywh.
            label_embedding: class id -> content query.
            num_queries: number of matching queries that follow the denoising queries.

        Returns:
            dn_query: (B, P, C) content queries; dn_ref_unact: (B, P, 4) inverse-sigmoid references;
            attn_mask: (P + num_queries, P + num_queries) bool;
            dn_meta: dict(pad_size=P, num_groups, single_pad) — P is 0 when the batch has no GT.
        """
        device = label_embedding.weight.device
        counts = [len(t["labels"]) for t in targets]
        B = len(targets)
        max_gt = max(counts) if counts else 0
        C = label_embedding.embedding_dim
        if max_gt == 0 or self.num_dn_queries <= 0:
            meta = dict(pad_size=0, num_groups=0, single_pad=0)
            mask = torch.zeros(num_queries, num_queries, dtype=torch.bool, device=device)
            return (
                label_embedding.weight.new_zeros(B, 0, C),
                label_embedding.weight.new_zeros(B, 0, 4),
                mask,
                meta,
            )
        num_groups = max(1, self.num_dn_queries // max_gt)
        single_pad = max_gt
        pad = 2 * single_pad * num_groups

        labels = torch.cat([t["labels"] for t in targets]).to(device)
        boxes = torch.cat([t["boxes"] for t in targets]).to(device).float()
        bidx = torch.cat([torch.full((n,), b, dtype=torch.int64, device=device) for b, n in enumerate(counts)])
        jidx = torch.cat([torch.arange(n, device=device) for n in counts])
        T = len(labels)
        copies = 2 * num_groups
        # copy c (0..2G-1) of every GT: even copies are positives, odd copies negatives
        copy_id = torch.arange(copies, device=device).repeat_interleave(T)
        labels_n = labels.repeat(copies)
        boxes_n = boxes.repeat(copies, 1)
        b_n = bidx.repeat(copies)
        slot = copy_id * single_pad + jidx.repeat(copies)
        negative = copy_id % 2 == 1

        if self.label_noise_ratio > 0:
            flip = torch.rand(labels_n.shape, device=device) < self.label_noise_ratio * 0.5
            labels_n = torch.where(flip, torch.randint_like(labels_n, 0, self.num_classes), labels_n)
        if self.box_noise_scale > 0:
            xyxy = box_convert(boxes_n, "cxcywh", "xyxy")
            half = boxes_n[:, 2:].repeat(1, 2) / 2
            sign = torch.randint(0, 2, boxes_n.shape, device=device).float() * 2 - 1
            part = torch.rand(boxes_n.shape, device=device) + negative[:, None].float()
            xyxy = (xyxy + sign * part * half * self.box_noise_scale).clamp(0.0, 1.0)
            boxes_n = box_convert(xyxy, "xyxy", "cxcywh")

        dn_query = label_embedding.weight.new_zeros(B, pad, C)
        dn_ref = label_embedding.weight.new_zeros(B, pad, 4)
        dn_query = dn_query.index_put((b_n, slot), label_embedding(labels_n))
        dn_ref = dn_ref.index_put((b_n, slot), inverse_sigmoid(boxes_n, eps=1e-3).to(dn_ref.dtype))
        mask = build_dn_attn_mask(single_pad, num_groups, num_queries, device=device)
        return dn_query, dn_ref, mask, dict(pad_size=pad, num_groups=num_groups, single_pad=single_pad)

    @staticmethod
    def dn_targets(targets: List[Dict[str, torch.Tensor]], dn_meta: Dict[str, int], num_classes: int):
        """
        Targets of the denoising queries.

        Returns:
            labels (B, P) int64 (background = num_classes for negatives and padding),
            boxes (B, P, 4) normalised cxcywh, box_weights (B, P) float (1 on positives).
        """
        B = len(targets)
        P, S, G = dn_meta["pad_size"], dn_meta["single_pad"], dn_meta["num_groups"]
        device = targets[0]["labels"].device if B else None
        labels = torch.full((B, P), num_classes, dtype=torch.int64, device=device)
        boxes = torch.zeros(B, P, 4, device=device)
        weights = torch.zeros(B, P, device=device)
        for b, t in enumerate(targets):
            n = len(t["labels"])
            if n == 0 or P == 0:
                continue
            slots = (torch.arange(G, device=device)[:, None] * 2 * S + torch.arange(n, device=device)[None]).flatten()
            labels[b, slots] = t["labels"].repeat(G)
            boxes[b, slots] = t["boxes"].float().repeat(G, 1)
            weights[b, slots] = 1.0
        return labels, boxes, weights
