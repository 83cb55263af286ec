// Multi-scale deformable attention: CUDA kernels (forward and backward) for float32, float64,
// float16 and bfloat16. Arithmetic runs in at::opmath_type (float32 for the half types, else the
// input type). Any batch size works (no im2col_step).
//
// Forward: one thread per output element (n, q, h, c); consecutive threads read consecutive
// channels of the same value row (coalesced).
// Backward: one thread per sampling point (n, q, h, l, p). It loops over the channels, computes the
// gradients of its location and attention weight locally (written once, no atomics) and adds its
// share of the value gradient with atomicAdd into a buffer of the accumulation type (float32 for
// half/bfloat16 inputs, cast back at the end), so the half types never need half-precision atomics.
// Only c10/cuda headers are used (not ATen/cuda/CUDAContext.h, which needs cuSPARSE/cuBLAS headers).
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>

#include "ms_deform_attn.h"

namespace codetr {
namespace {

constexpr int kThreads = 256;

inline int64_t num_blocks(int64_t total) {
  return std::min<int64_t>((total + kThreads - 1) / kThreads, int64_t(1) << 20);
}

// Bilinear sample of one channel at pixel coordinates (x, y), known to satisfy -1 < x < width and
// -1 < y < height (so the top-left corner is >= -1 and the bottom-right one is <= size).
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t bilinear(
    const scalar_t* __restrict__ v,  // &value[n, level_start, h, c]
    int64_t height,
    int64_t width,
    int64_t row_stride,
    acc_t x,
    acc_t y) {
  const acc_t xf = floor(x), yf = floor(y);
  const int64_t x0 = static_cast<int64_t>(xf), y0 = static_cast<int64_t>(yf);
  const acc_t lx = x - xf, ly = y - yf, hx = acc_t(1) - lx, hy = acc_t(1) - ly;
  acc_t r = 0;
  if (y0 >= 0 && x0 >= 0) r += hy * hx * static_cast<acc_t>(v[(y0 * width + x0) * row_stride]);
  if (y0 >= 0 && x0 + 1 < width) r += hy * lx * static_cast<acc_t>(v[(y0 * width + x0 + 1) * row_stride]);
  if (y0 + 1 < height && x0 >= 0) r += ly * hx * static_cast<acc_t>(v[((y0 + 1) * width + x0) * row_stride]);
  if (y0 + 1 < height && x0 + 1 < width) {
    r += ly * lx * static_cast<acc_t>(v[((y0 + 1) * width + x0 + 1) * row_stride]);
  }
  return r;
}

template <typename scalar_t, typename acc_t>
__global__ void forward_kernel(
    int64_t total,  // N * Lq * H * C
    const scalar_t* __restrict__ value,
    const int64_t* __restrict__ shapes,
    const int64_t* __restrict__ level_start,
    const scalar_t* __restrict__ loc,
    const scalar_t* __restrict__ attn,
    scalar_t* __restrict__ out,
    int64_t S,
    int64_t H,
    int64_t C,
    int64_t L,
    int64_t P,
    int64_t Lq) {
  const int64_t row_stride = H * C;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const int64_t c = i % C;
    const int64_t nqh = i / C;  // (n * Lq + q) * H + h
    const int64_t h = nqh % H;
    const int64_t n = nqh / H / Lq;
    const int64_t sample0 = nqh * L * P;
    acc_t sum = 0;
    for (int64_t l = 0; l < L; ++l) {
      const int64_t height = shapes[2 * l], width = shapes[2 * l + 1];
      const scalar_t* v = value + (n * S + level_start[l]) * row_stride + h * C + c;
      for (int64_t p = 0; p < P; ++p) {
        const int64_t j = sample0 + l * P + p;
        const acc_t x = static_cast<acc_t>(loc[2 * j]) * static_cast<acc_t>(width) - acc_t(0.5);
        const acc_t y = static_cast<acc_t>(loc[2 * j + 1]) * static_cast<acc_t>(height) - acc_t(0.5);
        if (x > acc_t(-1) && y > acc_t(-1) && x < static_cast<acc_t>(width) && y < static_cast<acc_t>(height)) {
          sum += static_cast<acc_t>(attn[j]) * bilinear<scalar_t, acc_t>(v, height, width, row_stride, x, y);
        }
      }
    }
    out[i] = static_cast<scalar_t>(sum);
  }
}

template <typename scalar_t, typename acc_t>
__global__ void backward_kernel(
    int64_t total,  // N * Lq * H * L * P
    const scalar_t* __restrict__ value,
    const int64_t* __restrict__ shapes,
    const int64_t* __restrict__ level_start,
    const scalar_t* __restrict__ loc,
    const scalar_t* __restrict__ attn,
    const scalar_t* __restrict__ grad_out,
    acc_t* __restrict__ grad_value,  // accumulation buffer, value's shape
    scalar_t* __restrict__ grad_loc,
    scalar_t* __restrict__ grad_attn,
    int64_t S,
    int64_t H,
    int64_t C,
    int64_t L,
    int64_t P,
    int64_t Lq) {
  const int64_t row_stride = H * C;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const int64_t l = (i / P) % L;
    const int64_t nqh = i / (P * L);  // (n * Lq + q) * H + h
    const int64_t h = nqh % H;
    const int64_t n = nqh / H / Lq;
    const int64_t height = shapes[2 * l], width = shapes[2 * l + 1];
    const acc_t x = static_cast<acc_t>(loc[2 * i]) * static_cast<acc_t>(width) - acc_t(0.5);
    const acc_t y = static_cast<acc_t>(loc[2 * i + 1]) * static_cast<acc_t>(height) - acc_t(0.5);
    acc_t g_attn = 0, g_x = 0, g_y = 0;
    if (x > acc_t(-1) && y > acc_t(-1) && x < static_cast<acc_t>(width) && y < static_cast<acc_t>(height)) {
      const acc_t a = static_cast<acc_t>(attn[i]);
      const acc_t xf = floor(x), yf = floor(y);
      const int64_t x0 = static_cast<int64_t>(xf), y0 = static_cast<int64_t>(yf);
      const acc_t lx = x - xf, ly = y - yf, hx = acc_t(1) - lx, hy = acc_t(1) - ly;
      // Corners (y0,x0), (y0,x1), (y1,x0), (y1,x1).
      const bool ok0 = y0 >= 0 && x0 >= 0;
      const bool ok1 = y0 >= 0 && x0 + 1 < width;
      const bool ok2 = y0 + 1 < height && x0 >= 0;
      const bool ok3 = y0 + 1 < height && x0 + 1 < width;
      const int64_t base = (n * S + level_start[l]) * row_stride + h * C;
      const int64_t o0 = base + (y0 * width + x0) * row_stride;
      const int64_t o1 = o0 + row_stride;
      const int64_t o2 = o0 + width * row_stride;
      const int64_t o3 = o2 + row_stride;
      const acc_t s0 = a * hy * hx, s1 = a * hy * lx, s2 = a * ly * hx, s3 = a * ly * lx;
      const scalar_t* g = grad_out + nqh * C;
      acc_t d0 = 0, d1 = 0, d2 = 0, d3 = 0;
      for (int64_t c = 0; c < C; ++c) {
        const acc_t gc = static_cast<acc_t>(g[c]);
        if (ok0) {
          d0 += gc * static_cast<acc_t>(value[o0 + c]);
          atomicAdd(grad_value + o0 + c, s0 * gc);
        }
        if (ok1) {
          d1 += gc * static_cast<acc_t>(value[o1 + c]);
          atomicAdd(grad_value + o1 + c, s1 * gc);
        }
        if (ok2) {
          d2 += gc * static_cast<acc_t>(value[o2 + c]);
          atomicAdd(grad_value + o2 + c, s2 * gc);
        }
        if (ok3) {
          d3 += gc * static_cast<acc_t>(value[o3 + c]);
          atomicAdd(grad_value + o3 + c, s3 * gc);
        }
      }
      g_attn = hy * hx * d0 + hy * lx * d1 + ly * hx * d2 + ly * lx * d3;
      g_x = a * (hy * (d1 - d0) + ly * (d3 - d2)) * static_cast<acc_t>(width);
      g_y = a * (hx * (d2 - d0) + lx * (d3 - d1)) * static_cast<acc_t>(height);
    }
    grad_attn[i] = static_cast<scalar_t>(g_attn);
    grad_loc[2 * i] = static_cast<scalar_t>(g_x);
    grad_loc[2 * i + 1] = static_cast<scalar_t>(g_y);
  }
}

