"""Conversion of official Co-DETR (mmdetection 2.x) checkpoints to this implementation's parameter names.

An official checkpoint is a dict ``{"state_dict": {...}, "meta": {...}}`` (sometimes with ``optimizer``) written by
mmcv's runner, holding the parameters and buffers of the official ``CoDETR`` model: ``backbone.*`` (torchvision
ResNet, Swin or the EVA-02-style ViT), ``neck.*`` (ChannelMapper or SFP), ``query_head.*`` (CoDINOHead and its
transformer), ``rpn_head.*``, ``roi_head.0.*``, ``bbox_head.0.*`` (ATSS), and for Co-DINO-Inst ``mask_head.*``
(SimpleRefineMaskHead) and ``mask_iou_head.*`` (MaskIoUHead); for Co-Deformable-DETR-mask ``roi_head.0.mask_head.*``
(FCNMaskHead -> detectron2's MaskRCNNConvUpsampleHead).

The conversion is a list of renaming rules plus an explicit list of keys that carry no learnable state and are
dropped (each with its reason, and reported): RoPE frequency tables (recomputed), BatchNorm ``num_batches_tracked``
counters (our ResNet uses frozen BN), and the ``ema_*`` shadow copies mmdet's EMA hook keeps (when it saves, the
main weights already hold the EMA values). Every other key must land on a parameter or buffer of the target model
with the same shape, and every parameter/buffer of the target must be provided: anything else raises a
:class:`OfficialCheckpointError` listing the keys, unless the caller opts out (``strict=False``).

Checkpoints are untrusted input: they are read with ``torch.load(weights_only=True)``; only when the caller passes
``allow_pickle=True`` is a file whose metadata needs arbitrary unpickling read with ``weights_only=False``.
"""
import logging
import os
import re
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Mapping, Optional, Tuple

import torch

__all__ = [
    "OfficialCheckpointError",
    "ConversionReport",
    "load_official_checkpoint",
    "is_official_state_dict",
    "convert_official_state_dict",
    "convert_official_checkpoint",
    "official_to_ours_key",
]

logger = logging.getLogger(__name__)


class OfficialCheckpointError(ValueError):
    """A checkpoint that cannot be read or does not map one-to-one onto the target model."""


# ----------------------------------------------------------------------------------------------------------------
# renaming rules: (pattern, replacement or function of the match); the first matching rule of each table applies
# ----------------------------------------------------------------------------------------------------------------
Rule = Tuple[str, object]

# torchvision-style ResNet (mmdet ResNet) -> detectron2 ResNet (stem / res2..res5, conv{k}.norm, shortcut)
_RESNET_RULES: List[Rule] = [
    (r"^backbone\.conv1\.weight$", "backbone.stem.conv1.weight"),
    (r"^backbone\.bn1\.(\w+)$", r"backbone.stem.conv1.norm.\1"),
    (r"^backbone\.layer(\d)\.(\d+)\.conv(\d)\.weight$", lambda m: f"backbone.res{int(m[1]) + 1}.{m[2]}.conv{m[3]}.weight"),
    (r"^backbone\.layer(\d)\.(\d+)\.bn(\d)\.(\w+)$", lambda m: f"backbone.res{int(m[1]) + 1}.{m[2]}.conv{m[3]}.norm.{m[4]}"),
    (r"^backbone\.layer(\d)\.(\d+)\.downsample\.0\.weight$", lambda m: f"backbone.res{int(m[1]) + 1}.{m[2]}.shortcut.weight"),
    (r"^backbone\.layer(\d)\.(\d+)\.downsample\.1\.(\w+)$", lambda m: f"backbone.res{int(m[1]) + 1}.{m[2]}.shortcut.norm.{m[3]}"),
]

# EVA-02 ViT: names are kept, except the SwiGLU MLP (official w1/w2/ffn_ln/w3 -> timm fc1_g/fc1_x/norm/fc2)
_VIT_RULES: List[Rule] = [
    (r"^backbone\.blocks\.(\d+)\.mlp\.w1\.(\w+)$", r"backbone.blocks.\1.mlp.fc1_g.\2"),
    (r"^backbone\.blocks\.(\d+)\.mlp\.w2\.(\w+)$", r"backbone.blocks.\1.mlp.fc1_x.\2"),
    (r"^backbone\.blocks\.(\d+)\.mlp\.ffn_ln\.(\w+)$", r"backbone.blocks.\1.mlp.norm.\2"),
    (r"^backbone\.blocks\.(\d+)\.mlp\.w3\.(\w+)$", r"backbone.blocks.\1.mlp.fc2.\2"),
]

