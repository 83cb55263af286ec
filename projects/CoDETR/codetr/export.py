"""Deployment: the detector as a tensor-in / tensor-out module for ``torch.export`` and ONNX.

:class:`DetectorForExport` wraps a :class:`codetr.modeling.CoDETR` in eval mode: it takes a batch of images
already resized by the config's test resize (no padding: every image of the batch has the tensor's size) and
returns the model's top-k detection candidates (``model.postprocessor.candidates``), with no host sync and no
data-dependent shape, so that ``torch.export.export`` captures it whole (deformable attention as the custom op
``torch.ops.codetr.ms_deform_attn``), also with dynamic batch, height and width. The rest of the model's
post-processing (soft-NMS when the config uses it) is ``model.postprocessor.merge``, run per image on the outputs.

:func:`set_deform_attn_impl` switches every deformable-attention module of a model between the compiled
kernels ("auto") and the ``grid_sample`` formulation ("pytorch", what ONNX export emits as standard ops).

:func:`export_onnx` writes the ONNX model (deformable attention as standard ops, or with ``trt_plugin=True`` as one
TensorRT ``MultiscaleDeformableAttnPlugin_TRT`` node per attention); :func:`onnx_parity` measures ONNX Runtime
against PyTorch eager, rank by rank and rank-free (:func:`match_detections`). ``tools/export_onnx.py`` runs both.
"""
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from codetr.layers import MultiScaleDeformableAttention

__all__ = ["DetectorForExport", "set_deform_attn_impl", "export_onnx", "onnx_parity", "match_detections", "TRT_PLUGIN_OP"]


def set_deform_attn_impl(model: nn.Module, impl: str) -> int:
    """Set ``impl`` ("auto" | "pytorch") on every :class:`MultiScaleDeformableAttention` of ``model``; returns
    how many modules were set."""
    if impl not in MultiScaleDeformableAttention.IMPLS:
        raise ValueError(f"impl must be one of {MultiScaleDeformableAttention.IMPLS}, got {impl!r}")
    n = 0
    for m in model.modules():
        if isinstance(m, MultiScaleDeformableAttention):
            m.impl = impl
            n += 1
    return n


