"""DINOHead: Co-DINO's one-to-one query head (transformer, denoising, losses, inference) and the
extra decoder passes for the customised positive queries of the collaborative branch."""
import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import box_convert

from .denoising import CdnQueryGenerator, inverse_sigmoid
from .losses import (
    aligned_box_iou,
    all_reduce_normalizer,
    quality_focal_loss,
    weighted_giou_loss,
    weighted_l1_loss,
)
from .matcher import HungarianMatcher
from .position_encoding import box_sine_embed
from .soft_nms import batched_soft_nms
from .transformer import DINOTransformer

__all__ = ["DINOHead", "validate_targets"]


def validate_targets(targets: Sequence[Dict[str, torch.Tensor]], num_classes: int) -> None:
    """
    Raise ValueError naming the image when a target has a class id outside [0, num_classes), a
    non-finite box, or a box with zero or negative width/height.

    Args:
        targets: per image ``labels`` (n,), ``boxes`` (n, 4) normalised cxcywh, optional ``name`` (str).
    """
    flags = []
    for t in targets:
        labels, boxes = t["labels"], t["boxes"]
        if boxes.ndim != 2 or boxes.shape[-1] != 4 or labels.ndim != 1 or len(labels) != len(boxes):
            raise ValueError(
                f"image {t.get('name', '?')}: expected labels (n,) and boxes (n, 4), got {tuple(labels.shape)} and {tuple(boxes.shape)}"
            )
        if len(labels) == 0:
            flags.append(labels.new_zeros(3, dtype=torch.bool))
            continue
        flags.append(
            torch.stack(
                [
                    ((labels < 0) | (labels >= num_classes)).any(),
                    (~torch.isfinite(boxes)).any(),
                    (boxes[:, 2:] <= 0).any(),
                ]
            )
        )
    if not flags:
        return
    flags = torch.stack(flags).cpu()
    if not bool(flags.any()):
        return
    for b, (t, f) in enumerate(zip(targets, flags.tolist())):
        name = t.get("name", f"#{b} of the batch")
        if f[0]:
            bad = t["labels"][(t["labels"] < 0) | (t["labels"] >= num_classes)].tolist()
            raise ValueError(f"image {name}: gt class ids {bad} are outside [0, {num_classes}) (num_classes={num_classes})")
        if f[1]:
            raise ValueError(f"image {name}: gt boxes contain NaN or Inf")
        if f[2]:
            raise ValueError(f"image {name}: gt boxes with zero or negative width/height (degenerate boxes)")


def _reg_branch(embed_dim: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(embed_dim, embed_dim), nn.ReLU(inplace=True), nn.Linear(embed_dim, embed_dim), nn.ReLU(inplace=True), nn.Linear(embed_dim, 4)
    )


