// RoIAlign: C++ CPU kernels (forward and backward), float32 and float64, with torchvision's semantics.
//
// A RoI's bilinear samples ("taps": four pixel offsets in an (H, W) plane and their four weights) do not
// depend on the channel, so both kernels compute them once per RoI and reuse them for all C channels.
//
// Forward: tasks are RoIs (dynamically scheduled); a task computes its RoI's taps and writes its own
// output rows out[n, :, :, :].
// Backward: RoIs are processed in chunks (ascending); the taps of a chunk are built in parallel over its
// RoIs, then scattered in parallel over *channels*: a task owns a range of channels of grad_input and
// loops over every RoI of the chunk, so no two threads write the same element (no atomics). Every
// element of grad_input receives its contributions in the same order -- RoI, bin, sample, corner, as
// torchvision's single-threaded loop -- whatever the number of threads, so results are deterministic
// and the arithmetic of each contribution ((grad * weight) / count) is torchvision's.
//
// Samples outside the map (y < -1, y > H, x < -1 or x > W, or NaN) are skipped; torchvision adds
// 0 * input[0] for them in the forward, which only differs when input[..., 0, 0] is not finite.
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "roi_align.h"
#include "parallel.h"

namespace codetr {
namespace {

// One bilinear sample: offsets of its four corner pixels in an (H, W) plane, in the order
// (y_low, x_low), (y_low, x_high), (y_high, x_low), (y_high, x_high), and their weights.
template <typename T>
struct Tap {
  int32_t pos[4];
  T w[4];
};

// The sampling grid of one RoI on the feature map.
template <typename T>
struct RoiGrid {
  int64_t batch;
  T start_h, start_w;  // top-left corner in feature-map pixels
  T bin_h, bin_w;      // bin size
  int grid_h, grid_w;  // samples per bin along y / x (<= 0: none)

