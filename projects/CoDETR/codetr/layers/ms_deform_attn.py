"""Multi-scale deformable attention (Deformable-DETR), the op and the module.

``ms_deform_attn`` runs the compiled kernels of ``codetr._C`` (C++ on the CPU, CUDA on a GPU);
``ms_deform_attn_pytorch`` is the pure-PyTorch reference with the same contract, used as the
fallback when the extension is unavailable and for export.
"""
import math
import warnings
import weakref
from typing import List, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "ms_deform_attn",
    "ms_deform_attn_pytorch",
    "level_shapes",
    "check_ms_deform_attn_inputs",
    "MultiScaleDeformableAttention",
]


def level_shapes(spatial_shapes: Union[torch.Tensor, Sequence[Sequence[int]]]) -> List[Tuple[int, int]]:
    """(L, 2) int64 tensor or sequence of (h, w) -> list of (h, w) Python ints (SymInts under torch.export
    with dynamic shapes). Reading a tensor's values is a host copy; pass the list where it is known."""
    if isinstance(spatial_shapes, torch.Tensor):
        return [(int(h), int(w)) for h, w in spatial_shapes.tolist()]
    return [(h, w) for h, w in spatial_shapes]


def ms_deform_attn_pytorch(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    """
    Pure-PyTorch multi-scale deformable attention (bilinear sampling, zero padding,
    ``align_corners=False``).

    Args:
        value: (N, S, H, C), S = sum over levels of h_l * w_l.
        spatial_shapes: (L, 2) int64, rows (h_l, w_l); or the same as a list of L (h_l, w_l) Python ints,
            which keeps the function traceable (torch.export / ONNX: no read of tensor values).
        level_start_index: (L,) int64, offset of each level in S (unused here, kept for the contract).
        sampling_locations: (N, Lq, H, L, P, 2), normalised (x, y); outside [0, 1] reads zeros.
        attention_weights: (N, Lq, H, L, P).

    Returns:
        (N, Lq, H * C)
    """
    N, S, H, C = value.shape
    _, Lq, _, L, P, _ = sampling_locations.shape
    shapes = level_shapes(spatial_shapes)
    value_list = value.split([h * w for h, w in shapes], dim=1)
    grids = 2 * sampling_locations - 1
    sampled = []
    for lvl, (h, w) in enumerate(shapes):
        # (N, h*w, H, C) -> (N*H, C, h, w)
        v = value_list[lvl].flatten(2).transpose(1, 2).reshape(N * H, C, h, w)
        # (N, Lq, H, P, 2) -> (N*H, Lq, P, 2)
        g = grids[:, :, :, lvl].transpose(1, 2).flatten(0, 1)
        sampled.append(F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False))
    # (N*H, C, Lq, L*P)
    sampled = torch.stack(sampled, dim=-2).flatten(-2)
    weights = attention_weights.transpose(1, 2).reshape(N * H, 1, Lq, L * P)
    out = (sampled * weights).sum(-1).view(N, H * C, Lq)
    return out.transpose(1, 2).contiguous()


_FLOAT_TYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_CPU_KERNEL_TYPES = (torch.float32, torch.float64)
_ARG_NAMES = ("value", "spatial_shapes", "level_start_index", "sampling_locations", "attention_weights")

try:
    from codetr import _C
except ImportError as e:  # not built: the pure-PyTorch path is used (with one warning)
    _C = None
    _C_IMPORT_ERROR = e
else:
    _C_IMPORT_ERROR = None

_warned_fallback = False


def _warn_fallback(reason):
    global _warned_fallback
    if not _warned_fallback:
        _warned_fallback = True
        warnings.warn(
            f"codetr: {reason}; multi-scale deformable attention falls back to the (slower) pure-PyTorch path. "
            "Build the extension with `pip install -e . --no-build-isolation` (FORCE_CUDA=1 for the CUDA kernels).",
            RuntimeWarning,
            stacklevel=3,
        )


def _shape(t):
    return tuple(t.shape)