# Swin (official projects/models/swin_transformer.py) and Detectron2's Swin share their names: identity.
# SFP p2..p6 and the one-to-one query head keep their names. The ChannelMapper's mmcv ConvModules ("<name>.conv.weight",
# GN as "<name>.gn.*") are detectron2 Conv2d here ("<name>.weight", "<name>.norm.*").
_NECK_RULES: List[Rule] = [
    (r"^neck\.(convs|extra_convs)\.(\d+)\.conv\.weight$", r"neck.\1.\2.weight"),
    (r"^neck\.(convs|extra_convs)\.(\d+)\.gn\.(weight|bias)$", r"neck.\1.\2.norm.\3"),
]

# One-to-one head: names kept (the positive-query projections live in query_head.transformer, as officially).
_HEAD_RULES: List[Rule] = [
    # the extra stride-2 map of the auxiliary heads (conv + GN) is the first coarser level of our collaborative
    # branch's adapter (MultiScaleAdapter: identity on the encoder levels + this map)
    (r"^query_head\.downsample\.(\d+\.\w+)$", r"collaborative.adapter.downsample.0.\1"),
]


# Co-DINO-Inst mask branch: official mask_head.* / mask_iou_head.* -> our mask_branch.*; mmcv ConvModules
# ("<name>.conv.*" + LN2d as "<name>.norm_layer.*") become detectron2 Conv2d ("<name>.*", "<name>.norm.*")
_MASK_RULES: List[Rule] = [
    (r"^(mask_head|mask_iou_head)\.(.+)\.conv\.(weight|bias)$", r"mask_branch.\1.\2.\3"),
    (r"^(mask_head|mask_iou_head)\.(.+)\.norm_layer\.(weight|bias)$", r"mask_branch.\1.\2.norm.\3"),
    (r"^(mask_head|mask_iou_head)\.(.+)$", r"mask_branch.\1.\2"),
]


def _aux_rules(num_roi_heads: int) -> List[Rule]:
    """Auxiliary heads: official ``roi_head.{i}`` (with the shared ``rpn_head``) and ``bbox_head.{j}`` become our
    ``collaborative.aux_heads.{i}`` (an RCNNBranch: detectron2 RPN + StandardROIHeads) and
    ``collaborative.aux_heads.{num_roi_heads + j}`` (ATSSHead: same names, its towers' ConvModules as detectron2 Conv2d)."""
    return [
        (r"^rpn_head\.rpn_conv\.(\w+)$", r"collaborative.aux_heads.0.rpn.rpn_head.conv.\1"),
        (r"^rpn_head\.rpn_cls\.(\w+)$", r"collaborative.aux_heads.0.rpn.rpn_head.objectness_logits.\1"),
        (r"^rpn_head\.rpn_reg\.(\w+)$", r"collaborative.aux_heads.0.rpn.rpn_head.anchor_deltas.\1"),
        (r"^roi_head\.(\d+)\.bbox_head\.shared_fcs\.(\d+)\.(\w+)$",
         lambda m: f"collaborative.aux_heads.{m[1]}.roi_heads.box_head.fc{int(m[2]) + 1}.{m[3]}"),
        (r"^roi_head\.(\d+)\.bbox_head\.shared_convs\.(\d+)\.conv\.(\w+)$",
         lambda m: f"collaborative.aux_heads.{m[1]}.roi_heads.box_head.conv{int(m[2]) + 1}.{m[3]}"),
        (r"^roi_head\.(\d+)\.bbox_head\.shared_convs\.(\d+)\.gn\.(\w+)$",
         lambda m: f"collaborative.aux_heads.{m[1]}.roi_heads.box_head.conv{int(m[2]) + 1}.norm.{m[3]}"),
        (r"^roi_head\.(\d+)\.bbox_head\.fc_cls\.(\w+)$", r"collaborative.aux_heads.\1.roi_heads.box_predictor.cls_score.\2"),
        (r"^roi_head\.(\d+)\.bbox_head\.fc_reg\.(\w+)$", r"collaborative.aux_heads.\1.roi_heads.box_predictor.bbox_pred.\2"),
        # Mask R-CNN's FCNMaskHead (mmcv ConvModules without norm) -> MaskRCNNConvUpsampleHead
        (r"^roi_head\.(\d+)\.mask_head\.convs\.(\d+)\.conv\.(\w+)$",
         lambda m: f"collaborative.aux_heads.{m[1]}.roi_heads.mask_head.mask_fcn{int(m[2]) + 1}.{m[3]}"),
        (r"^roi_head\.(\d+)\.mask_head\.upsample\.(\w+)$", r"collaborative.aux_heads.\1.roi_heads.mask_head.deconv.\2"),
        (r"^roi_head\.(\d+)\.mask_head\.conv_logits\.(\w+)$",
         r"collaborative.aux_heads.\1.roi_heads.mask_head.predictor.\2"),
        # ATSS towers: mmcv ConvModules ("conv.weight", "gn.*") -> detectron2 Conv2d ("weight", "norm.*")
        (r"^bbox_head\.(\d+)\.(cls_convs|reg_convs)\.(\d+)\.conv\.weight$",
         lambda m: f"collaborative.aux_heads.{num_roi_heads + int(m[1])}.{m[2]}.{m[3]}.weight"),
        (r"^bbox_head\.(\d+)\.(cls_convs|reg_convs)\.(\d+)\.gn\.(weight|bias)$",
         lambda m: f"collaborative.aux_heads.{num_roi_heads + int(m[1])}.{m[2]}.{m[3]}.norm.{m[4]}"),
        (r"^bbox_head\.(\d+)\.(.+)$", lambda m: f"collaborative.aux_heads.{num_roi_heads + int(m[1])}.{m[2]}"),
    ]


