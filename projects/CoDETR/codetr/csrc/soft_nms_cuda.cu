// Class-aware soft-NMS on the GPU (see soft_nms.h): one block runs every picking step; each step is a block-wide
// arg-max (lowest index on ties) and a parallel decay of the same-class scores. No host sync inside the kernel;
// the host reads the number of kept boxes once, to size the outputs.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "soft_nms.h"

namespace codetr {

namespace {

constexpr int kThreads = 512;

__global__ void soft_nms_kernel(
    const float* __restrict__ boxes, const int64_t* __restrict__ labels, float* __restrict__ cur,
    unsigned char* __restrict__ picked, int64_t n, float thr, float sigma, float min_score, bool gaussian,
    int64_t* __restrict__ order, float* __restrict__ final_scores, int64_t* __restrict__ count) {
  __shared__ float s_val[kThreads];
  __shared__ int64_t s_idx[kThreads];
  __shared__ int64_t s_pick;
  __shared__ float s_box[4];
  __shared__ float s_area;
  __shared__ int64_t s_label;
  const int t = threadIdx.x;
  int64_t step = 0;
  for (; step < n; ++step) {
    float best = -INFINITY;
    int64_t best_idx = -1;
    for (int64_t j = t; j < n; j += kThreads) {
      if (!picked[j] && (best_idx < 0 || cur[j] > best)) {
        best = cur[j];
        best_idx = j;
      }
    }
    s_val[t] = best;
    s_idx[t] = best_idx;
    __syncthreads();
    for (int stride = kThreads / 2; stride > 0; stride >>= 1) {
      if (t < stride) {
        const float v = s_val[t + stride];
        const int64_t k = s_idx[t + stride];
        if (k >= 0 && (s_idx[t] < 0 || v > s_val[t] || (v == s_val[t] && k < s_idx[t]))) {
          s_val[t] = v;
          s_idx[t] = k;
        }
      }
      __syncthreads();
    }
    if (t == 0) {
      const int64_t i = s_idx[0];
      s_pick = (i >= 0 && s_val[0] >= min_score) ? i : -1;
      if (s_pick >= 0) {
        order[step] = i;
        final_scores[step] = s_val[0];
        picked[i] = 1;
        for (int c = 0; c < 4; ++c) {
          s_box[c] = boxes[4 * i + c];
        }
        s_area = (s_box[2] - s_box[0]) * (s_box[3] - s_box[1]);
        s_label = labels[i];
      }
    }
    __syncthreads();
    if (s_pick < 0) {
      break;
    }
    for (int64_t j = t; j < n; j += kThreads) {
      if (picked[j] || labels[j] != s_label) {
        continue;
      }
      const float* bj = boxes + 4 * j;
      const float w = fmaxf(fminf(s_box[2], bj[2]) - fmaxf(s_box[0], bj[0]), 0.0f);
      const float h = fmaxf(fminf(s_box[3], bj[3]) - fmaxf(s_box[1], bj[1]), 0.0f);
      const float inter = __fmul_rn(w, h);
      const float area_j = __fmul_rn(bj[2] - bj[0], bj[3] - bj[1]);
      const float uni = __fsub_rn(__fadd_rn(s_area, area_j), inter);
      const float iou = uni > 0.0f ? __fdiv_rn(inter, uni) : 0.0f;
      if (gaussian) {
        cur[j] = __fmul_rn(cur[j], expf(-__fmul_rn(iou, iou) / sigma));
      } else if (iou > thr) {
        cur[j] = __fmul_rn(cur[j], 1.0f - iou);
      }
    }
    __syncthreads();
  }
  if (t == 0) {
    *count = step;
  }
}

}  // namespace

std::vector<at::Tensor> soft_nms_cuda(
    const at::Tensor& boxes_in, const at::Tensor& scores, const at::Tensor& labels_in, double iou_threshold,
    double sigma, double min_score, bool gaussian) {
  const c10::cuda::CUDAGuard guard(boxes_in.device());
  const at::Tensor boxes = boxes_in.contiguous();
  const at::Tensor labels = labels_in.contiguous();
  const int64_t n = boxes.size(0);
  at::Tensor cur = scores.contiguous().clone();
  at::Tensor picked = at::zeros({n}, boxes.options().dtype(at::kByte));
  at::Tensor order = at::empty({n}, labels.options());
  at::Tensor out = at::empty({n}, cur.options());
  at::Tensor count = at::zeros({1}, labels.options());
  if (n > 0) {
    soft_nms_kernel<<<1, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        boxes.data_ptr<float>(), labels.data_ptr<int64_t>(), cur.data_ptr<float>(), picked.data_ptr<unsigned char>(),
        n, static_cast<float>(iou_threshold), static_cast<float>(sigma), static_cast<float>(min_score), gaussian,
        order.data_ptr<int64_t>(), out.data_ptr<float>(), count.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  const int64_t m = count.item<int64_t>();  // the one host read: the output length
  return {order.narrow(0, 0, m), out.narrow(0, 0, m)};
}

}  // namespace codetr