def check_ms_deform_attn_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    """
    Validate the inputs of :func:`ms_deform_attn` (types, ranks, sizes, devices and the consistency of
    ``spatial_shapes`` / ``level_start_index`` with ``value``), raising TypeError/ValueError naming the
    argument. Reads ``spatial_shapes`` and ``level_start_index`` on the host (one small copy, a sync on CUDA),
    except when the same two tensor objects, unchanged, were checked last with the same S.
    """
    args = (value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    for name, t in zip(_ARG_NAMES, args):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"ms_deform_attn: {name} must be a torch.Tensor, got {type(t).__name__}")
    for name in ("spatial_shapes", "level_start_index"):
        t = spatial_shapes if name == "spatial_shapes" else level_start_index
        if t.dtype != torch.int64:
            raise TypeError(f"ms_deform_attn: {name} must be int64 (torch.long), got {t.dtype}")
    for name, t in (("value", value), ("sampling_locations", sampling_locations), ("attention_weights", attention_weights)):
        if t.dtype not in _FLOAT_TYPES:
            raise TypeError(f"ms_deform_attn: {name} must be a floating tensor (float16/bfloat16/float32/float64), got {t.dtype}")
    if sampling_locations.dtype != value.dtype or attention_weights.dtype != value.dtype:
        raise TypeError(
            "ms_deform_attn: value, sampling_locations and attention_weights must have the same dtype, got "
            f"value {value.dtype}, sampling_locations {sampling_locations.dtype}, attention_weights {attention_weights.dtype}"
        )
    for name, t in zip(_ARG_NAMES[1:], args[1:]):
        if t.device != value.device:
            raise ValueError(f"ms_deform_attn: {name} is on {t.device} but value is on {value.device}")
    if value.dim() != 4:
        raise ValueError(f"ms_deform_attn: value must be (N, S, H, C), got shape {_shape(value)}")
    if spatial_shapes.dim() != 2 or spatial_shapes.shape[1] != 2:
        raise ValueError(f"ms_deform_attn: spatial_shapes must be (L, 2), got shape {_shape(spatial_shapes)}")
    if level_start_index.dim() != 1:
        raise ValueError(f"ms_deform_attn: level_start_index must be (L,), got shape {_shape(level_start_index)}")
    if sampling_locations.dim() != 6 or sampling_locations.shape[-1] != 2:
        raise ValueError(
            f"ms_deform_attn: sampling_locations must be (N, Lq, H, L, P, 2), got shape {_shape(sampling_locations)}"
        )
    if attention_weights.dim() != 5:
        raise ValueError(
            f"ms_deform_attn: attention_weights must be (N, Lq, H, L, P), got shape {_shape(attention_weights)}"
        )
    N, S, H, C = value.shape
    L = spatial_shapes.shape[0]
    if L == 0:
        raise ValueError("ms_deform_attn: spatial_shapes has no level (L = 0)")
    if level_start_index.shape[0] != L:
        raise ValueError(
            f"ms_deform_attn: level_start_index has {level_start_index.shape[0]} entries but spatial_shapes has L = {L} levels"
        )
    Nl, Lq, Hl, Ll, P, _ = sampling_locations.shape
    if (Nl, Hl, Ll) != (N, H, L):
        raise ValueError(
            f"ms_deform_attn: sampling_locations shape {_shape(sampling_locations)} does not match (N={N}, Lq, H={H}, L={L}, P, 2) "
            "given by value (N, S, H, C) and spatial_shapes (L, 2)"
        )
    if _shape(attention_weights) != (N, Lq, H, L, P):
        raise ValueError(
            f"ms_deform_attn: attention_weights must have shape (N, Lq, H, L, P) = {(N, Lq, H, L, P)}, got {_shape(attention_weights)}"
        )
    if _tracing():
        return  # shapes are checked above; the values cannot be read without a graph break
    if _index_values_checked(spatial_shapes, level_start_index, S):
        return
    # One host copy for both index tensors (a sync on CUDA; they are tiny).
    host = torch.cat([spatial_shapes.reshape(-1), level_start_index]).cpu().tolist()
    shapes, starts = host[: 2 * L], host[2 * L :]
    sizes = [h * w for h, w in zip(shapes[0::2], shapes[1::2])]
    if any(h < 1 or w < 1 for h, w in zip(shapes[0::2], shapes[1::2])):
        raise ValueError(f"ms_deform_attn: spatial_shapes must hold positive (h, w), got {shapes}")
    if sum(sizes) != S:
        raise ValueError(
            f"ms_deform_attn: sum of h*w over spatial_shapes is {sum(sizes)} but value has S = {S} positions (value.shape[1])"
        )
    expected = [0]
    for size in sizes[:-1]:
        expected.append(expected[-1] + size)
    if starts != expected:
        raise ValueError(
            f"ms_deform_attn: level_start_index {starts} is inconsistent with spatial_shapes (expected {expected})"
        )
    _remember_index_values(spatial_shapes, level_start_index, S)


