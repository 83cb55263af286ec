// Class-aware soft-NMS on the CPU (see soft_nms.h). O(N^2): each pick scans the unpicked boxes once to find the
// next maximum and once to decay the scores of its class; the unpicked boxes are kept compacted in a list.
#include "soft_nms.h"

#include <cmath>
#include <vector>

namespace codetr {

std::vector<at::Tensor> soft_nms_cpu(
    const at::Tensor& boxes_in, const at::Tensor& scores_in, const at::Tensor& labels_in, double iou_threshold,
    double sigma, double min_score, bool gaussian) {
  const at::Tensor boxes = boxes_in.contiguous();
  const at::Tensor scores = scores_in.contiguous();
  const at::Tensor labels = labels_in.contiguous();
  const int64_t n = boxes.size(0);
  const float* b = boxes.data_ptr<float>();
  const int64_t* lab = labels.data_ptr<int64_t>();
  std::vector<float> cur(scores.data_ptr<float>(), scores.data_ptr<float>() + n);
  std::vector<float> area(n);
  for (int64_t j = 0; j < n; ++j) {
    area[j] = (b[4 * j + 2] - b[4 * j]) * (b[4 * j + 3] - b[4 * j + 1]);
  }
  std::vector<int64_t> alive(n);  // unpicked indices, ascending (so ties go to the lowest index)
  for (int64_t j = 0; j < n; ++j) {
    alive[j] = j;
  }
  std::vector<int64_t> order;
  std::vector<float> final_scores;
  order.reserve(n);
  final_scores.reserve(n);
  const float thr = static_cast<float>(iou_threshold);
  const float sig = static_cast<float>(sigma);
  const float min_s = static_cast<float>(min_score);  // compared in float32, as a float tensor with a scalar
  while (!alive.empty()) {
    size_t best = 0;
    for (size_t k = 1; k < alive.size(); ++k) {
      if (cur[alive[k]] > cur[alive[best]]) {
        best = k;
      }
    }
    const int64_t i = alive[best];
    if (!(cur[i] >= min_s)) {
      break;  // every later pick is lower still
    }
    order.push_back(i);
    final_scores.push_back(cur[i]);
    alive.erase(alive.begin() + best);
    const float x1 = b[4 * i], y1 = b[4 * i + 1], x2 = b[4 * i + 2], y2 = b[4 * i + 3];
    for (const int64_t j : alive) {
      if (lab[j] != lab[i]) {
        continue;  // other classes: IoU counts as 0, decay 1
      }
      const float w = std::max(std::min(x2, b[4 * j + 2]) - std::max(x1, b[4 * j]), 0.0f);
      const float h = std::max(std::min(y2, b[4 * j + 3]) - std::max(y1, b[4 * j + 1]), 0.0f);
      const float inter = w * h;
      const float uni = area[i] + area[j] - inter;
      const float iou = uni > 0.0f ? inter / uni : 0.0f;
      if (gaussian) {
        cur[j] = cur[j] * std::exp(-(iou * iou) / sig);
      } else if (iou > thr) {
        cur[j] = cur[j] * (1.0f - iou);
      }
    }
  }
  const int64_t m = static_cast<int64_t>(order.size());
  at::Tensor keep = at::empty({m}, labels.options());
  at::Tensor out = at::empty({m}, scores.options());
  std::copy(order.begin(), order.end(), keep.data_ptr<int64_t>());
  std::copy(final_scores.begin(), final_scores.end(), out.data_ptr<float>());
  return {keep, out};
}

}  // namespace codetr