class DINOHead(nn.Module):
    """
    The one-to-one query head of Co-DINO.

    Training: encoder -> two-stage query selection -> [denoising queries, matching queries] through
    the decoder; losses on the encoder top-K, every decoder layer (Hungarian matching) and every
    denoising group. Inference: top-k over (query x class) sigmoid scores of the last decoder layer,
    optional class-aware soft-NMS.

    Args:
        transformer: a :class:`DINOTransformer`.
        num_classes: number of foreground classes.
        num_dn_queries / label_noise_ratio / box_noise_scale: contrastive denoising settings.
        matcher: a :class:`HungarianMatcher` (default: costs 2 / 5 / 2).
        loss_cls_weight / loss_bbox_weight / loss_giou_weight: 1 / 5 / 2 in Co-DINO.
        cls_loss: "qfl" (quality focal loss, Co-DINO) or "focal" (sigmoid focal loss).
        lambda_1: weight of the positive-query (auxiliary) decoder passes.
        num_co_heads: number of auxiliary heads, i.e. of positive-query projections
            ``transformer.aux_pos_trans[i]`` (Linear 2C->C) + ``transformer.aux_pos_trans_norm[i]``
            (LayerNorm); 0 for DINO (no such parameters).
        max_per_img: detections kept per image; soft_nms: apply class-aware soft-NMS at test time.
    """

    def __init__(
        self,
        *,
        transformer: DINOTransformer,
        num_classes: int,
        num_dn_queries: int = 100,
        label_noise_ratio: float = 0.5,
        box_noise_scale: float = 1.0,
        matcher: Optional[HungarianMatcher] = None,
        loss_cls_weight: float = 1.0,
        loss_bbox_weight: float = 5.0,
        loss_giou_weight: float = 2.0,
        cls_loss: str = "qfl",
        qfl_beta: float = 2.0,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        lambda_1: float = 1.0,
        num_co_heads: int = 0,
        max_per_img: int = 300,
        soft_nms: bool = True,
        soft_nms_iou_threshold: float = 0.8,
        soft_nms_sigma: float = 0.5,
        soft_nms_min_score: float = 1e-3,
        soft_nms_method: str = "linear",
    ):
        super().__init__()
        if cls_loss not in ("qfl", "focal"):
            raise ValueError(f"cls_loss must be 'qfl' or 'focal', got {cls_loss!r}")
        if num_classes <= 0:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        self.transformer = transformer
        self.num_classes = num_classes
        self.embed_dim = C = transformer.embed_dim
        self.num_queries = transformer.num_queries
        num_pred = len(transformer.decoder.layers) + 1
        self.cls_branches = nn.ModuleList([nn.Linear(C, num_classes) for _ in range(num_pred)])
        self.reg_branches = nn.ModuleList([_reg_branch(C) for _ in range(num_pred)])
        self.label_embedding = nn.Embedding(num_classes, C)
        self.dn_generator = CdnQueryGenerator(num_classes, num_dn_queries, label_noise_ratio, box_noise_scale)
        self.matcher = matcher if matcher is not None else HungarianMatcher()
        self.loss_cls_weight = loss_cls_weight
        self.loss_bbox_weight = loss_bbox_weight
        self.loss_giou_weight = loss_giou_weight
        self.cls_loss = cls_loss
        self.qfl_beta = qfl_beta
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        self.lambda_1 = lambda_1
        self.num_co_heads = num_co_heads
        # the projections live in the transformer, as in the official model (transformer.aux_pos_trans.i)
        transformer.add_aux_projections(num_co_heads)
        self.max_per_img = max_per_img
        self.soft_nms = soft_nms
        self.soft_nms_cfg = dict(
            iou_threshold=soft_nms_iou_threshold, sigma=soft_nms_sigma, min_score=soft_nms_min_score, method=soft_nms_method
        )
        self.reset_parameters()

    def reset_parameters(self):
        bias = -math.log((1 - 0.01) / 0.01)
        for m in self.cls_branches:
            nn.init.constant_(m.bias, bias)
        for m in self.reg_branches:
            nn.init.constant_(m[-1].weight, 0.0)
            nn.init.constant_(m[-1].bias, 0.0)

    # ------------------------------------------------------------------ shared pieces
    def level_masks(self, masks: torch.Tensor, features: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        """(B, H, W) image padding mask -> one (B, h_l, w_l) bool mask per level (nearest resize)."""
        m = masks[None].float()
        return [F.interpolate(m, size=f.shape[-2:]).to(torch.bool)[0] for f in features]

    def predict(self, hidden: torch.Tensor, refs: List[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        """
        Per-layer outputs: logits = cls_branch[l](h_l), boxes = sigmoid(reg_branch[l](h_l) + inverse_sigmoid(ref_l)),
        ref_l being layer l-1's undetached refined boxes.

        Returns:
            logits (L, B, N, num_classes), boxes (L, B, N, 4) normalised cxcywh.
        """
        logits, boxes = [], []
        for lvl in range(hidden.shape[0]):
            logits.append(self.cls_branches[lvl](hidden[lvl]))
            boxes.append((self.reg_branches[lvl](hidden[lvl]) + inverse_sigmoid(refs[lvl], eps=1e-3)).sigmoid())
        return torch.stack(logits), torch.stack(boxes)

    def decode(self, enc_ctx, query, reference, attn_mask=None):
        """Run the decoder; reuses ``enc_ctx["memory_values"]`` (the per-layer value projections) when present."""
        return self.transformer.decoder(
            query,
            reference,
            enc_ctx["memory"],
            enc_ctx["spatial_shapes"],
            enc_ctx["level_start_index"],
            enc_ctx["valid_ratios"],
            enc_ctx["mask_flatten"],
            self.reg_branches,
            attn_mask,
            memory_values=enc_ctx.get("memory_values"),
        )

    # ------------------------------------------------------------------ losses
    def loss_from_targets(
        self,
        logits: torch.Tensor,
        boxes: torch.Tensor,
        labels: torch.Tensor,
        label_weights: torch.Tensor,
        target_boxes: torch.Tensor,
        box_weights: torch.Tensor,
        num_pos,
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """
        Weighted classification, L1 and GIoU losses of one layer, each divided by the all-reduced
        number of positives (>= 1).

        Args:
            logits: (B, N, K); boxes: (B, N, 4) cxcywh; labels: (B, N) (K = background);
            label_weights: (B, N); target_boxes: (B, N, 4) cxcywh; box_weights: (B, N);
            num_pos: number of positive queries in the batch on this process (int or tensor).
        """
        K = logits.shape[-1]
        logits = logits.reshape(-1, K)
        boxes = boxes.reshape(-1, 4).float()
        labels = labels.reshape(-1)
        label_weights = label_weights.reshape(-1).float()
        target_boxes = target_boxes.reshape(-1, 4).float()
        box_weights = box_weights.reshape(-1).float()
        norm = all_reduce_normalizer(num_pos, device=logits.device)
        with torch.autocast(device_type=logits.device.type, enabled=False):
            if self.cls_loss == "qfl":
                pos = labels < K
                quality = torch.zeros_like(label_weights)
                if bool(pos.any()):
                    q = aligned_box_iou(
                        box_convert(boxes[pos].detach(), "cxcywh", "xyxy"), box_convert(target_boxes[pos], "cxcywh", "xyxy")
                    )
                    quality = quality.masked_scatter(pos, q)
                cls = quality_focal_loss(logits, labels, quality, self.qfl_beta)
            else:
                onehot = F.one_hot(labels, K + 1)[:, :K].to(torch.float32)
                cls = F.binary_cross_entropy_with_logits(logits.float(), onehot, reduction="none")
                p = logits.float().sigmoid()
                p_t = p * onehot + (1 - p) * (1 - onehot)
                a_t = self.focal_alpha * onehot + (1 - self.focal_alpha) * (1 - onehot)
                cls = (a_t * cls * (1 - p_t).pow(self.focal_gamma)).sum(-1)
            loss_cls = (cls * label_weights).sum() / norm
            loss_bbox = weighted_l1_loss(boxes, target_boxes, box_weights) / norm
            loss_giou = weighted_giou_loss(boxes, target_boxes, box_weights) / norm
        return loss_cls * self.loss_cls_weight, loss_bbox * self.loss_bbox_weight, loss_giou * self.loss_giou_weight

    def matched_targets(self, logits, boxes, targets):
        """Hungarian-match one layer; returns dense (labels, label_weights, target_boxes, box_weights, num_pos)."""
        B, N = logits.shape[:2]
        device = logits.device
        indices = self.matcher(logits.detach(), boxes.detach(), targets)
        labels = torch.full((B, N), self.num_classes, dtype=torch.int64, device=device)
        tboxes = torch.zeros(B, N, 4, device=device)
        bweights = torch.zeros(B, N, device=device)
        bidx = torch.cat([torch.full_like(q, b) for b, (q, _) in enumerate(indices)]).to(device)
        qidx = torch.cat([q for q, _ in indices]).to(device)
        gl = torch.cat([t["labels"][g.to(device)] for t, (_, g) in zip(targets, indices)])
        gb = torch.cat([t["boxes"][g.to(device)].float() for t, (_, g) in zip(targets, indices)])
        labels[bidx, qidx] = gl
        tboxes[bidx, qidx] = gb
        bweights[bidx, qidx] = 1.0
        return labels, torch.ones(B, N, device=device), tboxes, bweights, int(qidx.numel())

    def match_loss(self, logits, boxes, targets):
        return self.loss_from_targets(logits, boxes, *self.matched_targets(logits, boxes, targets))

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        features: Sequence[torch.Tensor],
        masks: torch.Tensor,
        targets: Optional[List[Dict[str, torch.Tensor]]] = None,
        image_sizes: Optional[torch.Tensor] = None,
    ):
        """
        Args:
            features: L maps (B, C, h_l, w_l), finest first.
            masks: (B, H, W) bool image padding mask (True on padding).
            targets: training only: per image ``labels`` (n,) int64, ``boxes`` (n, 4) cxcywh normalised
                by ``image_sizes``, optional ``name``.
            image_sizes: (B, 2) (h, w) used for normalisation; stored in ``enc_ctx``.

        Returns:
            training: (losses dict, enc_ctx dict). enc_ctx: ``memory`` (B, S, C), ``spatial_shapes`` (L, 2),
            ``level_start_index`` (L,), ``valid_ratios`` (B, L, 2), ``mask_flatten`` (B, S),
            ``image_sizes`` (B, 2) (h, w); with ``num_co_heads > 0`` also ``memory_values`` (the decoder's
            per-layer value projections of ``memory``, reused by :meth:`forward_aux`).
            eval: (logits (B, K, num_classes), boxes (B, K, 4) normalised cxcywh) of the last layer.
        """
        enc_ctx = self.transformer.encode(features, self.level_masks(masks, features))
        if image_sizes is None:
            image_sizes = torch.tensor([masks.shape[-2:]] * masks.shape[0], device=masks.device)
        enc_ctx["image_sizes"] = image_sizes
        query, reference, enc_logits, enc_boxes = self.transformer.select_queries(enc_ctx, self.cls_branches[-1], self.reg_branches[-1])
        if not self.training:
            hidden, refs = self.decode(enc_ctx, query, reference)
            last = hidden.shape[0] - 1
            logits = self.cls_branches[last](hidden[last])
            boxes = (self.reg_branches[last](hidden[last]) + inverse_sigmoid(refs[last], eps=1e-3)).sigmoid()
            return logits, boxes
        if targets is None:
            raise ValueError("DINOHead needs targets in training mode")
        validate_targets(targets, self.num_classes)
        if self.num_co_heads > 0:
            # the positive-query passes (forward_aux) read the same memory: project it once per layer for all
            enc_ctx["memory_values"] = self.transformer.decoder.project_memory(enc_ctx["memory"], enc_ctx["mask_flatten"])
        K = query.shape[1]
        dn_query, dn_ref, attn_mask, dn_meta = self.dn_generator(targets, self.label_embedding, K)
        P = dn_meta["pad_size"]
        query = torch.cat([dn_query.to(query.dtype), query], 1)
        reference = torch.cat([dn_ref.sigmoid().to(reference.dtype), reference], 1)
        hidden, refs = self.decode(enc_ctx, query, reference, attn_mask if P > 0 else None)
        logits, boxes = self.predict(hidden, refs)
        if P == 0:
            # keep the label embedding in the graph (DDP with find_unused_parameters=False)
            logits = logits + self.label_embedding.weight[0, 0] * 0.0

        losses = {}
        names = ("loss_cls", "loss_bbox", "loss_iou")
        for n, v in zip(names, self.match_loss(enc_logits, enc_boxes, targets)):
            losses["enc_" + n] = v
        num_layers = logits.shape[0]
        # with P == 0 the denoising losses are zeros that still take part in the normaliser's all-reduce,
        # so that every process runs the same collectives whatever its ground truth
        dn_labels, dn_boxes, dn_w = self.dn_generator.dn_targets(targets, dn_meta, self.num_classes)
        dn_targets = (dn_labels, torch.ones_like(dn_w), dn_boxes, dn_w, sum(len(t["labels"]) for t in targets) * dn_meta["num_groups"])
        for lvl in range(num_layers):
            prefix = "" if lvl == num_layers - 1 else f"d{lvl}."
            vals = self.match_loss(logits[lvl, :, P:], boxes[lvl, :, P:], targets)
            for n, v in zip(names, vals):
                losses[prefix + n] = v
            vals = self.loss_from_targets(logits[lvl, :, :P], boxes[lvl, :, :P], *dn_targets)
            for n, v in zip(names, vals):
                losses[prefix + "dn_" + n] = v
        return losses, enc_ctx

    # ------------------------------------------------------------------ positive queries (collaborative branch)
    @property
    def aux_pos_trans(self) -> nn.ModuleList:
        """The positive-query projections (registered as ``transformer.aux_pos_trans``)."""
        return self.transformer.aux_pos_trans

    @property
    def aux_pos_trans_norm(self) -> nn.ModuleList:
        """Their LayerNorms (registered as ``transformer.aux_pos_trans_norm``)."""
        return self.transformer.aux_pos_trans_norm

    def aux_query_content(self, ref_boxes: torch.Tensor, head_idx: int) -> torch.Tensor:
        """
        Co-DINO's content queries for positive queries of auxiliary head ``head_idx``:
        LayerNorm_i(Linear_i(sine embedding (x, y, w, h order) of the boxes clamped to [0, 1])).

        Args:
            ref_boxes: (B, N, 4) normalised cxcywh.

        Returns:
            (B, N, C)
        """
        if not 0 <= head_idx < self.num_co_heads:
            raise ValueError(f"head_idx {head_idx} out of range for num_co_heads={self.num_co_heads}")
        emb = box_sine_embed(ref_boxes.clamp(0.0, 1.0), self.embed_dim // 2, 10000.0, "xywh")
        t = self.transformer
        return t.aux_pos_trans_norm[head_idx](t.aux_pos_trans[head_idx](emb))

    def forward_aux(
        self,
        enc_ctx: Dict[str, torch.Tensor],
        query_content: torch.Tensor,
        ref_boxes: torch.Tensor,
        targets: Dict[str, torch.Tensor],
        head_idx: int,
    ) -> Dict[str, torch.Tensor]:
        """
        One extra decoder pass for the positive queries of auxiliary head ``head_idx``: no denoising,
        no attention mask, no Hungarian matching; losses at every decoder layer against the given
        per-query targets, scaled by ``lambda_1``.

        Args:
            enc_ctx: from :meth:`forward`.
            query_content: (B, N, C); ref_boxes: (B, N, 4) normalised cxcywh.
            targets: ``labels`` (B, N) int64 (num_classes = background), ``label_weights`` (B, N),
                ``boxes`` (B, N, 4) normalised cxcywh, ``box_weights`` (B, N).

        Returns:
            ``loss_cls_aux{i}``, ``loss_bbox_aux{i}``, ``loss_iou_aux{i}`` (last layer) and
            ``d{k}.``-prefixed keys for the earlier layers.
        """
        hidden, refs = self.decode(enc_ctx, query_content, ref_boxes)
        logits, boxes = self.predict(hidden, refs)
        labels = targets["labels"]
        num_pos = (labels < self.num_classes).sum()
        losses = {}
        L = logits.shape[0]
        for lvl in range(L):
            prefix = "" if lvl == L - 1 else f"d{lvl}."
            vals = self.loss_from_targets(
                logits[lvl], boxes[lvl], labels, targets["label_weights"], targets["boxes"], targets["box_weights"], num_pos
            )
            for n, v in zip(("loss_cls", "loss_bbox", "loss_iou"), vals):
                losses[f"{prefix}{n}_aux{head_idx}"] = v * self.lambda_1
        return losses

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def inference(self, logits: torch.Tensor, boxes: torch.Tensor, image_sizes: torch.Tensor) -> List[Dict[str, torch.Tensor]]:
        """
        Args:
            logits: (B, N, K); boxes: (B, N, 4) normalised cxcywh; image_sizes: (B, 2) (h, w) of the normalisation.

        Returns:
            per image ``boxes`` (M, 4) XYXY in pixels of the normalisation size, ``scores`` (M,), ``labels`` (M,).
        """
        B, N, K = logits.shape
        out = []
        for b in range(B):
            prob = logits[b].float().sigmoid().flatten()
            k = min(self.max_per_img, prob.numel())
            scores, idx = prob.topk(k)
            labels = idx % K
            qidx = torch.div(idx, K, rounding_mode="floor")
            h, w = image_sizes[b].tolist()
            scale = torch.tensor([w, h, w, h], dtype=torch.float32, device=logits.device)
            xyxy = box_convert(boxes[b, qidx].float(), "cxcywh", "xyxy") * scale
            xyxy[:, 0::2] = xyxy[:, 0::2].clamp(0, w)
            xyxy[:, 1::2] = xyxy[:, 1::2].clamp(0, h)
            if self.soft_nms:
                keep, scores = batched_soft_nms(xyxy, scores, labels, **self.soft_nms_cfg)
                keep, scores = keep[: self.max_per_img], scores[: self.max_per_img]
                xyxy, labels = xyxy[keep], labels[keep]
            out.append(dict(boxes=xyxy, scores=scores, labels=labels))
        return out