# The last (spatial_shapes, level_start_index) pair whose values were checked: a model passes the same two
# tensors to every attention layer, so their host copy (a device sync on CUDA) happens once per forward.
# Held by weak reference with the tensors' version counters, so an in-place change is checked again.
_last_checked = None


def _index_key(spatial_shapes, level_start_index, S):
    if spatial_shapes.is_inference() or level_start_index.is_inference():
        return None  # inference tensors have no version counter
    return (spatial_shapes._version, level_start_index._version, S)


def _index_values_checked(spatial_shapes, level_start_index, S):
    last = _last_checked
    if last is None:
        return False
    shapes_ref, starts_ref, key = last
    return (
        shapes_ref() is spatial_shapes
        and starts_ref() is level_start_index
        and key == _index_key(spatial_shapes, level_start_index, S)
    )


def _remember_index_values(spatial_shapes, level_start_index, S):
    global _last_checked
    key = _index_key(spatial_shapes, level_start_index, S)
    _last_checked = None if key is None else (weakref.ref(spatial_shapes), weakref.ref(level_start_index), key)


# ---------------------------------------------------------------------------------------------------------
# The kernels as PyTorch custom ops (torch.library): ``torch.ops.codetr.ms_deform_attn`` and its backward.
# Each has a fake (meta) kernel computing the output shape, and the forward has its autograd formula
# registered, so that torch.compile traces through the op without a graph break (also with fullgraph=True,
# forward and backward), torch.export keeps it as one node, and CUDA graphs can capture it.
# The ops take validated, contiguous inputs of a kernel dtype; ms_deform_attn() below prepares them.


@torch.library.custom_op("codetr::ms_deform_attn", mutates_args=())
def _ms_deform_attn_op(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    return _C.ms_deform_attn_forward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)


