// GPU benchmark: what share of the device's memory bandwidth a scan of the store reaches.
//
// Prints one markdown table (bench/results/gpu.md keeps a copy). Reference ceilings are measured in the same run:
// a device-to-device copy (bytes read + bytes written) and a pinned host-to-device copy. Rows:
//   scan kernel      LaunchScore alone, store GB/s;
//   scan + top-k     Scanner::ScanShard on a hot shard (score, device top-k both ends, download, merge);
//   warm stream      Scanner::ScanShard on a warm shard streamed from pinned host memory;
//   cuBLAS           cublasGemmEx, fp16 store x fp16 queries, fp32 accumulate (the peer);
//   sketch           GpuSketch on device buffers, GB/s of gradient read.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "kernels/cuda/launch.h"
#include "kernels/cuda/scanner.h"
#include "kernels/cuda/sketch.h"
#include "kernels/half.h"
#include "kernels/rapidgrad.h"

#if RAPIDIN_HAVE_CUBLAS
#include <cublas_v2.h>
#endif

using namespace rapidin;

#define CHECK(expr)                                                                          \
  do {                                                                                       \
    const cudaError_t e_ = (expr);                                                           \
    if (e_ != cudaSuccess) {                                                                 \
      std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #expr, cudaGetErrorString(e_)); \
      std::exit(1);                                                                          \
    }                                                                                        \
  } while (0)

