// Scan benchmark: how close does scoring get to the machine's memory read bandwidth, and how does it compare
// with FAISS IndexFlatIP / IndexScalarQuantizer(fp16) and LibTorch matmul+topk on the same data?
//
// Usage: scan_bench [--quick] [--threads T] [--out FILE.md]
// Everything is measured in one run, so the ratios are comparable even on a noisy machine.
#include <faiss/IndexFlat.h>
#include <faiss/IndexScalarQuantizer.h>
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <functional>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_format.h"
#include "bench/bench_util.h"
#include "bench/torch_baseline.h"
#include "kernels/half.h"
#include "kernels/score.h"

namespace {

using Clock = std::chrono::steady_clock;
using rapidin::bench::AlignedAlloc;
using rapidin::bench::Median;
using rapidin::bench::Parallel;
using rapidin::bench::ReadBandwidth;

struct Row {
  std::string shape, method;
  int nq;
  double ms, gbs_fp16, ratio_bw;
  std::string note;
};

}  // namespace

int main(int argc, char** argv) {
  bool quick = false;
  int threads = static_cast<int>(std::thread::hardware_concurrency());
  std::string out = "bench/results/scan.md";
  for (int i = 1; i < argc; ++i) {
    if (!std::strcmp(argv[i], "--quick")) quick = true;
    else if (!std::strcmp(argv[i], "--threads") && i + 1 < argc) threads = std::atoi(argv[++i]);
    else if (!std::strcmp(argv[i], "--out") && i + 1 < argc) out = argv[++i];
    else {
      std::fprintf(stderr, "usage: scan_bench [--quick] [--threads T] [--out FILE.md]\n");
      return 2;
    }
  }
  std::setvbuf(stdout, nullptr, _IOLBF, 0);  // progress shows when piped to a file
  omp_set_num_threads(threads);
  const int reps = quick ? 3 : 7;
  const double bw = ReadBandwidth(threads, quick ? (size_t{1} << 30) : (size_t{4} << 30), reps);
  std::printf("memory read bandwidth (%d threads): %.2f GB/s\n", threads, bw);

  struct Shape {
    int64_t n, k;
  };
  std::vector<Shape> shapes = quick ? std::vector<Shape>{{20000, 4096}, {2000, 65536}}
                                    : std::vector<Shape>{{100000, 4096}, {20000, 65536}};
  std::vector<Row> rows;
  const auto impl = rapidin::kernels::ResolveImpl(rapidin::kernels::ScoreImpl::kAuto);
  std::mt19937_64 rng(42);
  std::normal_distribution<float> g;
  for (const auto& [n, k] : shapes) {
    const std::string shape = absl::StrFormat("N=%d x K=%d", n, k);
    std::printf("== %s: generating %.2f GB fp16 store\n", shape.c_str(), n * k * 2 / 1e9);
    // fp16 store, split row-wise into one contiguous shard per thread (as the host tier does).
    uint16_t* store = AlignedAlloc<uint16_t>(static_cast<size_t>(n) * k);
    float* store32 = AlignedAlloc<float>(static_cast<size_t>(n) * k);
    Parallel(threads, [&](int t) {
      std::mt19937_64 r(t * 7919 + k);
      std::normal_distribution<float> gg;
      for (int64_t i = n * k * t / threads; i < n * k * (t + 1) / threads; ++i) {
        store[i] = rapidin::kernels::FloatToHalf(gg(r) * 0.01f);
        store32[i] = rapidin::kernels::HalfToFloat(store[i]);
      }
    });
    const double store_bytes = static_cast<double>(n) * k * 2;
    for (int nq : {1, 8}) {
      std::vector<float> q(static_cast<size_t>(nq) * k);
      for (auto& x : q) x = g(rng);
      const int top_k = 10;
      auto add = [&](const std::string& method, const std::vector<double>& times, const std::string& note) {
        const double t = Median(times);
        rows.push_back({shape, method, nq, t * 1e3, store_bytes / t / 1e9, store_bytes / t / 1e9 / bw, note});
        std::printf("  %-34s nq=%d  %9.2f ms  %7.2f GB/s (fp16 bytes)  %5.1f%% of read bw  %s\n", method.c_str(),
                    nq, t * 1e3, store_bytes / t / 1e9, 100 * store_bytes / t / 1e9 / bw, note.c_str());
      };
      // rapidin: one worker per shard, ScanTopK (score + both-end top-k), then the merge.
      int64_t ours_top1 = -1;
      {
        std::vector<double> times;
        for (int r = 0; r < reps; ++r) {
          std::vector<std::vector<rapidin::kernels::TopK>> help(threads), harm(threads);
          times.push_back(Parallel(threads, [&](int t) {
            const int64_t lo = n * t / threads, hi = n * (t + 1) / threads;
            for (int j = 0; j < nq; ++j) {
              help[t].emplace_back(top_k, true);
              harm[t].emplace_back(top_k, false);
            }
            (void)rapidin::kernels::ScanTopK(store + lo * k, hi - lo, k, q.data(), nq, lo, 1, &help[t], &harm[t],
                                             impl);
          }));
          std::vector<std::vector<rapidin::kernels::Candidate>> parts;
          for (auto& h : help) parts.push_back(h[0].Sorted());
          ours_top1 = rapidin::kernels::MergeTopK(parts, top_k, true)[0].index;
        }
        add(absl::StrFormat("rapidin %s (%d shards)", rapidin::kernels::ImplName(impl), threads), times, "");
      }
      // LibTorch: fp32 matmul + topk at both ends.
      {
        int64_t top1 = -1;
        auto times = rapidin::bench::TorchMatmulTopK(store32, n, k, q.data(), nq, top_k, reps, threads, &top1);
        add("libtorch matmul+topk (fp32)", times, top1 == ours_top1 ? "same top-1" : "TOP-1 DIFFERS");
      }
      // FAISS IndexFlatIP (fp32: reads twice the bytes) and IndexScalarQuantizer fp16 (same bytes as ours).
      auto faiss_run = [&](faiss::Index& index, const std::string& method) {
        std::vector<float> d(static_cast<size_t>(nq) * top_k);
        std::vector<faiss::Index::idx_t> ids(static_cast<size_t>(nq) * top_k);
        std::vector<double> times;
        for (int r = 0; r < reps; ++r) {
          const auto t0 = Clock::now();
          index.search(nq, q.data(), top_k, d.data(), ids.data());
          times.push_back(std::chrono::duration<double>(Clock::now() - t0).count());
        }
        add(method, times, ids[0] == ours_top1 ? "same top-1" : "TOP-1 DIFFERS");
      };
      {
        faiss::IndexFlatIP flat(k);
        flat.add(n, store32);
        faiss_run(flat, "faiss IndexFlatIP (fp32, helpful only)");
      }
      {
        faiss::IndexScalarQuantizer sq(k, faiss::ScalarQuantizer::QT_fp16, faiss::METRIC_INNER_PRODUCT);
        sq.train(std::min<int64_t>(n, 1000), store32);
        sq.add(n, store32);
        faiss_run(sq, "faiss IndexScalarQuantizer fp16");
      }
    }
    std::free(store);
    std::free(store32);
  }

  std::ofstream md(out);
  if (!md) {
    std::fprintf(stderr, "cannot write %s\n", out.c_str());
    return 1;
  }
  md << "# Scan benchmark\n\n";
  md << absl::StrFormat("Generated by `build/bench/scan_bench%s --threads %d`. Median of %d runs. ",
                        quick ? " --quick" : "", threads, reps);
  md << "GB/s counts the fp16 store's bytes (N x K x 2) for every method, so the columns compare time for the "
        "same question; FAISS IndexFlatIP and LibTorch actually read fp32 (twice the bytes). rapidin and LibTorch "
        "return both ends (helpful and harmful); FAISS returns the helpful end only. top_k = 10.\n\n";
  md << absl::StrFormat("Memory read bandwidth (STREAM-like sum, %d threads): **%.2f GB/s**\n\n", threads, bw);
  md << "| shape | method | query vectors | ms / query batch | GB/s (fp16 store) | % of read bandwidth | check |\n";
  md << "|---|---|---|---|---|---|---|\n";
  for (const auto& r : rows) {
    md << absl::StrFormat("| %s | %s | %d | %.2f | %.2f | %.0f%% | %s |\n", r.shape, r.method, r.nq, r.ms, r.gbs_fp16,
                          100 * r.ratio_bw, r.note);
  }
  md << "\n| shape | query vectors | rapidin speed-up vs libtorch | vs faiss Flat | vs faiss SQfp16 |\n|---|---|---|---|---|\n";
  for (size_t i = 0; i + 3 < rows.size(); i += 4) {
    md << absl::StrFormat("| %s | %d | %.2fx | %.2fx | %.2fx |\n", rows[i].shape, rows[i].nq, rows[i + 1].ms / rows[i].ms,
                          rows[i + 2].ms / rows[i].ms, rows[i + 3].ms / rows[i].ms);
  }
  std::printf("wrote %s\n", out.c_str());
  return 0;
}