@_ms_deform_attn_op.register_fake
def _(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    N, _, H, C = value.shape
    return value.new_empty((N, sampling_locations.shape[1], H * C))


@torch.library.custom_op("codetr::ms_deform_attn_backward", mutates_args=())
def _ms_deform_attn_backward_op(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    grad_output: torch.Tensor,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    grad_value, grad_loc, grad_attn = _C.ms_deform_attn_backward(
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights, grad_output
    )
    return grad_value, grad_loc, grad_attn


@_ms_deform_attn_backward_op.register_fake
def _(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, grad_output):
    return torch.empty_like(value), torch.empty_like(sampling_locations), torch.empty_like(attention_weights)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad_output):
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights = ctx.saved_tensors
    grad_value, grad_loc, grad_attn = _ms_deform_attn_backward_op(
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
        grad_output.to(value.dtype).contiguous(),
    )
    return grad_value, None, None, grad_loc, grad_attn


_ms_deform_attn_op.register_autograd(_backward, setup_context=_setup_context)


def _tracing() -> bool:
    """True under torch.compile / torch.export (where host reads of tensor values would break the graph)."""
    return torch.compiler.is_compiling() or torch.compiler.is_exporting()


def ms_deform_attn(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    """
    Multi-scale deformable attention with the compiled kernels of ``codetr._C`` (C++ on the CPU, CUDA
    on a GPU; chosen by ``value.device``); same contract as :func:`ms_deform_attn_pytorch`, and
    differentiable in value, sampling_locations and attention_weights.

    Inputs are validated first (TypeError/ValueError naming the argument). On the CPU, float16/bfloat16
    inputs are computed in float32 and the result cast back. Falls back to the pure-PyTorch path, with
    one warning, when the extension is not built or was built without CUDA and the input is on a GPU;
    also under ``torch.jit`` tracing/scripting. Under torch.compile and torch.export the kernels run as the
    custom op ``torch.ops.codetr.ms_deform_attn`` (no graph break; the host check of the index values is
    skipped there, the shape checks are not).

    Returns:
        (N, Lq, H * C), the dtype of value.
    """
    check_ms_deform_attn_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    if torch.jit.is_tracing() or torch.jit.is_scripting():
        return ms_deform_attn_pytorch(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    if _C is None:
        _warn_fallback(f"the extension codetr._C is not built ({_C_IMPORT_ERROR})")
        return ms_deform_attn_pytorch(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    if value.device.type == "cuda":
        if not _C.with_cuda():
            _warn_fallback("codetr._C was built without its CUDA kernels")
            return ms_deform_attn_pytorch(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
        compute_dtype = value.dtype
    elif value.device.type == "cpu":
        compute_dtype = value.dtype if value.dtype in _CPU_KERNEL_TYPES else torch.float32
    else:
        _warn_fallback(f"codetr._C has no kernel for device {value.device}")
        return ms_deform_attn_pytorch(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    out = _ms_deform_attn_op(
        value.to(compute_dtype).contiguous(),
        spatial_shapes.contiguous(),
        level_start_index.contiguous(),
        sampling_locations.to(compute_dtype).contiguous(),
        attention_weights.to(compute_dtype).contiguous(),
    )
    return out.to(value.dtype)


class MultiScaleDeformableAttention(nn.Module):
    """
    The attention module of Deformable-DETR: each query predicts ``num_points`` sampling offsets
    around its reference point on each of ``num_levels`` feature levels, per head, and a softmax
    over the ``num_levels * num_points`` sampled values.

    Parameter names (sampling_offsets, attention_weights, value_proj, output_proj) follow the
    official implementation so that released checkpoints map one to one. The module returns the
    attention output only; residual and dropout belong to the caller.

    ``impl`` (attribute, default "auto") chooses the attention computation: "auto" is :func:`ms_deform_attn`
    (compiled kernels as a custom op, with the pure-PyTorch fallback); "pytorch" is
    :func:`ms_deform_attn_pytorch` (``grid_sample``; what ONNX export emits as standard ops).
    """

    IMPLS = ("auto", "pytorch")

    def __init__(self, embed_dim: int = 256, num_heads: int = 8, num_levels: int = 4, num_points: int = 4):
        super().__init__()
        if embed_dim % num_heads != 0:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.num_levels = num_levels
        self.num_points = num_points
        self.impl = "auto"
        self.sampling_offsets = nn.Linear(embed_dim, num_heads * num_levels * num_points * 2)
        self.attention_weights = nn.Linear(embed_dim, num_heads * num_levels * num_points)
        self.value_proj = nn.Linear(embed_dim, embed_dim)
        self.output_proj = nn.Linear(embed_dim, embed_dim)
        self.reset_parameters()

    def reset_parameters(self):
        nn.init.constant_(self.sampling_offsets.weight, 0.0)
        # Offsets start on a ring of 8 directions (one per head when H = 8), the k-th point k+1 cells out.
        thetas = torch.arange(self.num_heads, dtype=torch.float32) * (2.0 * math.pi / self.num_heads)
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)
        grid = grid / grid.abs().max(-1, keepdim=True)[0]
        grid = grid.view(self.num_heads, 1, 1, 2).repeat(1, self.num_levels, self.num_points, 1)
        grid = grid * torch.arange(1, self.num_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.flatten())
        nn.init.constant_(self.attention_weights.weight, 0.0)
        nn.init.constant_(self.attention_weights.bias, 0.0)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.constant_(self.value_proj.bias, 0.0)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.constant_(self.output_proj.bias, 0.0)

    def project_value(self, value, value_padding_mask=None):
        """
        The value projection alone: ``value_proj(value)`` with padded positions zeroed.

        It depends only on ``value`` and this module's weights, so several query sets attending to the same
        value (Co-DETR's extra decoder passes) can share one result: pass it to :meth:`forward` with
        ``value_projected=True``. Gradients then add up in the shared tensor, as they would in the weights.

        Args:
            value: (N, S, C); value_padding_mask: optional (N, S) bool, True at padded positions.

        Returns:
            (N, S, C)
        """
        if value.dim() != 3 or value.shape[-1] != self.embed_dim:
            raise ValueError(f"value must be (N, S, {self.embed_dim}), got {tuple(value.shape)}")
        value = self.value_proj(value)
        if value_padding_mask is not None:
            value = value.masked_fill(value_padding_mask[..., None], 0.0)
        return value

    def forward(
        self, query, reference_points, value, spatial_shapes, level_start_index, value_padding_mask=None, value_projected=False,
        level_shapes=None,
    ):
        """
        Args:
            query: (N, Lq, C), with its positional embedding already added.
            reference_points: (N, Lq, L, 2) normalised (x, y), or (N, Lq, L, 4) normalised (cx, cy, w, h)
                boxes whose half-size scales the offsets.
            value: (N, S, C).
            spatial_shapes: (L, 2) int64 rows (h, w); level_start_index: (L,) int64.
            value_padding_mask: optional (N, S) bool, True at padded positions (their values are zeroed).
            value_projected: ``value`` is already :meth:`project_value`'s output (``value_padding_mask`` is
                then ignored: the padding was zeroed there).
            level_shapes: optional list of the L (h, w) of ``spatial_shapes`` as Python ints; the "pytorch"
                implementation then reads no tensor values (traceable by torch.export / the ONNX exporter).

        Returns:
            (N, Lq, C)
        """
        N, Lq, _ = query.shape
        S = value.shape[1]
        H = self.num_heads
        if value_projected:
            if value.shape != (N, S, self.embed_dim):
                raise ValueError(f"projected value must be (N={N}, S, {self.embed_dim}), got {tuple(value.shape)}")
        else:
            value = self.project_value(value, value_padding_mask)
        value = value.view(N, S, H, self.embed_dim // H)
        locations, weights = self.sampling_locations_and_weights(query, reference_points, spatial_shapes)
        locations, weights = locations.to(value.dtype), weights.to(value.dtype)
        if self.impl == "auto":
            out = ms_deform_attn(value, spatial_shapes, level_start_index, locations, weights)
        elif self.impl == "pytorch":
            shapes = spatial_shapes if level_shapes is None else level_shapes
            out = ms_deform_attn_pytorch(value, shapes, level_start_index, locations, weights)
        else:
            raise ValueError(f"MultiScaleDeformableAttention.impl must be one of {self.IMPLS}, got {self.impl!r}")
        return self.output_proj(out)

    def sampling_locations_and_weights(self, query, reference_points, spatial_shapes):
        """
        Where each query reads and with which weights (what :meth:`forward` feeds the op).

        Args:
            query: (N, Lq, C); reference_points: (N, Lq, L, 2) or (N, Lq, L, 4), as in :meth:`forward`;
            spatial_shapes: (L, 2) int64 rows (h, w).

        Returns:
            locations: (N, Lq, H, L, P, 2) normalised (x, y); weights: (N, Lq, H, L, P), a softmax over L * P.
        """
        N, Lq, _ = query.shape
        H, L, P = self.num_heads, self.num_levels, self.num_points
        offsets = self.sampling_offsets(query).view(N, Lq, H, L, P, 2)
        weights = self.attention_weights(query).view(N, Lq, H, L * P).softmax(-1).view(N, Lq, H, L, P)
        if reference_points.shape[-1] == 2:
            normalizer = torch.stack([spatial_shapes[..., 1], spatial_shapes[..., 0]], -1).to(offsets)
            locations = reference_points[:, :, None, :, None, :] + offsets / normalizer[None, None, None, :, None, :]
        elif reference_points.shape[-1] == 4:
            locations = (
                reference_points[:, :, None, :, None, :2]
                + offsets / P * reference_points[:, :, None, :, None, 2:] * 0.5
            )
        else:
            raise ValueError(
                f"reference_points must end in 2 (x, y) or 4 (cx, cy, w, h), got shape {tuple(reference_points.shape)}"
            )
        return locations, weights