def rpn_anchor_permutation(num_ratios: int, num_scales: int) -> torch.Tensor:
    """Index ``perm`` with ``ours[k] = official[perm[k]]`` over the anchors of one location.

    mmdet's AnchorGenerator (scale_major=True) orders a location's anchors ratio-major (``r * S + s``); Detectron2's
    DefaultAnchorGenerator size-major (``s * R + r``)."""
    s = torch.arange(num_scales).repeat_interleave(num_ratios)
    r = torch.arange(num_ratios).repeat(num_scales)
    return r * num_scales + s


def _permute_rpn(value: torch.Tensor, per_anchor: int, num_ratios: int, num_scales: int) -> torch.Tensor:
    A = num_ratios * num_scales
    if value.shape[0] != A * per_anchor:
        raise OfficialCheckpointError(
            f"RPN output has {value.shape[0]} channels, expected {A} anchors x {per_anchor}"
        )
    perm = rpn_anchor_permutation(num_ratios, num_scales)
    v = value.reshape(A, per_anchor, *value.shape[1:])[perm]
    return v.reshape(value.shape).clone()

# keys without learnable state, dropped on purpose (pattern, reason)
_IGNORED: List[Tuple[str, str]] = [
    (r"^backbone\.(rope_win|rope_glb)\.freqs_(cos|sin)$", "RoPE table (recomputed from the input size)"),
    (r"^backbone\.blocks\.\d+\.attn\.rope\.freqs_(cos|sin)$", "RoPE table (recomputed from the input size)"),
    (r"\.num_batches_tracked$", "BatchNorm step counter (frozen BN has none)"),
    (r"^ema_", "mmdet EMA shadow copy (the saved main weights are the EMA ones)"),
]


def _apply(rules: List[Rule], key: str) -> Optional[str]:
    for pattern, repl in rules:
        m = re.match(pattern, key)
        if m:
            return repl(m) if callable(repl) else m.expand(repl)
    return None


def _detect_backbone(keys) -> str:
    keys = list(keys)
    if any(k.startswith("backbone.layer1.") for k in keys):
        return "resnet"
    if any(k.startswith("backbone.blocks.") for k in keys):
        return "vit"
    if any(k.startswith("backbone.layers.") for k in keys):
        return "swin"
    return "unknown"


def official_to_ours_key(key: str, backbone: str, num_roi_heads: int = 1) -> Tuple[Optional[str], Optional[str]]:
    """Map one official key. Returns ``(our_key, None)``, or ``(None, reason)`` for a key dropped on purpose."""
    for pattern, reason in _IGNORED:
        if re.search(pattern, key):
            return None, reason
    rules = {"resnet": _RESNET_RULES, "vit": _VIT_RULES}.get(backbone, [])
    new = _apply(rules, key) if key.startswith("backbone.") else None
    if new is None:
        new = _apply(_NECK_RULES, key)
    if new is None:
        new = _apply(_HEAD_RULES, key)
    if new is None:
        new = _apply(_aux_rules(num_roi_heads), key)
    if new is None:
        new = _apply(_MASK_RULES, key)
    return (new if new is not None else key), None