void check_cuda(const at::Tensor& value, std::initializer_list<at::Tensor> others) {
  TORCH_CHECK(value.is_cuda(), "value must be a CUDA tensor");
  for (const auto& t : others) {
    TORCH_CHECK(t.device() == value.device(), "all inputs of ms_deform_attn must be on value's device");
  }
}

}  // namespace

at::Tensor ms_deform_attn_cuda_forward(
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights) {
  check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  check_cuda(value, {spatial_shapes, level_start_index, sampling_locations, attention_weights});
  const c10::cuda::OptionalCUDAGuard guard(value.device());
  const int64_t N = value.size(0), S = value.size(1), H = value.size(2), C = value.size(3);
  const int64_t Lq = sampling_locations.size(1), L = sampling_locations.size(3), P = sampling_locations.size(4);
  auto out = at::empty({N, Lq, H * C}, value.options());
  const int64_t total = out.numel();
  if (total == 0) {
    return out;
  }
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_cuda_forward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    forward_kernel<scalar_t, acc_t><<<num_blocks(total), kThreads, 0, stream>>>(
        total, value.data_ptr<scalar_t>(), spatial_shapes.data_ptr<int64_t>(), level_start_index.data_ptr<int64_t>(),
        sampling_locations.data_ptr<scalar_t>(), attention_weights.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), S,
        H, C, L, P, Lq);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::vector<at::Tensor> ms_deform_attn_cuda_backward(
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights,
    const at::Tensor& grad_output) {
  check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  check_cuda(value, {spatial_shapes, level_start_index, sampling_locations, attention_weights, grad_output});
  const c10::cuda::OptionalCUDAGuard guard(value.device());
  const int64_t N = value.size(0), S = value.size(1), H = value.size(2), C = value.size(3);
  const int64_t Lq = sampling_locations.size(1), L = sampling_locations.size(3), P = sampling_locations.size(4);
  TORCH_CHECK(
      grad_output.scalar_type() == value.scalar_type() && grad_output.is_contiguous() &&
          grad_output.numel() == N * Lq * H * C,
      "grad_output must be a contiguous (N, Lq, H * C) tensor of value's dtype");
  const auto acc_type = at::toOpMathType(value.scalar_type());
  auto grad_value_acc = at::zeros(value.sizes(), value.options().dtype(acc_type));
  auto grad_loc = at::empty_like(sampling_locations);
  auto grad_attn = at::empty_like(attention_weights);
  const int64_t total = attention_weights.numel();
  if (total > 0 && C > 0) {
    auto stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_cuda_backward", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      backward_kernel<scalar_t, acc_t><<<num_blocks(total), kThreads, 0, stream>>>(
          total, value.data_ptr<scalar_t>(), spatial_shapes.data_ptr<int64_t>(), level_start_index.data_ptr<int64_t>(),
          sampling_locations.data_ptr<scalar_t>(), attention_weights.data_ptr<scalar_t>(),
          grad_output.data_ptr<scalar_t>(), grad_value_acc.data_ptr<acc_t>(), grad_loc.data_ptr<scalar_t>(),
          grad_attn.data_ptr<scalar_t>(), S, H, C, L, P, Lq);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  } else {
    grad_loc.zero_();
    grad_attn.zero_();
  }
  auto grad_value = grad_value_acc.scalar_type() == value.scalar_type() ? grad_value_acc : grad_value_acc.to(value.scalar_type());
  return {grad_value, grad_loc, grad_attn};
}

}  // namespace codetr
