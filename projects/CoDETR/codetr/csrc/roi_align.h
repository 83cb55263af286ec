// RoIAlign (Mask R-CNN): declarations of the CPU kernels.
//
// Semantics are torchvision's ``roi_align`` (detectron2's ROIAlign / ROIAlignV2), element for element:
//   input        (N, C, H, W)   float32 or float64, contiguous
//   rois         (K, 5)         same dtype, contiguous; rows (batch_index, x1, y1, x2, y2) in input-image
//                               coordinates, scaled by spatial_scale (minus 0.5 when aligned)
//   output       (K, C, PH, PW) bin averages of bilinear samples on a regular grid of
//                               sampling_ratio x sampling_ratio points per bin (sampling_ratio <= 0:
//                               ceil(roi_size / pooled_size) points per side, adaptive)
// A sample is read when -1 <= y <= H and -1 <= x <= W (coordinates below 0 are clamped to 0, those
// past the last pixel to the last pixel); otherwise it contributes zero but still counts in the average.
#pragma once
#include <ATen/ATen.h>

namespace codetr {

at::Tensor roi_align_cpu_forward(
    const at::Tensor& input,
    const at::Tensor& rois,
    double spatial_scale,
    int64_t pooled_height,
    int64_t pooled_width,
    int64_t sampling_ratio,
    bool aligned);

// grad_output (K, C, PH, PW) contiguous -> grad_input (batch_size, channels, height, width).
at::Tensor roi_align_cpu_backward(
    const at::Tensor& grad_output,
    const at::Tensor& rois,
    double spatial_scale,
    int64_t pooled_height,
    int64_t pooled_width,
    int64_t batch_size,
    int64_t channels,
    int64_t height,
    int64_t width,
    int64_t sampling_ratio,
    bool aligned);

}  // namespace codetr
