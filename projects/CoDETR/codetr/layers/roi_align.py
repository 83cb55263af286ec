"""RoIAlign with the multi-threaded CPU kernels of ``codetr._C``.

:func:`roi_align` has the contract of ``torchvision.ops.roi_align`` (rois as a (K, 5) tensor) and computes the
same values: on the CPU, in float32 and float64, it runs ``codetr._C``'s kernels (parallel over RoIs in the
forward, over channels in the backward, bilinear weights computed once per RoI; deterministic for any number of
threads); everywhere else (CUDA, other dtypes, extension not built, tracing) it calls torchvision.
:class:`ROIAlign` is a drop-in replacement of ``detectron2.layers.ROIAlign``.
"""
import torch
from torch import nn
from torch.autograd.function import once_differentiable
from torch.nn.modules.utils import _pair
from torchvision.ops import roi_align as _tv_roi_align

__all__ = ["roi_align", "ROIAlign"]

try:
    from codetr import _C
except ImportError:  # not built: torchvision is used
    _C = None

_KERNEL_DTYPES = (torch.float32, torch.float64)


def _has_cpu_kernels():
    return _C is not None and hasattr(_C, "roi_align_forward") and hasattr(_C, "roi_align_backward")


def _check_inputs(input, rois, output_size):
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"roi_align: input must be a torch.Tensor, got {type(input).__name__}")
    if not isinstance(rois, torch.Tensor):
        raise TypeError(f"roi_align: rois must be a torch.Tensor of shape (K, 5), got {type(rois).__name__}")
    if input.dim() != 4:
        raise ValueError(f"roi_align: input must be (N, C, H, W), got shape {tuple(input.shape)}")
    if rois.dim() != 2 or rois.shape[1] != 5:
        raise ValueError(
            f"roi_align: rois must be (K, 5) with rows (batch_index, x1, y1, x2, y2), got shape {tuple(rois.shape)}"
        )
    if not input.is_floating_point():
        raise TypeError(f"roi_align: input must be a floating tensor, got {input.dtype}")
    if rois.dtype != input.dtype:
        raise TypeError(f"roi_align: rois must have the dtype of input ({input.dtype}), got {rois.dtype}")
    if rois.device != input.device:
        raise ValueError(f"roi_align: rois is on {rois.device} but input is on {input.device}")
    if len(output_size) != 2 or any(int(s) != s or s < 1 for s in output_size):
        raise ValueError(f"roi_align: output_size must be a positive int or a pair of them, got {output_size}")


class _ROIAlignFunction(torch.autograd.Function):
    """Autograd wrapper of the CPU kernels (input and rois contiguous, validated, float32/float64)."""

    @staticmethod
    def forward(ctx, input, rois, output_size, spatial_scale, sampling_ratio, aligned):
        ctx.save_for_backward(rois)
        ctx.params = (output_size, spatial_scale, sampling_ratio, aligned)
        ctx.input_shape = input.shape
        return _C.roi_align_forward(
            input, rois, spatial_scale, output_size[0], output_size[1], sampling_ratio, aligned
        )

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        (rois,) = ctx.saved_tensors
        output_size, spatial_scale, sampling_ratio, aligned = ctx.params
        N, C, H, W = ctx.input_shape
        grad_input = _C.roi_align_backward(
            grad_output.to(rois.dtype).contiguous(), rois, spatial_scale, output_size[0], output_size[1],
            N, C, H, W, sampling_ratio, aligned,
        )
        return grad_input, None, None, None, None, None


def roi_align(input, rois, output_size, spatial_scale=1.0, sampling_ratio=-1, aligned=False):
    """
    RoIAlign (Mask R-CNN), with the arguments and results of ``torchvision.ops.roi_align``.

    Args:
        input: (N, C, H, W) feature map.
        rois: (K, 5) rows (batch_index, x1, y1, x2, y2) in input-image coordinates, same dtype and device as input.
        output_size: int or (PH, PW).
        spatial_scale: multiplies the box coordinates (1 / stride of the map).
        sampling_ratio: bilinear samples per bin side; <= 0: adaptive, ceil(roi_size / output_size).
        aligned: shift the scaled boxes by -0.5 pixel (detectron2's ROIAlignV2); False is the legacy mode, where
            boxes smaller than a pixel are enlarged to 1x1.

    Returns:
        (K, C, PH, PW). Differentiable in ``input`` (not in ``rois``, as torchvision).

    CPU float32/float64 inputs use ``codetr._C`` when it is built (same values as torchvision: the same
    arithmetic, in the same order); anything else goes to torchvision.
    """
    output_size = _pair(output_size)
    _check_inputs(input, rois, output_size)
    output_size = (int(output_size[0]), int(output_size[1]))
    if (
        input.device.type != "cpu"
        or input.dtype not in _KERNEL_DTYPES
        or not _has_cpu_kernels()
        or torch.jit.is_tracing()
        or torch.jit.is_scripting()
    ):
        return _tv_roi_align(input, rois, output_size, spatial_scale, sampling_ratio, aligned)
    return _ROIAlignFunction.apply(
        input.contiguous(), rois.contiguous(), output_size, float(spatial_scale), int(sampling_ratio), bool(aligned)
    )


class ROIAlign(nn.Module):
    """
    Drop-in replacement of ``detectron2.layers.ROIAlign`` (same constructor, forward and repr) running
    :func:`roi_align`. No parameters or buffers.
    """

    def __init__(self, output_size, spatial_scale, sampling_ratio, aligned=True):
        """
        Args:
            output_size: int or (h, w).
            spatial_scale: scale of the input boxes (1 / stride).
            sampling_ratio: samples per bin side; 0: adaptive.
            aligned: True for detectron2's ROIAlignV2 (pixel model shifted by -0.5), False for the legacy one.
        """
        super().__init__()
        self.output_size = output_size
        self.spatial_scale = spatial_scale
        self.sampling_ratio = sampling_ratio
        self.aligned = aligned

    def forward(self, input, rois):
        """
        Args:
            input: (N, C, H, W).
            rois: (K, 5) rows (batch_index, x1, y1, x2, y2); cast to input's dtype.

        Returns:
            (K, C, output_size[0], output_size[1])
        """
        if not isinstance(rois, torch.Tensor) or rois.dim() != 2 or rois.shape[1] != 5:
            shape = tuple(rois.shape) if isinstance(rois, torch.Tensor) else type(rois).__name__
            raise ValueError(f"ROIAlign: rois must be (K, 5) with rows (batch_index, x1, y1, x2, y2), got {shape}")
        if input.is_quantized:
            input = input.dequantize()
        return roi_align(
            input, rois.to(dtype=input.dtype), self.output_size, self.spatial_scale, self.sampling_ratio, self.aligned
        )

    def __repr__(self):
        return (
            f"{self.__class__.__name__}(output_size={self.output_size}, spatial_scale={self.spatial_scale}, "
            f"sampling_ratio={self.sampling_ratio}, aligned={self.aligned})"
        )