@dataclass
class ConversionReport:
    backbone: str = "unknown"
    converted: Dict[str, str] = field(default_factory=dict)  # our key -> official key
    renamed: int = 0
    ignored: Dict[str, str] = field(default_factory=dict)  # official key -> reason
    unexpected: List[str] = field(default_factory=list)  # official keys (after renaming) the target lacks
    missing: List[str] = field(default_factory=list)  # target keys no official key provides
    shape_mismatch: List[str] = field(default_factory=list)  # "ours (official shape vs ours)"

    @property
    def ok(self) -> bool:
        return not (self.unexpected or self.missing or self.shape_mismatch)

    def summary(self) -> str:
        lines = [
            f"official checkpoint ({self.backbone} backbone): {len(self.converted)} tensors converted "
            f"({self.renamed} renamed), {len(self.ignored)} dropped on purpose"
        ]
        reasons: Dict[str, int] = {}
        for r in self.ignored.values():
            reasons[r] = reasons.get(r, 0) + 1
        lines += [f"  dropped: {n} x {r}" for r, n in sorted(reasons.items())]
        for title, items in (
            ("official keys with no counterpart in the model", self.unexpected),
            ("model keys missing from the checkpoint", self.missing),
            ("shape mismatches", self.shape_mismatch),
        ):
            if items:
                lines.append(f"  {title} ({len(items)}):")
                lines += [f"    {k}" for k in items]
        return "\n".join(lines)


def is_official_state_dict(obj) -> bool:
    """Whether ``obj`` (a loaded checkpoint or a state dict) looks like an official Co-DETR checkpoint."""
    if not isinstance(obj, Mapping):
        return False
    sd = obj.get("state_dict", obj) if "model" not in obj else None
    if not isinstance(sd, Mapping):
        return False
    keys = [k for k in sd.keys() if isinstance(k, str)]
    return any(k.startswith("query_head.") for k in keys) and any(k.startswith("backbone.") for k in keys)


