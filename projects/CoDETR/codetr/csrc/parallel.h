// Task scheduling shared by the CPU kernels of codetr._C.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

namespace codetr {

// Runs f(task) for task in [0, num_tasks) on torch's intra-op threads, handed out dynamically (an atomic
// counter), so a thread preempted on a busy machine does not hold the others up. Each task must write only
// memory no other task writes: the kernels use tasks that own disjoint output slices (no atomics needed).
// at::parallel_for is only parallel when the extension is compiled with OpenMP (setup.py: -fopenmp).
template <typename F>
inline void parallel_tasks(int64_t num_tasks, const F& f) {
  if (num_tasks <= 0) {
    return;
  }
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), num_tasks));
  std::atomic<int64_t> next{0};
  at::parallel_for(0, workers, 1, [&](int64_t begin, int64_t end) {
    if (begin >= end) {
      return;
    }
    for (int64_t task = next.fetch_add(1); task < num_tasks; task = next.fetch_add(1)) {
      f(task);
    }
  });
}

}  // namespace codetr
