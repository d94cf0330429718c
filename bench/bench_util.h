// Helpers shared by the benchmarks: aligned buffers, threads, and a STREAM-like read-bandwidth probe.
#ifndef RAPIDIN_BENCH_BENCH_UTIL_H_
#define RAPIDIN_BENCH_BENCH_UTIL_H_

#include <sys/mman.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <functional>
#include <thread>
#include <vector>

namespace rapidin::bench {

inline double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

// 64-byte aligned; buffers of 32 MiB and more on 2 MiB pages where THP allows it, as the server's host tier allocates
// its stores (storage/internal/host_shard.h), so a benchmark scans memory the way the server does. On 4 KiB pages a
// one-vector scan of 100k x 4096 measured 26-28 ms against 20 ms on 2 MiB pages.
template <class T>
T* AlignedAlloc(size_t n) {
  size_t bytes = (n * sizeof(T) + 63) / 64 * 64;
  if (bytes < (size_t{32} << 20)) return static_cast<T*>(std::aligned_alloc(64, bytes));
  bytes = (bytes + (size_t{2} << 20) - 1) / (size_t{2} << 20) * (size_t{2} << 20);
  void* p = std::aligned_alloc(size_t{2} << 20, bytes);
  if (p != nullptr) ::madvise(p, bytes, MADV_HUGEPAGE);
  return static_cast<T*>(p);
}

// Runs fn(t) on T threads and returns the wall time of the slowest.
inline double Parallel(int threads, const std::function<void(int)>& fn) {
  const auto t0 = std::chrono::steady_clock::now();
  std::vector<std::thread> ts;
  for (int t = 0; t < threads; ++t) ts.emplace_back(fn, t);
  for (auto& t : ts) t.join();
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// STREAM-like read: sum a buffer far larger than the last-level cache with T threads, 16 accumulators each.
// Returns GB/s (median of reps).
inline double ReadBandwidth(int threads, size_t bytes, int reps) {
  const size_t n = bytes / sizeof(float);
  float* buf = AlignedAlloc<float>(n);
  Parallel(threads, [&](int t) {  // first touch by the thread that reads it
    for (size_t i = n * t / threads; i < n * (t + 1) / threads; ++i) buf[i] = static_cast<float>(i & 7);
  });
  std::vector<double> times;
  volatile float sink = 0;
  for (int r = 0; r < reps; ++r) {
    times.push_back(Parallel(threads, [&](int t) {
      const size_t lo = n * t / threads / 64 * 64, hi = n * (t + 1) / threads / 64 * 64;
      float acc[16] = {0};
      for (size_t i = lo; i < hi; i += 16) {
        for (int l = 0; l < 16; ++l) acc[l] += buf[i + l];
      }
      float s = 0;
      for (float a : acc) s += a;
      sink = sink + s;
    }));
  }
  std::free(buf);
  return bytes / Median(times) / 1e9;
}

}  // namespace rapidin::bench

#endif  // RAPIDIN_BENCH_BENCH_UTIL_H_