  // Number of samples per bin as used by the forward average (at least 1, torchvision's rule).
  int forward_count() const {
    return std::max(grid_h * grid_w, 1);
  }
  int64_t max_taps(int64_t bins) const {
    return grid_h > 0 && grid_w > 0 ? static_cast<int64_t>(grid_h) * grid_w * bins : 0;
  }
};

template <typename T>
RoiGrid<T> roi_grid(
    const T* roi, T spatial_scale, int64_t pooled_height, int64_t pooled_width, int64_t sampling_ratio, bool aligned) {
  RoiGrid<T> g;
  g.batch = static_cast<int64_t>(roi[0]);
  const T offset = aligned ? T(0.5) : T(0);
  g.start_w = roi[1] * spatial_scale - offset;
  g.start_h = roi[2] * spatial_scale - offset;
  const T end_w = roi[3] * spatial_scale - offset;
  const T end_h = roi[4] * spatial_scale - offset;
  T roi_w = end_w - g.start_w;
  T roi_h = end_h - g.start_h;
  if (!aligned) {  // legacy mode: malformed RoIs become 1x1
    roi_w = std::max(roi_w, T(1));
    roi_h = std::max(roi_h, T(1));
  }
  g.bin_h = roi_h / static_cast<T>(pooled_height);
  g.bin_w = roi_w / static_cast<T>(pooled_width);
  if (sampling_ratio > 0) {
    g.grid_h = g.grid_w = static_cast<int>(sampling_ratio);
  } else {
    g.grid_h = static_cast<int>(std::ceil(roi_h / static_cast<T>(pooled_height)));
    g.grid_w = static_cast<int>(std::ceil(roi_w / static_cast<T>(pooled_width)));
  }
  return g;
}

// Bilinear footprint of one coordinate along one axis of length `size`.
template <typename T>
struct Axis {
  bool inside;  // false: the sample reads nothing
  int32_t low, high;
  T l, h;  // weights of `high` and `low`
};

template <typename T>
inline Axis<T> axis(T v, int64_t size) {
  Axis<T> a;
  a.inside = v >= T(-1) && v <= static_cast<T>(size);  // false for NaN
  if (!a.inside) {
    a.low = a.high = 0;
    a.l = a.h = T(0);
    return a;
  }
  if (v <= T(0)) {
    v = T(0);
  }
  a.low = static_cast<int32_t>(v);
  if (a.low >= size - 1) {
    a.low = a.high = static_cast<int32_t>(size - 1);
    v = static_cast<T>(a.low);
  } else {
    a.high = a.low + 1;
  }
  a.l = v - static_cast<T>(a.low);
  a.h = T(1) - a.l;
  return a;
}

// Writes the taps of one RoI into `taps` bin by bin (row-major bins, samples in (iy, ix) order), skipping
// samples outside the map; bin_end[b] is the number of taps of bins 0..b. Returns the number of taps.
// The sample coordinates are computed with torchvision's expression order, so they are bitwise equal.
template <typename T>
int32_t build_taps(
    const RoiGrid<T>& g,
    int64_t height,
    int64_t width,
    int64_t pooled_height,
    int64_t pooled_width,
    std::vector<Axis<T>>& ys,  // scratch
    std::vector<Axis<T>>& xs,  // scratch
    Tap<T>* taps,
    int32_t* bin_end) {
  const int gh = std::max(g.grid_h, 0), gw = std::max(g.grid_w, 0);
  // The grid is separable: y depends on (ph, iy) only, x on (pw, ix) only.
  ys.resize(pooled_height * gh);
  xs.resize(pooled_width * gw);
  for (int64_t ph = 0; ph < pooled_height; ++ph) {
    for (int iy = 0; iy < gh; ++iy) {
      const T y = g.start_h + static_cast<T>(ph) * g.bin_h +
          static_cast<T>(iy + .5f) * g.bin_h / static_cast<T>(g.grid_h);
      ys[ph * gh + iy] = axis<T>(y, height);
    }
  }
  for (int64_t pw = 0; pw < pooled_width; ++pw) {
    for (int ix = 0; ix < gw; ++ix) {
      const T x = g.start_w + static_cast<T>(pw) * g.bin_w +
          static_cast<T>(ix + .5f) * g.bin_w / static_cast<T>(g.grid_w);
      xs[pw * gw + ix] = axis<T>(x, width);
    }
  }
  const int32_t w = static_cast<int32_t>(width);
  int32_t t = 0;
  for (int64_t ph = 0; ph < pooled_height; ++ph) {
    for (int64_t pw = 0; pw < pooled_width; ++pw) {
      for (int iy = 0; iy < gh; ++iy) {
        const Axis<T>& ay = ys[ph * gh + iy];
        if (!ay.inside) {
          continue;
        }
        for (int ix = 0; ix < gw; ++ix) {
          const Axis<T>& ax = xs[pw * gw + ix];
          if (!ax.inside) {
            continue;
          }
          Tap<T>& tap = taps[t++];
          tap.pos[0] = ay.low * w + ax.low;
          tap.pos[1] = ay.low * w + ax.high;
          tap.pos[2] = ay.high * w + ax.low;
          tap.pos[3] = ay.high * w + ax.high;
          tap.w[0] = ay.h * ax.h;
          tap.w[1] = ay.h * ax.l;
          tap.w[2] = ay.l * ax.h;
          tap.w[3] = ay.l * ax.l;
        }
      }
      bin_end[ph * pooled_width + pw] = t;
    }
  }
  return t;
}

inline bool is_power_of_two(int64_t v) {
  return v > 0 && (v & (v - 1)) == 0;
}

// A vector of four T (GCC/Clang vector extension).
template <typename T>
struct Vec4 {
  typedef T type __attribute__((vector_size(4 * sizeof(T))));
};

// Channels handled together by the inner loops: a tap's offsets and weights are loaded once for kChannels
// channel planes, and their accumulations are independent chains. Each channel's own arithmetic and order are
// unchanged.
constexpr int kChannels = 4;

// For the kC channel planes planes + j * plane_stride (j < kC):
// out[j * out_stride + b] = (sum over bin b's taps of w0*p[pos0] + w1*p[pos1] + w2*p[pos2] + w3*p[pos3]) / count.
// Division by a power of two is a multiplication by its (exact) inverse: the same result.
template <typename T, bool kPow2, int kC>
inline void pool_channels(
    const T* __restrict__ planes,
    int64_t plane_stride,
    const Tap<T>* __restrict__ taps,
    const int32_t* __restrict__ bin_end,
    int64_t bins,
    T count,
    T inv_count,
    T* __restrict__ out,
    int64_t out_stride) {
  int32_t t = 0;
  for (int64_t b = 0; b < bins; ++b) {
    T acc[kC];
    for (int j = 0; j < kC; ++j) {
      acc[j] = T(0);
    }
    for (const int32_t e = bin_end[b]; t < e; ++t) {
      const Tap<T>& k = taps[t];
      const int32_t p0 = k.pos[0], p1 = k.pos[1], p2 = k.pos[2], p3 = k.pos[3];
      const T w0 = k.w[0], w1 = k.w[1], w2 = k.w[2], w3 = k.w[3];
      for (int j = 0; j < kC; ++j) {
        const T* p = planes + j * plane_stride;
        acc[j] += w0 * p[p0] + w1 * p[p1] + w2 * p[p2] + w3 * p[p3];
      }
    }
    for (int j = 0; j < kC; ++j) {
      out[j * out_stride + b] = kPow2 ? acc[j] * inv_count : acc[j] / count;
    }
  }
}

// For the kC channel planes planes + j * plane_stride: plane[pos_i] += (g_jb * w_i) / count for every tap of every
// bin b, in order, g_jb = grad[j * grad_stride + b].
template <typename T, bool kPow2, int kC>
inline void scatter_channels(
    T* planes,
    int64_t plane_stride,
    const Tap<T>* __restrict__ taps,
    const int32_t* __restrict__ bin_end,
    int64_t bins,
    T count,
    T inv_count,
    const T* __restrict__ grad,
    int64_t grad_stride) {
  int32_t t = 0;
  for (int64_t b = 0; b < bins; ++b) {
    T g[kC];
    for (int j = 0; j < kC; ++j) {
      g[j] = grad[j * grad_stride + b];
    }
    for (const int32_t e = bin_end[b]; t < e; ++t) {
      const Tap<T>& k = taps[t];
      // The four corners' contributions as one vector: the compiler emits packed multiplications and divisions
      // (elementwise IEEE operations, the same values as scalar ones).
      typename Vec4<T>::type w;
      std::memcpy(&w, k.w, sizeof(w));
      for (int j = 0; j < kC; ++j) {
        typename Vec4<T>::type v = w * g[j];
        v = kPow2 ? v * inv_count : v / count;
        T* p = planes + j * plane_stride;
        p[k.pos[0]] += v[0];
        p[k.pos[1]] += v[1];
        p[k.pos[2]] += v[2];
        p[k.pos[3]] += v[3];
      }
    }
  }
}

template <typename T>
void check_batch_indices(const T* rois, int64_t num_rois, int64_t batch_size) {
  for (int64_t n = 0; n < num_rois; ++n) {
    const T b = rois[n * 5];
    TORCH_CHECK(
        b >= T(0) && b < static_cast<T>(batch_size),
        "roi_align: rois[", n, ", 0] = ", static_cast<double>(b), " is not a batch index of the input (batch size ",
        batch_size, ")");
  }
}

template <typename T>
void forward_kernel(
    const T* input,
    const T* rois,
    T* out,
    int64_t num_rois,
    int64_t channels,
    int64_t height,
    int64_t width,
    int64_t pooled_height,
    int64_t pooled_width,
    T spatial_scale,
    int64_t sampling_ratio,
    bool aligned) {
  const int64_t bins = pooled_height * pooled_width;
  const int64_t plane_size = height * width;
  parallel_tasks(num_rois, [&](int64_t n) {
    // Per-task scratch; tasks are whole RoIs, so these allocations are amortised over C channels.
    const RoiGrid<T> g = roi_grid<T>(rois + n * 5, spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned);
    std::vector<Tap<T>> taps(std::max<int64_t>(g.max_taps(bins), 1));
    std::vector<int32_t> bin_end(bins);
    std::vector<Axis<T>> ys, xs;
    build_taps<T>(g, height, width, pooled_height, pooled_width, ys, xs, taps.data(), bin_end.data());
    const int count_i = g.forward_count();
    const T count = static_cast<T>(count_i), inv_count = T(1) / count;
    const bool pow2 = is_power_of_two(count_i);
    const T* image = input + g.batch * channels * plane_size;
    T* out_n = out + n * channels * bins;
    const Tap<T>* tp = taps.data();
    const int32_t* be = bin_end.data();
    int64_t c = 0;
    for (; c + kChannels <= channels; c += kChannels) {
      if (pow2) {
        pool_channels<T, true, kChannels>(image + c * plane_size, plane_size, tp, be, bins, count, inv_count, out_n + c * bins, bins);
      } else {
        pool_channels<T, false, kChannels>(image + c * plane_size, plane_size, tp, be, bins, count, inv_count, out_n + c * bins, bins);
      }
    }
    for (; c < channels; ++c) {
      if (pow2) {
        pool_channels<T, true, 1>(image + c * plane_size, plane_size, tp, be, bins, count, inv_count, out_n + c * bins, bins);
      } else {
        pool_channels<T, false, 1>(image + c * plane_size, plane_size, tp, be, bins, count, inv_count, out_n + c * bins, bins);
      }
    }
  });
}

template <typename T>
void backward_kernel(
    const T* grad_output,
    const T* rois,
    T* grad_input,
    int64_t num_rois,
    int64_t channels,
    int64_t height,
    int64_t width,
    int64_t pooled_height,
    int64_t pooled_width,
    T spatial_scale,
    int64_t sampling_ratio,
    bool aligned) {
  const int64_t bins = pooled_height * pooled_width;
  const int64_t plane_size = height * width;
  std::vector<RoiGrid<T>> grids(num_rois);
  for (int64_t n = 0; n < num_rois; ++n) {
    grids[n] = roi_grid<T>(rois + n * 5, spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned);
  }
  // Chunks of consecutive RoIs with at most ~kChunkTaps taps (at least one RoI); within a chunk, the
  // channel tasks walk the RoIs in blocks of ~kBlockTaps taps so that a block's taps stay in cache while
  // they are reused for every channel of the task.
  constexpr int64_t kChunkTaps = int64_t(1) << 17;
  constexpr int64_t kBlockTaps = int64_t(1) << 12;
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  // Channel tasks: about 4 per thread (dynamic scheduling evens out preemption), at least 1 channel each.
  // Rounded up to a multiple of kChannels (the inner loops' channel group).
  int64_t channels_per_task = std::max<int64_t>(1, channels / (4 * threads));
  channels_per_task = (channels_per_task + kChannels - 1) / kChannels * kChannels;
  const int64_t num_channel_tasks = (channels + channels_per_task - 1) / channels_per_task;

  std::vector<int64_t> tap_start;  // per RoI of the chunk (+ end)
  std::vector<Tap<T>> taps;
  std::vector<int32_t> bin_end;
  std::vector<int64_t> blocks;  // RoI indices (relative to the chunk) where cache blocks start (+ end)
  for (int64_t chunk_begin = 0; chunk_begin < num_rois;) {
    int64_t chunk_end = chunk_begin;
    tap_start.assign(1, 0);
    blocks.assign(1, 0);
    int64_t block_taps = 0;
    while (chunk_end < num_rois && (chunk_end == chunk_begin || tap_start.back() < kChunkTaps)) {
      const int64_t m = grids[chunk_end].max_taps(bins);
      if (block_taps > 0 && block_taps + m > kBlockTaps) {
        blocks.push_back(chunk_end - chunk_begin);
        block_taps = 0;
      }
      block_taps += m;
      tap_start.push_back(tap_start.back() + m);
      ++chunk_end;
    }
    const int64_t chunk_rois = chunk_end - chunk_begin;
    blocks.push_back(chunk_rois);
    taps.resize(std::max<int64_t>(tap_start.back(), 1));
    bin_end.resize(chunk_rois * bins);

    parallel_tasks(chunk_rois, [&](int64_t r) {
      std::vector<Axis<T>> ys, xs;
      build_taps<T>(
          grids[chunk_begin + r], height, width, pooled_height, pooled_width, ys, xs, taps.data() + tap_start[r],
          bin_end.data() + r * bins);
    });

    parallel_tasks(num_channel_tasks, [&](int64_t task) {
      const int64_t c_begin = task * channels_per_task;
      const int64_t c_end = std::min(channels, c_begin + channels_per_task);
      for (size_t blk = 0; blk + 1 < blocks.size(); ++blk) {
        for (int64_t c = c_begin; c < c_end;) {
          const int64_t nc = c + kChannels <= c_end ? kChannels : 1;
          for (int64_t r = blocks[blk]; r < blocks[blk + 1]; ++r) {
            const RoiGrid<T>& g = grids[chunk_begin + r];
            if (tap_start[r + 1] == tap_start[r]) {
              continue;  // no sample (empty grid): nothing to add
            }
            // The backward divides by grid_h * grid_w (> 0 here: the RoI has taps).
            const int64_t count_i = static_cast<int64_t>(g.grid_h) * g.grid_w;
            const T count = static_cast<T>(count_i), inv_count = T(1) / count;
            T* planes = grad_input + (g.batch * channels + c) * plane_size;
            const T* grad = grad_output + ((chunk_begin + r) * channels + c) * bins;
            const Tap<T>* tp = taps.data() + tap_start[r];
            const int32_t* be = bin_end.data() + r * bins;
            const bool pow2 = is_power_of_two(count_i);
            if (nc == kChannels) {
              if (pow2) {
                scatter_channels<T, true, kChannels>(planes, plane_size, tp, be, bins, count, inv_count, grad, bins);
              } else {
                scatter_channels<T, false, kChannels>(planes, plane_size, tp, be, bins, count, inv_count, grad, bins);
              }
            } else if (pow2) {
              scatter_channels<T, true, 1>(planes, plane_size, tp, be, bins, count, inv_count, grad, bins);
            } else {
              scatter_channels<T, false, 1>(planes, plane_size, tp, be, bins, count, inv_count, grad, bins);
            }
          }
          c += nc;
        }
      }
    });
    chunk_begin = chunk_end;
  }
}

void check_common(const at::Tensor& rois, int64_t pooled_height, int64_t pooled_width, int64_t height, int64_t width) {
  TORCH_CHECK(rois.device().is_cpu(), "roi_align (codetr._C): rois must be a CPU tensor");
  TORCH_CHECK(rois.dim() == 2 && rois.size(1) == 5, "roi_align (codetr._C): rois must be (K, 5)");
  TORCH_CHECK(rois.is_contiguous(), "roi_align (codetr._C): rois must be contiguous");
  TORCH_CHECK(pooled_height > 0 && pooled_width > 0, "roi_align (codetr._C): output size must be positive");
  TORCH_CHECK(
      height * width <= std::numeric_limits<int32_t>::max(), "roi_align (codetr._C): feature map too large (H * W >= 2^31)");
}

}  // namespace

at::Tensor roi_align_cpu_forward(
    const at::Tensor& input,
    const at::Tensor& rois,
    double spatial_scale,
    int64_t pooled_height,
    int64_t pooled_width,
    int64_t sampling_ratio,
    bool aligned) {
  TORCH_CHECK(input.device().is_cpu(), "roi_align (codetr._C): input must be a CPU tensor");
  TORCH_CHECK(input.dim() == 4, "roi_align (codetr._C): input must be (N, C, H, W)");
  TORCH_CHECK(input.is_contiguous(), "roi_align (codetr._C): input must be contiguous");
  TORCH_CHECK(input.scalar_type() == rois.scalar_type(), "roi_align (codetr._C): input and rois must have the same dtype");
  const int64_t N = input.size(0), C = input.size(1), H = input.size(2), W = input.size(3);
  check_common(rois, pooled_height, pooled_width, H, W);
  const int64_t K = rois.size(0);
  auto out = at::zeros({K, C, pooled_height, pooled_width}, input.options());
  if (out.numel() == 0 || H == 0 || W == 0) {
    return out;
  }
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "roi_align_cpu_forward", [&] {
    const scalar_t* r = rois.data_ptr<scalar_t>();
    check_batch_indices<scalar_t>(r, K, N);
    forward_kernel<scalar_t>(
        input.data_ptr<scalar_t>(), r, out.data_ptr<scalar_t>(), K, C, H, W, pooled_height, pooled_width,
        static_cast<scalar_t>(spatial_scale), sampling_ratio, aligned);
  });
  return out;
}

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
    bool aligned) {
  TORCH_CHECK(grad_output.device().is_cpu(), "roi_align (codetr._C): grad_output must be a CPU tensor");
  TORCH_CHECK(grad_output.is_contiguous(), "roi_align (codetr._C): grad_output must be contiguous");
  TORCH_CHECK(
      grad_output.scalar_type() == rois.scalar_type(), "roi_align (codetr._C): grad_output and rois must have the same dtype");
  check_common(rois, pooled_height, pooled_width, height, width);
  const int64_t K = rois.size(0);
  TORCH_CHECK(
      grad_output.dim() == 4 && grad_output.size(0) == K && grad_output.size(1) == channels &&
          grad_output.size(2) == pooled_height && grad_output.size(3) == pooled_width,
      "roi_align (codetr._C): grad_output must be (K, channels, pooled_height, pooled_width)");
  auto grad_input = at::zeros({batch_size, channels, height, width}, grad_output.options());
  if (grad_output.numel() == 0 || grad_input.numel() == 0) {
    return grad_input;
  }
  AT_DISPATCH_FLOATING_TYPES(grad_output.scalar_type(), "roi_align_cpu_backward", [&] {
    const scalar_t* r = rois.data_ptr<scalar_t>();
    check_batch_indices<scalar_t>(r, K, batch_size);
    backward_kernel<scalar_t>(
        grad_output.data_ptr<scalar_t>(), r, grad_input.data_ptr<scalar_t>(), K, channels, height, width,
        pooled_height, pooled_width, static_cast<scalar_t>(spatial_scale), sampling_ratio, aligned);
  });
  return grad_input;
}

}  // namespace codetr
