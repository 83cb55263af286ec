// The codetr._C extension module: multi-scale deformable attention, dispatched on value's device, and the
// CPU RoIAlign kernels.
#include <torch/extension.h>

#include "ms_deform_attn.h"
#include "roi_align.h"
#include "soft_nms.h"

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

static std::vector<at::Tensor> soft_nms(
    const at::Tensor& boxes,
    const at::Tensor& scores,
    const at::Tensor& labels,
    double iou_threshold,
    double sigma,
    double min_score,
    bool gaussian) {
  TORCH_CHECK(boxes.dim() == 2 && boxes.size(1) == 4, "soft_nms: boxes must be (N, 4), got ", boxes.sizes());
  TORCH_CHECK(scores.dim() == 1 && scores.size(0) == boxes.size(0), "soft_nms: scores must be (N,), got ",
              scores.sizes());
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == boxes.size(0), "soft_nms: labels must be (N,), got ",
              labels.sizes());
  TORCH_CHECK(boxes.scalar_type() == at::kFloat && scores.scalar_type() == at::kFloat,
              "soft_nms: boxes and scores must be float32");
  TORCH_CHECK(labels.scalar_type() == at::kLong, "soft_nms: labels must be int64");
  TORCH_CHECK(boxes.device() == scores.device() && boxes.device() == labels.device(),
              "soft_nms: boxes, scores and labels must be on one device");
  if (boxes.is_cuda()) {
#ifdef WITH_CUDA
    return soft_nms_cuda(boxes, scores, labels, iou_threshold, sigma, min_score, gaussian);
#else
    TORCH_CHECK(false, "codetr._C was built without CUDA; rebuild with FORCE_CUDA=1");
#endif
  }
  return soft_nms_cpu(boxes, scores, labels, iou_threshold, sigma, min_score, gaussian);
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
  m.doc() = "Co-DETR compiled ops (multi-scale deformable attention, CPU RoIAlign, soft-NMS)";
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
  m.def(
      "soft_nms", &codetr::soft_nms,
      "class-aware soft-NMS: (boxes (N, 4) float32 XYXY, scores (N,) float32, labels (N,) int64, iou_threshold, "
      "sigma, min_score, gaussian) -> [keep (M,) int64 in picking order, new scores (M,) float32]");
  m.def("with_cuda", &codetr::with_cuda, "whether codetr._C was built with the CUDA kernels");
  m.def("with_openmp", &codetr::with_openmp, "whether the CPU kernels were compiled with OpenMP (multi-threaded)");
}