def load_official_checkpoint(path: str, allow_pickle: bool = False) -> Tuple[Dict[str, torch.Tensor], dict]:
    """Read an official checkpoint file; returns ``(state_dict, meta)``.

    Accepts mmcv checkpoints (``state_dict`` + ``meta``), ``{"model": ...}`` / ``{"module": ...}`` wrappers and bare
    state dicts; strips a ``module.`` (DistributedDataParallel) prefix. Raises :class:`OfficialCheckpointError` on
    a missing, truncated or non-checkpoint file.
    """
    if not os.path.isfile(path):
        raise OfficialCheckpointError(f"checkpoint file {path!r} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        if "weights only" not in str(e).lower():
            raise OfficialCheckpointError(f"checkpoint file {path!r} is corrupt or not a checkpoint: {e}") from e
        # the metadata needs classes outside torch's weights-only allow-list
        if not allow_pickle:
            raise OfficialCheckpointError(
                f"checkpoint file {path!r} cannot be read with torch.load(weights_only=True) ({e}). If you trust its "
                "origin, retry with allow_pickle=True (CLI: --allow-pickle)."
            ) from e
        try:
            obj = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e2:
            raise OfficialCheckpointError(f"checkpoint file {path!r} is corrupt: {e2}") from e2
    return unwrap_official_checkpoint(obj, name=path)


def unwrap_official_checkpoint(obj, name: str = "checkpoint") -> Tuple[Dict[str, torch.Tensor], dict]:
    """``(state_dict, meta)`` of an already loaded official checkpoint object."""
    if not isinstance(obj, Mapping):
        raise OfficialCheckpointError(f"{name}: expected a dict, got {type(obj).__name__}")
    meta = obj.get("meta", {}) if isinstance(obj.get("meta", {}), Mapping) else {}
    for wrapper in ("state_dict", "model", "module"):
        if wrapper in obj and isinstance(obj[wrapper], Mapping):
            sd = obj[wrapper]
            break
    else:
        sd = obj
    bad = [k for k, v in sd.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise OfficialCheckpointError(f"{name}: state dict entries that are not tensors: {bad[:10]}")
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return dict(sd), dict(meta)


def convert_official_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    target: Optional[Mapping[str, torch.Tensor]] = None,
    strict: bool = True,
    rpn_anchor_shape: Tuple[int, int] = (3, 3),
) -> Tuple[Dict[str, torch.Tensor], ConversionReport]:
    """Rename an official state dict to our names.

    Args:
        state_dict: official parameter/buffer tensors.
        target: our model's ``state_dict()`` (or any key -> tensor mapping); when given, keys and shapes are checked.
        strict: raise :class:`OfficialCheckpointError` when (with a target) a key is unexpected or missing or a shape
            differs. With ``strict=False`` unexpected keys are left out of the result and the report lists everything.
        rpn_anchor_shape: (number of aspect ratios, number of scales) of the RPN anchors per location (official
            Co-DINO: 3 ratios x 3 octave scales); the RPN's output channels are reordered to Detectron2's anchor order.
    """
    report = ConversionReport(backbone=_detect_backbone(state_dict.keys()))
    roi_ids = {int(m[1]) for m in (re.match(r"^roi_head\.(\d+)\.", k) for k in state_dict) if m}
    num_roi_heads = max(roi_ids) + 1 if roi_ids else 0
    out: Dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        new, reason = official_to_ours_key(key, report.backbone, num_roi_heads)
        if key.startswith("rpn_head.rpn_cls.") or key.startswith("rpn_head.rpn_reg."):
            value = _permute_rpn(value, 1 if ".rpn_cls." in key else 4, *rpn_anchor_shape)
        if new is None:
            report.ignored[key] = reason
            continue
        if new in out:
            raise OfficialCheckpointError(f"two official keys map to {new!r} ({report.converted[new]!r} and {key!r})")
        if new != key:
            report.renamed += 1
        out[new] = value
        report.converted[new] = key
    if target is not None:
        for k in list(out):
            if k not in target:
                report.unexpected.append(report.converted[k])
                if not strict:
                    del out[k]
            elif tuple(target[k].shape) != tuple(out[k].shape):
                report.shape_mismatch.append(f"{k} (official {tuple(out[k].shape)} vs ours {tuple(target[k].shape)})")
        report.missing = [k for k in target if k not in out and not k.endswith("num_batches_tracked")]
        if strict and not report.ok:
            raise OfficialCheckpointError(
                "the official checkpoint does not map one-to-one onto the model (pass strict=False / "
                "--allow-unmapped to load anyway):\n" + report.summary()
            )
    return out, report


def convert_official_checkpoint(
    path: str, model: Optional[torch.nn.Module] = None, strict: bool = True, allow_pickle: bool = False
) -> Tuple[Dict[str, torch.Tensor], ConversionReport, dict]:
    """Read and convert the official checkpoint ``path``; check it against ``model`` when given.
    Returns ``(our_state_dict, report, meta)``."""
    sd, meta = load_official_checkpoint(path, allow_pickle=allow_pickle)
    target = model.state_dict() if model is not None else None
    out, report = convert_official_state_dict(sd, target, strict=strict)
    logger.info(report.summary())
    return out, report, meta


def maybe_convert_official_file(
    filename: str, model: Optional[torch.nn.Module], strict: bool = True, allow_pickle: bool = False
) -> Optional[dict]:
    """For checkpointers: if ``filename`` (a local file) is an official Co-DETR checkpoint, return it converted in
    Detectron2's checkpoint format (``{"model": state_dict, "matching_heuristics": False, ...}``), checked against
    ``model`` (strict: any unmapped or missing key raises). Return None for any other file (native checkpoints,
    Detectron2 ``.pkl`` files...), which the caller loads as usual. A file that ``torch.load(weights_only=True)``
    refuses is only unpickled fully with ``allow_pickle=True`` (trusted files)."""
    if filename.endswith(".pkl"):
        return None
    try:
        obj = torch.load(filename, map_location="cpu", weights_only=True)
    except Exception:
        if not allow_pickle:
            return None  # not readable as a weights-only torch file: leave it to the regular loader (and its errors)
        try:
            obj = torch.load(filename, map_location="cpu", weights_only=False)
        except Exception:
            return None
    if not is_official_state_dict(obj):
        return None
    sd, meta = unwrap_official_checkpoint(obj, name=filename)
    target = model.state_dict() if model is not None else None
    out, report = convert_official_state_dict(sd, target, strict=strict)
    logger.info(f"Converted official Co-DETR checkpoint {filename}:\n" + report.summary())
    return {"model": out, "matching_heuristics": False, "__author__": "Sense-X/Co-DETR (converted)", "meta": meta}


class OfficialCheckpointMixin:
    """Mix into a Detectron2 ``DetectionCheckpointer`` (before it in the bases) to convert official Co-DETR
    checkpoints on load, from a path or a URL (``train.init_checkpoint``). Set ``official_strict = False`` on the
    instance to load a checkpoint that does not map one-to-one (the report is logged), ``official_allow_pickle =
    True`` to read an official file whose metadata ``torch.load(weights_only=True)`` refuses (trusted files only)."""

    official_strict: bool = True
    official_allow_pickle: bool = False

    def _load_file(self, filename: str):
        converted = maybe_convert_official_file(
            filename, self.model, strict=self.official_strict, allow_pickle=self.official_allow_pickle
        )
        if converted is not None:
            return converted
        return super()._load_file(filename)
