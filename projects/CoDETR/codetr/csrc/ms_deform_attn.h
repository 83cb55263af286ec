// Multi-scale deformable attention (Deformable-DETR): declarations of the CPU and CUDA kernels.
//
// Shapes (all tensors contiguous, validated by the Python caller):
//   value               (N, S, H, C)      float
//   spatial_shapes      (L, 2)            int64, rows (h, w)
//   level_start_index   (L,)              int64
//   sampling_locations  (N, Lq, H, L, P, 2) float, normalised (x, y)
//   attention_weights   (N, Lq, H, L, P)  float
//   output              (N, Lq, H * C)
// Sampling is bilinear with zero padding and align_corners=False semantics: the pixel coordinate of a
// normalised x is x * w - 0.5.
#pragma once
#include <ATen/ATen.h>

#include <vector>

namespace codetr {

at::Tensor ms_deform_attn_cpu_forward(
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights);

// Returns {grad_value, grad_sampling_locations, grad_attention_weights}.
std::vector<at::Tensor> ms_deform_attn_cpu_backward(
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights,
    const at::Tensor& grad_output);

#ifdef WITH_CUDA
at::Tensor ms_deform_attn_cuda_forward(
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights);

std::vector<at::Tensor> ms_deform_attn_cuda_backward(
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights,
    const at::Tensor& grad_output);
#endif

// Light checks shared by both back ends (the Python wrapper validates fully and with clearer
// messages; these guard direct calls of codetr._C).
inline void check_inputs(
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights) {
  TORCH_CHECK(value.dim() == 4, "value must be (N, S, H, C)");
  TORCH_CHECK(spatial_shapes.dim() == 2 && spatial_shapes.size(1) == 2, "spatial_shapes must be (L, 2)");
  TORCH_CHECK(level_start_index.dim() == 1, "level_start_index must be (L,)");
  TORCH_CHECK(sampling_locations.dim() == 6, "sampling_locations must be (N, Lq, H, L, P, 2)");
  TORCH_CHECK(attention_weights.dim() == 5, "attention_weights must be (N, Lq, H, L, P)");
  TORCH_CHECK(spatial_shapes.scalar_type() == at::kLong, "spatial_shapes must be int64");
  TORCH_CHECK(level_start_index.scalar_type() == at::kLong, "level_start_index must be int64");
  TORCH_CHECK(
      sampling_locations.scalar_type() == value.scalar_type() &&
          attention_weights.scalar_type() == value.scalar_type(),
      "value, sampling_locations and attention_weights must have the same dtype");
  TORCH_CHECK(
      value.is_contiguous() && spatial_shapes.is_contiguous() && level_start_index.is_contiguous() &&
          sampling_locations.is_contiguous() && attention_weights.is_contiguous(),
      "codetr._C ms_deform_attn expects contiguous tensors");
  const auto N = value.size(0), H = value.size(2);
  const auto L = spatial_shapes.size(0);
  TORCH_CHECK(level_start_index.size(0) == L, "level_start_index must have L entries");
  TORCH_CHECK(
      sampling_locations.size(0) == N && sampling_locations.size(2) == H && sampling_locations.size(3) == L &&
          sampling_locations.size(5) == 2,
      "sampling_locations must be (N, Lq, H, L, P, 2)");
  TORCH_CHECK(
      attention_weights.size(0) == N && attention_weights.size(1) == sampling_locations.size(1) &&
          attention_weights.size(2) == H && attention_weights.size(3) == L &&
          attention_weights.size(4) == sampling_locations.size(4),
      "attention_weights must be (N, Lq, H, L, P)");
}

}  // namespace codetr