class DetectorForExport(nn.Module):
    """
    ``forward(images) -> (boxes, scores, labels)``: the top-k candidates of :meth:`DETRPostProcessor.candidates`:
    boxes (B, k, 4) XYXY in pixels of the input, scores (B, k) decreasing, labels (B, k) int64;
    k = ``model.postprocessor.max_per_img``, or with soft-NMS its ``num_candidates`` (default: the number of queries).

    Args:
        model: a CoDETR (its one-to-one query head makes the detections; the auxiliary heads are not run).

    ``images``: (B, 3, H, W), uint8 or float, in ``model.input_format`` channel order, already resized;
    H and W must be multiples of ``model.size_divisibility`` (the model pads to them; here nothing is padded,
    so each image counts as its full size, as :class:`CoDETR` does for an unpadded image). A model with
    ``square_pad`` (the LSJ test pipelines) takes images already padded to ``square_pad`` with ``pad_value``.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        if getattr(model, "eval_module", "detr") != "detr":
            raise ValueError(f"DetectorForExport runs the one-to-one query head; model.eval_module is {model.eval_module!r}")
        self.model = model

    def forward(self, images: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        m = self.model
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W), got shape {tuple(images.shape)}")
        d = m.size_divisibility
        if d > 1:
            torch._check(images.shape[2] % d == 0, lambda: f"image height must be a multiple of {d}")
            torch._check(images.shape[3] % d == 0, lambda: f"image width must be a multiple of {d}")
        if getattr(m, "square_pad", 0):
            p = m.square_pad
            torch._check(images.shape[2] == p and images.shape[3] == p,
                         lambda: f"the model pads to {p}x{p} (square_pad): give images padded to it with {m.pad_value}")
        B, _, H, W = images.shape
        x = (images.to(m.pixel_mean.dtype) - m.pixel_mean) / m.pixel_std
        masks = torch.zeros(B, H, W, dtype=torch.bool, device=x.device)
        sizes = torch.stack([torch.scalar_tensor(H), torch.scalar_tensor(W)]).to(x.device).expand(B, 2)
        logits, boxes = m.query_head(m.neck(m.backbone(x)), masks, None, sizes)
        return m.postprocessor.candidates(logits, boxes, sizes)


# ---------------------------------------------------------------------------------------------------------- ONNX
TRT_PLUGIN_OP = "MultiscaleDeformableAttnPlugin_TRT"
TRT_PLUGIN_DOMAIN = "trt"


def _trt_translation_table():
    """``torch.ops.codetr.ms_deform_attn`` -> one ``MultiscaleDeformableAttnPlugin_TRT`` node (TensorRT's plugin:
    inputs value (N, S, M, D), spatial_shapes (L, 2) int32, level_start_index (L,) int32, sampling_locations
    (N, Lq, M, L, P, 2), attention_weights (N, Lq, M, L, P); output (N, Lq, M, D)), then a Reshape to (N, Lq, M*D)."""
    import onnx
    import onnxscript
    from onnx.defs import OpSchema
    from onnxscript import opset18 as op

    if not onnx.defs.has(TRT_PLUGIN_OP, TRT_PLUGIN_DOMAIN):
        P = OpSchema.FormalParameter
        onnx.defs.register_schema(
            OpSchema(
                TRT_PLUGIN_OP, TRT_PLUGIN_DOMAIN, 1,
                doc="TensorRT's multi-scale deformable attention plugin (executed by TensorRT, not by ONNX Runtime)",
                inputs=[P("value", "T"), P("spatial_shapes", "I"), P("level_start_index", "I"),
                        P("sampling_locations", "T"), P("attention_weights", "T")],
                outputs=[P("output", "T")],
                type_constraints=[("T", ["tensor(float)", "tensor(float16)"], ""), ("I", ["tensor(int32)"], "")],
            )
        )
    trt = onnxscript.values.Opset(TRT_PLUGIN_DOMAIN, 1)
    int32 = onnx.TensorProto.INT32

    def ms_deform_attn_trt(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
        out = getattr(trt, TRT_PLUGIN_OP)(
            value, op.Cast(spatial_shapes, to=int32), op.Cast(level_start_index, to=int32), sampling_locations,
            attention_weights,
        )
        return op.Reshape(out, op.Concat(op.Shape(out, start=0, end=2), op.Constant(value_ints=[-1]), axis=0))

    return {torch.ops.codetr.ms_deform_attn.default: ms_deform_attn_trt}


def export_onnx(
    model: nn.Module,
    path: str,
    example: torch.Tensor,
    dynamic: bool = True,
    trt_plugin: bool = False,
    opset: int = 18,
    metadata: Optional[Dict[str, str]] = None,
) -> str:
    """
    Export ``DetectorForExport(model)`` to ONNX at ``path`` (the torch.export-based exporter): input ``images``
    (B, 3, H, W) uint8, outputs ``boxes`` (B, k, 4), ``scores`` (B, k), ``labels`` (B, k).

    Args:
        model: a CoDETR in eval mode (not modified: its attention modules get their ``impl`` back afterwards).
        example: an example ``images`` batch (with ``dynamic``, B >= 2: a batch of 1 would fix the batch size).
        dynamic: batch, H and W dynamic (H, W multiples of ``model.size_divisibility``); else all fixed to ``example``.
        trt_plugin: one ``MultiscaleDeformableAttnPlugin_TRT`` node (domain "trt") per attention, for TensorRT
            (ONNX Runtime cannot run it); default: standard ops (``GridSample``), which ONNX Runtime runs.
        metadata: key -> value strings stored in the model's ``metadata_props``.
    """
    import onnx

    wrapper = DetectorForExport(model).eval()
    attn = [m for m in model.modules() if isinstance(m, MultiScaleDeformableAttention)]
    saved = [m.impl for m in attn]
    set_deform_attn_impl(model, "auto" if trt_plugin else "pytorch")
    dynamic_shapes = None
    if dynamic:
        if example.shape[0] < 2:
            raise ValueError("a dynamic export needs an example batch of at least 2 images (a batch of 1 fixes B = 1)")
        d = max(1, model.size_divisibility)
        h = torch.export.Dim("h", min=1, max=max(example.shape[2] // d * 4, 4096 // d))
        w = torch.export.Dim("w", min=1, max=max(example.shape[3] // d * 4, 4096 // d))
        dynamic_shapes = {"images": {0: torch.export.Dim("batch", min=1, max=64), 2: d * h, 3: d * w}}
    try:
        with torch.no_grad():
            program = torch.onnx.export(
                wrapper, (example,), None, dynamo=True, input_names=["images"], output_names=["boxes", "scores", "labels"],
                dynamic_shapes=dynamic_shapes, opset_version=opset, optimize=not trt_plugin,
                custom_translation_table=_trt_translation_table() if trt_plugin else None,
            )
    finally:
        for m, impl in zip(attn, saved):
            m.impl = impl
    proto = program.model_proto
    for k, v in (metadata or {}).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = str(k), str(v)
    onnx.save(proto, path)
    return path


def match_detections(
    boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor,
    ref_boxes: torch.Tensor, ref_scores: torch.Tensor, ref_labels: torch.Tensor, box_tol: float = 1.0,
) -> Dict[str, torch.Tensor]:
    """
    Rank-free comparison of one image's detections with reference detections (e.g. ONNX Runtime's with eager's):
    each detection is paired with the reference detection of the same label whose box is nearest (the largest
    coordinate difference, in pixels), and the pair counts as a match when each is the other's nearest and they
    are within ``box_tol`` px: the same (query, class) found by both, whatever its rank. Near-tied scores reorder
    the ranks of a top-k, so comparing rank by rank pairs unrelated detections; this does not.

    Args:
        boxes (k, 4), scores (k,), labels (k,): the detections; ref_boxes (k', 4), ref_scores (k',), ref_labels
            (k',): the reference ones. Boxes XYXY.

    Returns:
        ``matched`` (k,) bool; ``ref_index`` (k,) int64, the paired reference detection (-1 when unmatched);
        ``box_diff`` (k,) px and ``score_diff`` (k,) to the nearest same-label reference detection (inf when the
        reference has none of that label); ``ref_matched`` (k',) bool.
    """
    if boxes.dim() != 2 or boxes.shape[-1] != 4 or ref_boxes.dim() != 2 or ref_boxes.shape[-1] != 4:
        raise ValueError(f"boxes must be (k, 4), got {tuple(boxes.shape)} and {tuple(ref_boxes.shape)}")
    if not (scores.shape == labels.shape == boxes.shape[:1] and ref_scores.shape == ref_labels.shape == ref_boxes.shape[:1]):
        raise ValueError("scores and labels must be (k,), one per box")
    boxes, ref_boxes = boxes.double(), ref_boxes.double()
    dist = (boxes[:, None] - ref_boxes[None]).abs().amax(-1)  # (k, k')
    dist = dist.masked_fill(labels[:, None] != ref_labels[None], float("inf"))
    if dist.numel() == 0:
        empty = torch.zeros(len(boxes), dtype=torch.bool)
        inf = torch.full((len(boxes),), float("inf"), dtype=torch.float64)
        return dict(matched=empty, ref_index=torch.full((len(boxes),), -1, dtype=torch.int64), box_diff=inf,
                    score_diff=inf, ref_matched=torch.zeros(len(ref_boxes), dtype=torch.bool))
    box_diff, j = dist.min(1)
    back = dist.argmin(0)  # each reference detection's nearest detection
    matched = (back[j] == torch.arange(len(boxes))) & (box_diff <= box_tol)
    score_diff = (scores.double() - ref_scores.double()[j]).abs().masked_fill(torch.isinf(box_diff), float("inf"))
    ref_matched = torch.zeros(len(ref_boxes), dtype=torch.bool).index_fill_(0, j[matched], True)
    return dict(matched=matched, ref_index=torch.where(matched, j, -1), box_diff=box_diff, score_diff=score_diff,
                ref_matched=ref_matched)


def onnx_parity(
    onnx_path: str, model: nn.Module, images: List[torch.Tensor], box_tol: float = 1.0, score_tol: float = 1e-4,
    outputs: Optional[list] = None,
) -> Dict[str, float]:
    """
    ONNX Runtime (CPU) against PyTorch eager (``DetectorForExport(model)``) on the same ``images`` (each a
    (1, 3, H, W) uint8 batch), the top-k candidates of both compared two ways:

    - rank by rank: ``max_abs_box_px``, ``max_abs_score`` (largest differences of the boxes and scores at the
      same rank) and ``topk_agreement`` (the fraction of ranks whose label is the same and whose box is within
      ``box_tol`` px). Near-tied scores (common with random weights) swap ranks, and then unrelated detections
      are compared.
    - rank-free (:func:`match_detections`: same label, mutually nearest boxes within ``box_tol``):
      ``matched`` (the fraction of ONNX candidates matched to an eager one), ``matched_max_box_px``,
      ``matched_max_score`` (largest differences over the matched pairs), ``matched_score_within_tol`` (the
      fraction of matched pairs whose scores differ by at most ``score_tol``), and ``unmatched_max_score``,
      the best score of a candidate found by one side only (on either side; None when there is none), beside
      ``kth_score``, the lowest eager candidate score: candidates that enter or leave the top-k at its boundary
      score about that.

    ``outputs``: a list to which ``(eager, onnx)`` candidates (each a (boxes, scores, labels) tuple) are appended,
    one pair per image, for further checks without running the model again.
    """
    import onnxruntime as ort

    session = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    wrapper = DetectorForExport(model).eval()
    box_diff, score_diff, agree, total = 0.0, 0.0, 0, 0
    n_matched, m_box, m_score, m_within, unmatched_score, kth = 0, 0.0, 0.0, 0, None, float("inf")
    for img in images:
        with torch.no_grad():
            ref = wrapper(img)
        got = [torch.from_numpy(a) for a in session.run(None, {"images": img.numpy()})]
        if outputs is not None:
            outputs.append((tuple(ref), tuple(got)))
        db = (got[0] - ref[0]).abs()
        box_diff = max(box_diff, float(db.max()))
        score_diff = max(score_diff, float((got[1] - ref[1]).abs().max()))
        same = (got[2] == ref[2]) & (db.amax(-1) <= box_tol)
        agree += int(same.sum())
        total += same.numel()
        for b in range(img.shape[0]):
            m = match_detections(got[0][b], got[1][b], got[2][b], ref[0][b], ref[1][b], ref[2][b], box_tol)
            ok = m["matched"]
            n_matched += int(ok.sum())
            if ok.any():
                m_box = max(m_box, float(m["box_diff"][ok].max()))
                m_score = max(m_score, float(m["score_diff"][ok].max()))
                m_within += int((m["score_diff"][ok] <= score_tol).sum())
            lone = torch.cat([got[1][b][~ok], ref[1][b][~m["ref_matched"]]])
            if lone.numel():
                unmatched_score = max(unmatched_score or 0.0, float(lone.max()))
            kth = min(kth, float(ref[1][b].min()))
    return dict(
        max_abs_box_px=box_diff, max_abs_score=score_diff, topk_agreement=agree / max(total, 1),
        matched=n_matched / max(total, 1), matched_max_box_px=m_box, matched_max_score=m_score,
        matched_score_within_tol=m_within / max(n_matched, 1), score_tol=score_tol,
        unmatched_max_score=unmatched_score, kth_score=kth, images=len(images),
    )
