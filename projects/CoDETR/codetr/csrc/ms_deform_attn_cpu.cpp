// Multi-scale deformable attention: C++ CPU kernels (forward and backward), float32 and float64.
//
// Forward: tasks are blocks of (batch, query) rows; every task writes its own output rows.
// Backward: one task per (batch, head, level); it owns the slice grad_value[n, level, h, :] (the
// level's pixels of that head) and the gradients of the sampling locations / attention weights of
// that (batch, head, level), so no two threads ever write the same element (no atomics, no data
// race, deterministic results). Every level gets Lq * P samples, so the tasks are of equal size.
// Tasks are handed out dynamically (an atomic counter), so a thread that the OS preempts on a busy
// machine does not hold the others up.
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <vector>

#include "ms_deform_attn.h"
#include "parallel.h"

namespace codetr {
namespace {

// Bilinear footprint of one sampling point: up to four corner rows of the value tensor and their
// weights. Corners outside the map point at a zero row (reads) / a scratch row (writes) with weight
// 0, so the inner loops over channels need no branches.
template <typename scalar_t>
struct Corners {
  const scalar_t* v[4];
  int64_t offset[4];  // element offset of the corner row in the value tensor, -1 when outside
  scalar_t w[4];      // bilinear weights: (y0,x0), (y0,x1), (y1,x0), (y1,x1)
  scalar_t lx, ly, hx, hy;
};

// Returns false when the point reads nothing (entirely outside the map, or NaN).
template <typename scalar_t>
inline bool corners(
    scalar_t loc_x,
    scalar_t loc_y,
    int64_t height,
    int64_t width,
    const scalar_t* level_value,  // &value[n, level_start, h, 0]
    int64_t row_stride,           // H * C
    const scalar_t* zeros,
    Corners<scalar_t>& k) {
  const scalar_t x = loc_x * static_cast<scalar_t>(width) - scalar_t(0.5);
  const scalar_t y = loc_y * static_cast<scalar_t>(height) - scalar_t(0.5);
  if (!(x > scalar_t(-1) && y > scalar_t(-1) && x < static_cast<scalar_t>(width) &&
        y < static_cast<scalar_t>(height))) {
    return false;
  }
  const scalar_t xf = std::floor(x), yf = std::floor(y);
  const int64_t x0 = static_cast<int64_t>(xf), y0 = static_cast<int64_t>(yf);
  const int64_t x1 = x0 + 1, y1 = y0 + 1;
  k.lx = x - xf;
  k.ly = y - yf;
  k.hx = scalar_t(1) - k.lx;
  k.hy = scalar_t(1) - k.ly;
  const int64_t ys[4] = {y0, y0, y1, y1};
  const int64_t xs[4] = {x0, x1, x0, x1};
  const scalar_t ws[4] = {k.hy * k.hx, k.hy * k.lx, k.ly * k.hx, k.ly * k.lx};
  for (int i = 0; i < 4; ++i) {
    if (ys[i] >= 0 && ys[i] < height && xs[i] >= 0 && xs[i] < width) {
      k.offset[i] = (ys[i] * width + xs[i]) * row_stride;
      k.v[i] = level_value + k.offset[i];
      k.w[i] = ws[i];
    } else {
      k.offset[i] = -1;
      k.v[i] = zeros;
      k.w[i] = scalar_t(0);
    }
  }
  return true;
}

// out[c] += sum_i w[i] * v_i[c]
template <typename scalar_t>
inline void gather4(
    scalar_t* __restrict__ out,
    const scalar_t* __restrict__ v0,
    const scalar_t* __restrict__ v1,
    const scalar_t* __restrict__ v2,
    const scalar_t* __restrict__ v3,
    scalar_t w0,
    scalar_t w1,
    scalar_t w2,
    scalar_t w3,
    int64_t C) {
  for (int64_t c = 0; c < C; ++c) {
    out[c] += w0 * v0[c] + w1 * v1[c] + w2 * v2[c] + w3 * v3[c];
  }
}

// d_i = sum_c g[c] * v_i[c] and gv_i[c] += s_i * g[c], for the four corners at once.
template <typename scalar_t>
inline void scatter_dot4(
    const scalar_t* __restrict__ g,
    const scalar_t* __restrict__ v0,
    const scalar_t* __restrict__ v1,
    const scalar_t* __restrict__ v2,
    const scalar_t* __restrict__ v3,
    scalar_t* __restrict__ gv0,
    scalar_t* __restrict__ gv1,
    scalar_t* __restrict__ gv2,
    scalar_t* __restrict__ gv3,
    scalar_t s0,
    scalar_t s1,
    scalar_t s2,
    scalar_t s3,
    int64_t C,
    scalar_t* d) {
  constexpr int K = 8;  // independent partial sums, so the reductions vectorise without -ffast-math
  scalar_t a0[K] = {}, a1[K] = {}, a2[K] = {}, a3[K] = {};
  int64_t c = 0;
  for (; c + K <= C; c += K) {
    for (int j = 0; j < K; ++j) {
      const scalar_t gj = g[c + j];
      a0[j] += gj * v0[c + j];
      a1[j] += gj * v1[c + j];
      a2[j] += gj * v2[c + j];
      a3[j] += gj * v3[c + j];
      gv0[c + j] += s0 * gj;
      gv1[c + j] += s1 * gj;
      gv2[c + j] += s2 * gj;
      gv3[c + j] += s3 * gj;
    }
  }
  for (; c < C; ++c) {
    const scalar_t gc = g[c];
    a0[0] += gc * v0[c];
    a1[0] += gc * v1[c];
    a2[0] += gc * v2[c];
    a3[0] += gc * v3[c];
    gv0[c] += s0 * gc;
    gv1[c] += s1 * gc;
    gv2[c] += s2 * gc;
    gv3[c] += s3 * gc;
  }
  scalar_t r0 = 0, r1 = 0, r2 = 0, r3 = 0;
  for (int j = 0; j < K; ++j) {
    r0 += a0[j];
    r1 += a1[j];
    r2 += a2[j];
    r3 += a3[j];
  }
  d[0] = r0;
  d[1] = r1;
  d[2] = r2;
  d[3] = r3;
}

template <typename scalar_t>
void forward_kernel(
    const scalar_t* value,
    const int64_t* shapes,
    const int64_t* level_start,
    const scalar_t* loc,
    const scalar_t* attn,
    scalar_t* out,
    int64_t N,
    int64_t S,
    int64_t H,
    int64_t C,
    int64_t L,
    int64_t P,
    int64_t Lq) {
  const int64_t row_stride = H * C;
  // Blocks of rows of about 64k multiply-adds amortise the scheduling.
  const int64_t rows = std::max<int64_t>(1, 65536 / std::max<int64_t>(1, H * L * P * C));
  const int64_t num_tasks = (N * Lq + rows - 1) / rows;
  parallel_tasks(num_tasks, [&](int64_t task) {
    std::vector<scalar_t> zeros(C, scalar_t(0));
    Corners<scalar_t> k;
    const int64_t begin = task * rows, end = std::min(N * Lq, begin + rows);
    for (int64_t nq = begin; nq < end; ++nq) {
      const int64_t n = nq / Lq;
      scalar_t* out_q = out + nq * H * C;
      std::fill(out_q, out_q + H * C, scalar_t(0));
      for (int64_t h = 0; h < H; ++h) {
        const int64_t base = (nq * H + h) * L * P;
        scalar_t* o = out_q + h * C;
        for (int64_t l = 0; l < L; ++l) {
          const int64_t height = shapes[2 * l], width = shapes[2 * l + 1];
          const scalar_t* level_value = value + (n * S + level_start[l]) * row_stride + h * C;
          for (int64_t p = 0; p < P; ++p) {
            const int64_t j = base + l * P + p;
            if (!corners(loc[2 * j], loc[2 * j + 1], height, width, level_value, row_stride, zeros.data(), k)) {
              continue;
            }
            const scalar_t a = attn[j];
            gather4(o, k.v[0], k.v[1], k.v[2], k.v[3], a * k.w[0], a * k.w[1], a * k.w[2], a * k.w[3], C);
          }
        }
      }
    }
  });
}

template <typename scalar_t>
void backward_kernel(
    const scalar_t* value,
    const int64_t* shapes,
    const int64_t* level_start,
    const scalar_t* loc,
    const scalar_t* attn,
    const scalar_t* grad_out,
    scalar_t* grad_value,
    scalar_t* grad_loc,
    scalar_t* grad_attn,
    int64_t N,
    int64_t S,
    int64_t H,
    int64_t C,
    int64_t L,
    int64_t P,
    int64_t Lq) {
  const int64_t row_stride = H * C;
  parallel_tasks(N * H * L, [&](int64_t task) {
    std::vector<scalar_t> zeros(C, scalar_t(0));
    std::vector<scalar_t> scratch(4 * C, scalar_t(0));  // write target of corners outside the map
    Corners<scalar_t> k;
    scalar_t d[4];
    const int64_t l = task % L, h = (task / L) % H, n = task / (L * H);
    const int64_t height = shapes[2 * l], width = shapes[2 * l + 1];
    const int64_t level_offset = (n * S + level_start[l]) * row_stride + h * C;
    const scalar_t* level_value = value + level_offset;
    scalar_t* level_grad = grad_value + level_offset;
    for (int64_t q = 0; q < Lq; ++q) {
      const int64_t nqh = (n * Lq + q) * H + h;
      const scalar_t* g = grad_out + nqh * C;
      for (int64_t p = 0; p < P; ++p) {
        const int64_t j = (nqh * L + l) * P + p;
        if (!corners(loc[2 * j], loc[2 * j + 1], height, width, level_value, row_stride, zeros.data(), k)) {
          continue;  // grad_loc / grad_attn stay 0
        }
        const scalar_t a = attn[j];
        scalar_t* gv[4];
        for (int i = 0; i < 4; ++i) {
          gv[i] = k.offset[i] >= 0 ? level_grad + k.offset[i] : scratch.data() + i * C;
        }
        scatter_dot4(
            g, k.v[0], k.v[1], k.v[2], k.v[3], gv[0], gv[1], gv[2], gv[3], a * k.w[0], a * k.w[1], a * k.w[2],
            a * k.w[3], C, d);
        grad_attn[j] = k.w[0] * d[0] + k.w[1] * d[1] + k.w[2] * d[2] + k.w[3] * d[3];
        // d(weights)/dx and d(weights)/dy of the bilinear weights, times the pixel scale.
        const scalar_t gx = k.hy * (d[1] - d[0]) + k.ly * (d[3] - d[2]);
        const scalar_t gy = k.hx * (d[2] - d[0]) + k.lx * (d[3] - d[1]);
        grad_loc[2 * j] = a * gx * static_cast<scalar_t>(width);
        grad_loc[2 * j + 1] = a * gy * static_cast<scalar_t>(height);
      }
    }
  });
}

}  // namespace

at::Tensor ms_deform_attn_cpu_forward(
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights) {
  check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  const int64_t N = value.size(0), S = value.size(1), H = value.size(2), C = value.size(3);
  const int64_t Lq = sampling_locations.size(1), L = sampling_locations.size(3), P = sampling_locations.size(4);
  auto out = at::empty({N, Lq, H * C}, value.options());
  if (out.numel() == 0) {
    return out;
  }
  AT_DISPATCH_FLOATING_TYPES(value.scalar_type(), "ms_deform_attn_cpu_forward", [&] {
    forward_kernel<scalar_t>(
        value.data_ptr<scalar_t>(), spatial_shapes.data_ptr<int64_t>(), level_start_index.data_ptr<int64_t>(),
        sampling_locations.data_ptr<scalar_t>(), attention_weights.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
        N, S, H, C, L, P, Lq);
  });
  return out;
}

std::vector<at::Tensor> ms_deform_attn_cpu_backward(
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights,
    const at::Tensor& grad_output) {
  check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  const int64_t N = value.size(0), S = value.size(1), H = value.size(2), C = value.size(3);
  const int64_t Lq = sampling_locations.size(1), L = sampling_locations.size(3), P = sampling_locations.size(4);
  TORCH_CHECK(
      grad_output.scalar_type() == value.scalar_type() && grad_output.is_contiguous() &&
          grad_output.numel() == N * Lq * H * C,
      "grad_output must be a contiguous (N, Lq, H * C) tensor of value's dtype");
  auto grad_value = at::zeros_like(value);
  auto grad_loc = at::zeros_like(sampling_locations);
  auto grad_attn = at::zeros_like(attention_weights);
  if (grad_output.numel() == 0) {
    return {grad_value, grad_loc, grad_attn};
  }
  AT_DISPATCH_FLOATING_TYPES(value.scalar_type(), "ms_deform_attn_cpu_backward", [&] {
    backward_kernel<scalar_t>(
        value.data_ptr<scalar_t>(), spatial_shapes.data_ptr<int64_t>(), level_start_index.data_ptr<int64_t>(),
        sampling_locations.data_ptr<scalar_t>(), attention_weights.data_ptr<scalar_t>(),
        grad_output.data_ptr<scalar_t>(), grad_value.data_ptr<scalar_t>(), grad_loc.data_ptr<scalar_t>(),
        grad_attn.data_ptr<scalar_t>(), N, S, H, C, L, P, Lq);
  });
  return {grad_value, grad_loc, grad_attn};
}

}  // namespace codetr
