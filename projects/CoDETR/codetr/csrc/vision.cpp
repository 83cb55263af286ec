// The codetr._C extension module: multi-scale deformable attention, dispatched on value's device, and the
// CPU RoIAlign kernels.
#include <torch/extension.h>

#include "ms_deform_attn.h"
#include "roi_align.h"

namespace codetr {

static at::Tensor ms_deform_attn_forward(
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights) {
  if (value.is_cuda()) {
#ifdef WITH_CUDA
    return ms_deform_attn_cuda_forward(
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
#else
    TORCH_CHECK(false, "codetr._C was built without CUDA; rebuild with FORCE_CUDA=1");
#endif
  }
  return ms_deform_attn_cpu_forward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
}

static std::vector<at::Tensor> ms_deform_attn_backward(
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights,
    const at::Tensor& grad_output) {
  if (value.is_cuda()) {
#ifdef WITH_CUDA
    return ms_deform_attn_cuda_backward(
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights, grad_output);
#else
    TORCH_CHECK(false, "codetr._C was built without CUDA; rebuild with FORCE_CUDA=1");
#endif
  }
  return ms_deform_attn_cpu_backward(
      value, spatial_shapes, level_start_index, sampling_locations, attention_weights, grad_output);
}

static bool with_cuda() {
#ifdef WITH_CUDA
  return true;
#else
  return false;
#endif
}

// Whether at::parallel_for in our kernels can use several threads (it is serial unless compiled with OpenMP).
static bool with_openmp() {
#ifdef _OPENMP
  return true;
#else
  return false;
#endif
}

}  // namespace codetr

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Co-DETR compiled ops (multi-scale deformable attention, CPU RoIAlign)";
  m.def(
      "ms_deform_attn_forward", &codetr::ms_deform_attn_forward,
      "multi-scale deformable attention forward: (value, spatial_shapes, level_start_index, "
      "sampling_locations, attention_weights) -> output (N, Lq, H*C)");
  m.def(
      "ms_deform_attn_backward", &codetr::ms_deform_attn_backward,
      "multi-scale deformable attention backward: (..., grad_output) -> [grad_value, "
      "grad_sampling_locations, grad_attention_weights]");
  m.def(
      "roi_align_forward", &codetr::roi_align_cpu_forward,
      "RoIAlign forward on the CPU (torchvision semantics): (input (N, C, H, W), rois (K, 5), spatial_scale, "
      "pooled_height, pooled_width, sampling_ratio, aligned) -> output (K, C, pooled_height, pooled_width)");
  m.def(
      "roi_align_backward", &codetr::roi_align_cpu_backward,
      "RoIAlign backward on the CPU: (grad_output (K, C, PH, PW), rois, spatial_scale, pooled_height, "
      "pooled_width, batch_size, channels, height, width, sampling_ratio, aligned) -> grad_input (N, C, H, W)");
  m.def("with_cuda", &codetr::with_cuda, "whether codetr._C was built with the CUDA kernels");
  m.def("with_openmp", &codetr::with_openmp, "whether the CPU kernels were compiled with OpenMP (multi-threaded)");
}