// Median milliseconds of `reps` runs of fn, timed with events after `warm` runs.
double TimeMs(const std::function<void()>& fn, int reps = 10, int warm = 2) {
  for (int i = 0; i < warm; ++i) fn();
  CHECK(cudaDeviceSynchronize());
  cudaEvent_t a, b;
  CHECK(cudaEventCreate(&a));
  CHECK(cudaEventCreate(&b));
  std::vector<float> t;
  for (int i = 0; i < reps; ++i) {
    CHECK(cudaEventRecord(a));
    fn();
    CHECK(cudaEventRecord(b));
    CHECK(cudaEventSynchronize(b));
    float ms = 0;
    CHECK(cudaEventElapsedTime(&ms, a, b));
    t.push_back(ms);
  }
  cudaEventDestroy(a);
  cudaEventDestroy(b);
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

// Fills n halves on the device with random normal values (a 64 MiB random block, repeated).
void FillRandomHalf(uint16_t* dev, size_t n, uint32_t seed) {
  const size_t block = std::min<size_t>(n, size_t{32} << 20);
  std::vector<uint16_t> h(block);
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd;
  for (auto& v : h) v = kernels::FloatToHalf(nd(rng) * 0.05f);
  for (size_t off = 0; off < n; off += block) {
    CHECK(cudaMemcpy(dev + off, h.data(), std::min(block, n - off) * 2, cudaMemcpyHostToDevice));
  }
}

struct Row {
  std::string what;
  std::string shape;
  double ms;
  double gbs;
  std::string ref;  // share of which ceiling
};

int main(int argc, char** argv) {
  const bool quick = argc > 1 && std::strcmp(argv[1], "--quick") == 0;
  std::vector<gpu::DeviceInfo> devs;
  gpu::Status st = gpu::ListDevices(&devs);
  if (!st.ok()) {
    std::printf("gpu_bench: no usable CUDA device (%s)\n", st.ToString().c_str());
    return 0;
  }
  CHECK(cudaSetDevice(0));
  std::printf("device 0: %s, %d SMs, %.1f GiB free\n", devs[0].name.c_str(), devs[0].sm_count,
              devs[0].free_bytes / double(1 << 30));
  std::vector<Row> rows;

  // Ceiling 1: device-to-device copy, counting bytes read plus bytes written.
  const size_t copy_bytes = size_t{4} << 30;
  void *ca, *cb;
  CHECK(cudaMalloc(&ca, copy_bytes));
  CHECK(cudaMalloc(&cb, copy_bytes));
  CHECK(cudaMemset(ca, 1, copy_bytes));
  const double copy_ms = TimeMs([&] { CHECK(cudaMemcpyAsync(cb, ca, copy_bytes, cudaMemcpyDeviceToDevice)); });
  const double d2d = 2.0 * copy_bytes / copy_ms / 1e6;
  CHECK(cudaFree(ca));
  CHECK(cudaFree(cb));
  rows.push_back({"device-to-device copy (read+write)", "4 GiB", copy_ms, d2d, "ceiling"});

  // Ceiling 2: pinned host to device.
  const size_t h2d_bytes = size_t{1} << 30;
  void *hp, *dp;
  CHECK(cudaMallocHost(&hp, h2d_bytes));
  CHECK(cudaMalloc(&dp, h2d_bytes));
  std::memset(hp, 1, h2d_bytes);
  const double h2d_ms = TimeMs([&] { CHECK(cudaMemcpyAsync(dp, hp, h2d_bytes, cudaMemcpyHostToDevice)); }, 5, 1);
  const double h2d = h2d_bytes / h2d_ms / 1e6;
  CHECK(cudaFree(dp));
  rows.push_back({"pinned host-to-device copy", "1 GiB", h2d_ms, h2d, "ceiling"});

  struct Shape {
    int64_t n, k;
  };
  std::vector<Shape> shapes = {{100000, 4096}, {1000000, 4096}, {131072, 65536}};
  if (quick) shapes = {{100000, 4096}};
  for (const Shape& s : shapes) {
    const size_t elems = static_cast<size_t>(s.n) * s.k;
    const double store_gb = elems * 2 / 1e9;
    uint16_t* store;
    CHECK(cudaMalloc(&store, elems * 2));
    FillRandomHalf(store, elems, 1);
    const std::string shape = std::to_string(s.n) + " x " + std::to_string(s.k);
    for (int q : {1, 8}) {
      std::vector<float> hq(static_cast<size_t>(q) * s.k);
      std::mt19937 rng(2);
      std::normal_distribution<float> nd;
      for (auto& v : hq) v = nd(rng);
      float *dq, *scores;
      CHECK(cudaMalloc(&dq, hq.size() * 4));
      CHECK(cudaMalloc(&scores, static_cast<size_t>(s.n) * q * 4));
      CHECK(cudaMemcpy(dq, hq.data(), hq.size() * 4, cudaMemcpyHostToDevice));
      const double ms = TimeMs([&] {
        CHECK(gpu::LaunchScore(gpu::StoreType::kF16, store, s.n, s.k, dq, q, scores, nullptr));
      });
      rows.push_back({"scan kernel, q=" + std::to_string(q), shape, ms, store_gb / ms * 1e3,
                      std::to_string(static_cast<int>(100 * store_gb / ms * 1e3 / d2d + 0.5)) + "% of d2d"});
      const double bms = TimeMs([&] {
        CHECK(gpu::LaunchScore(gpu::StoreType::kBF16, store, s.n, s.k, dq, q, scores, nullptr));
      });
      rows.push_back({"scan kernel bf16, q=" + std::to_string(q), shape, bms, store_gb / bms * 1e3,
                      std::to_string(static_cast<int>(100 * store_gb / bms * 1e3 / d2d + 0.5)) + "% of d2d"});
#if RAPIDIN_HAVE_CUBLAS
      {
        cublasHandle_t h;
        if (cublasCreate(&h) == CUBLAS_STATUS_SUCCESS) {
          std::vector<uint16_t> hq16(hq.size());
          for (size_t i = 0; i < hq.size(); ++i) hq16[i] = kernels::FloatToHalf(hq[i]);
          uint16_t* dq16;
          CHECK(cudaMalloc(&dq16, hq16.size() * 2));
          CHECK(cudaMemcpy(dq16, hq16.data(), hq16.size() * 2, cudaMemcpyHostToDevice));
          const float one = 1, zero = 0;
          bool ok = true;
          const double cms = TimeMs([&] {
            // scores (n x q, column-major) = store^T (n x k) * queries (k x q)
            ok &= cublasGemmEx(h, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(s.n), q, static_cast<int>(s.k), &one,
                               store, CUDA_R_16F, static_cast<int>(s.k), dq16, CUDA_R_16F, static_cast<int>(s.k),
                               &zero, scores, CUDA_R_32F, static_cast<int>(s.n), CUBLAS_COMPUTE_32F,
                               CUBLAS_GEMM_DEFAULT) == CUBLAS_STATUS_SUCCESS;
          });
          if (ok) {
            rows.push_back({"cuBLAS GemmEx fp16 (peer), q=" + std::to_string(q), shape, cms, store_gb / cms * 1e3,
                            "rapidin " + std::to_string(cms / ms).substr(0, 4) + "x faster"});
          }
          cudaFree(dq16);
          cublasDestroy(h);
        }
      }
#endif
      CHECK(cudaFree(dq));
      CHECK(cudaFree(scores));
      // Scan + top-k through the scanner (hot shard: rows already in device memory).
      {
        kernels::GpuOptions o;
        std::unique_ptr<gpu::Scanner> sc;
        st = gpu::Scanner::Create(s.k, o, &sc);
        if (!st.ok()) {
          std::printf("scanner: %s\n", st.ToString().c_str());
          return 1;
        }
        // The bench hands the scanner a host copy only to sync; reuse a device->host copy of the store.
        std::vector<uint16_t> host(elems);
        CHECK(cudaMemcpy(host.data(), store, elems * 2, cudaMemcpyDeviceToHost));
        CHECK(cudaFree(store));
        store = nullptr;
        if (!sc->Place({elems * 2}).ok() || !sc->shard_hot(0)) {
          std::printf("scanner: shard does not fit the hot tier\n");
          return 1;
        }
        kernels::ShardRows sr{host.data(), s.n, s.k, 0, 1, 1, 0};
        if (!(st = sc->Sync(0, sr)).ok() || !(st = sc->SetQueries(hq.data(), q)).ok()) {
          std::printf("scanner: %s\n", st.ToString().c_str());
          return 1;
        }
        std::vector<std::vector<kernels::Candidate>> h, m;
        const double tms = TimeMs([&] {
          if (!(st = sc->ScanShard(0, sr, 10, 10, &h, &m)).ok()) {
            std::printf("scan: %s\n", st.ToString().c_str());
            std::exit(1);
          }
        });
        rows.push_back({"scan + top-10 both ends (hot), q=" + std::to_string(q), shape, tms, store_gb / tms * 1e3,
                        std::to_string(static_cast<int>(100 * store_gb / tms * 1e3 / d2d + 0.5)) + "% of d2d"});
        // Warm tier: the same shard streamed from pinned host memory.
        if (q == 1) {
          kernels::GpuOptions wo;
          wo.hot_limit_bytes = 0;
          std::unique_ptr<gpu::Scanner> wsc;
          uint16_t* pinned = static_cast<uint16_t*>(gpu::PinnedAlloc(elems * 2));
          if (pinned != nullptr && gpu::Scanner::Create(s.k, wo, &wsc).ok() && wsc->Place({elems * 2}).ok()) {
            std::memcpy(pinned, host.data(), elems * 2);
            kernels::ShardRows wr{pinned, s.n, s.k, 0, 1, 1, 0};
            if ((st = wsc->SetQueries(hq.data(), q)).ok()) {
              const double wms = TimeMs([&] {
                if (!(st = wsc->ScanShard(0, wr, 10, 10, &h, &m)).ok()) {
                  std::printf("warm scan: %s\n", st.ToString().c_str());
                  std::exit(1);
                }
              }, 3, 1);
              rows.push_back({"warm: streamed from pinned host, q=1", shape, wms, store_gb / wms * 1e3,
                              std::to_string(static_cast<int>(100 * store_gb / wms * 1e3 / h2d + 0.5)) +
                                  "% of pinned h2d"});
            }
          }
          gpu::PinnedFree(pinned);
        }
        CHECK(cudaMalloc(&store, elems * 2));
        CHECK(cudaMemcpy(store, host.data(), elems * 2, cudaMemcpyHostToDevice));
      }
    }
    CHECK(cudaFree(store));
  }

  // Sketch on the device: GB/s of gradient read (the CPU memo path: bench/results/scan.md, sketch section).
  for (int64_t d : {int64_t{259328}, int64_t{4} << 20, int64_t{32} << 20}) {
    if (quick && d > 259328) break;
    auto cpu = kernels::RapidGrad::Create({d, 4096, 4, 1});
    std::unique_ptr<gpu::GpuSketch> g;
    if (cpu == nullptr || !(st = gpu::GpuSketch::Create(*cpu, 0, &g)).ok()) {
      std::printf("sketch: %s\n", st.ToString().c_str());
      return 1;
    }
    const int batch = 16;
    float *x, *out;
    CHECK(cudaMalloc(&x, static_cast<size_t>(batch) * d * 4));
    CHECK(cudaMalloc(&out, static_cast<size_t>(batch) * 4096 * 4));
    CHECK(cudaMemset(x, 0x3c, static_cast<size_t>(batch) * d * 4));
    const double ms = TimeMs([&] {
      if (!(st = g->ApplyDevice(x, batch, out, nullptr)).ok()) {
        std::printf("sketch: %s\n", st.ToString().c_str());
        std::exit(1);
      }
    });
    const double gb = static_cast<double>(batch) * d * 4 / 1e9;
    rows.push_back({"RapidGrad sketch, batch 16", "d=" + std::to_string(d) + ", K=4096", ms, gb / ms * 1e3,
                    std::to_string(static_cast<int>(100 * gb / ms * 1e3 / d2d + 0.5)) + "% of d2d"});
    cudaFree(x);
    cudaFree(out);
  }

  std::printf("\n| what | shape (rows x K) | ms (median) | GB/s | share |\n|---|---|---|---|---|\n");
  for (const Row& r : rows) {
    std::printf("| %s | %s | %.3f | %.1f | %s |\n", r.what.c_str(), r.shape.c_str(), r.ms, r.gbs, r.ref.c_str());
  }
  return 0;
}
