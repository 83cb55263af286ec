// Class-aware soft-NMS (linear or Gaussian): declarations of the CPU and CUDA kernels.
//
//   boxes  (N, 4) float32 XYXY, contiguous;  scores (N,) float32;  labels (N,) int64
// Repeatedly picks the highest current score among the boxes not picked yet (the lowest index on ties), then
// multiplies the current score of every unpicked box of the same label by
//   linear:   (1 - IoU) where IoU > iou_threshold, else 1;   gaussian: exp(-IoU^2 / sigma)
// with IoU = inter / (area_a + area_b - inter) in float32 (torchvision's box_iou; 0 where the union is 0).
// Picked scores never increase, so picking stops at the first one below min_score.
// Returns {order (M,) int64 indices in picking order, new scores (M,) float32} with M the number of picks with
// score >= min_score. The CUDA kernel runs all N steps in one block (no host sync inside); the host reads M once.
#pragma once
#include <ATen/ATen.h>

#include <vector>

namespace codetr {

std::vector<at::Tensor> soft_nms_cpu(
    const at::Tensor& boxes, const at::Tensor& scores, const at::Tensor& labels, double iou_threshold,
    double sigma, double min_score, bool gaussian);

#ifdef WITH_CUDA
std::vector<at::Tensor> soft_nms_cuda(
    const at::Tensor& boxes, const at::Tensor& scores, const at::Tensor& labels, double iou_threshold,
    double sigma, double min_score, bool gaussian);
#endif

}  // namespace codetr
