// Scan benchmark: how close does scoring get to the machine's memory read bandwidth, and how does it compare
// with FAISS IndexFlatIP / IndexScalarQuantizer(fp16) and LibTorch matmul+topk on the same data?
//
// Usage: scan_bench [--quick] [--threads T] [--out FILE.md]
// Everything is measured in one run, so the ratios are comparable even on a noisy machine.
#include <faiss/IndexFlat.h>
#include <faiss/IndexScalarQuantizer.h>
#include <faiss/utils/utils.h>
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <functional>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_format.h"
#include "bench/bench_util.h"
#include "bench/torch_baseline.h"
#include "kernels/half.h"
#include "kernels/internal/score_impl.h"
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

// An n x k fp16 store of N(0, 0.01^2) values (and, when store32 is given, the same values as fp32), filled by
// `threads` threads, each first-touching the contiguous shard it will scan (as the host tier does).
uint16_t* MakeStore(int64_t n, int64_t k, int threads, float** store32 = nullptr) {
  uint16_t* store = AlignedAlloc<uint16_t>(static_cast<size_t>(n) * k);
  float* s32 = store32 ? AlignedAlloc<float>(static_cast<size_t>(n) * k) : nullptr;
  Parallel(threads, [&](int t) {
    std::mt19937_64 r(t * 7919 + k);
    std::normal_distribution<float> gg;
    for (int64_t i = n * k * t / threads; i < n * k * (t + 1) / threads; ++i) {
      store[i] = rapidin::kernels::FloatToHalf(gg(r) * 0.01f);
      if (s32) s32[i] = rapidin::kernels::HalfToFloat(store[i]);
    }
  });
  if (store32) *store32 = s32;
  return store;
}

// The kernel's arithmetic ceiling: ScoreF16 on a store that stays in L1 (48 rows x 1024), 32 query vectors,
// repeated on every thread. GFLOP/s counts a multiply-add as 2.
double KernelPeakGflops(int threads) {
  const int64_t n = 48, k = 1024;
  const int q = 32, reps = 400;
  std::vector<double> best(threads, 0);
  Parallel(threads, [&](int t) {
    std::vector<uint16_t> store(n * k);
    std::vector<float> qs(q * k), out(n * q);
    for (size_t i = 0; i < store.size(); ++i) store[i] = rapidin::kernels::FloatToHalf(0.001f * (i % 97));
    for (size_t i = 0; i < qs.size(); ++i) qs[i] = 0.01f * (i % 89);
    for (int round = 0; round < 3; ++round) {
      const auto t0 = Clock::now();
      for (int r = 0; r < reps; ++r) (void)rapidin::kernels::ScoreF16(store.data(), n, k, qs.data(), q, out.data());
      const double s = std::chrono::duration<double>(Clock::now() - t0).count();
      best[t] = std::max(best[t], 2.0 * n * k * q * reps / s / 1e9);
    }
  });
  double sum = 0;
  for (double b : best) sum += b;
  return sum;
}

// The machine's multiply-add ceiling: 12 independent register-only 16-lane FMA chains per thread (0 without
// AVX-512F: the floor column is then left out). No scan of n x k x q can take less than 2 n k q / this many
// seconds, whatever its memory.
__attribute__((target("avx512f"))) double FmaChains512(int64_t iters) {
  __m512 a[12];
  const __m512 m = _mm512_set1_ps(0.999f), b = _mm512_set1_ps(1e-3f);
  for (int i = 0; i < 12; ++i) a[i] = _mm512_set1_ps(static_cast<float>(i));
  for (int64_t it = 0; it < iters; ++it) {
    for (int i = 0; i < 12; ++i) a[i] = _mm512_fmadd_ps(a[i], m, b);
  }
  float s = 0;
  for (int i = 0; i < 12; ++i) s += _mm512_reduce_add_ps(a[i]);
  return s;
}
double FmaPeakGflops(int threads) {
  __builtin_cpu_init();
  if (!__builtin_cpu_supports("avx512f")) return 0;
  const int64_t iters = 20'000'000;
  std::vector<double> best(threads, 0);
  std::vector<double> sink(threads, 0);
  Parallel(threads, [&](int t) {
    for (int round = 0; round < 3; ++round) {
      const auto t0 = Clock::now();
      sink[t] += FmaChains512(iters);
      const double s = std::chrono::duration<double>(Clock::now() - t0).count();
      best[t] = std::max(best[t], 2.0 * 12 * 16 * iters / s / 1e9);
    }
  });
  double sum = 0;
  for (double b : best) sum += b;
  return sink[0] == 12345.f ? 0 : sum;  // keeps the chains alive
}

// --kernel-only: rapidin's scan for 1, 8, 16 and 32 query vectors, now and with the earlier loop order
// (--before's path, rapidin::kernels::internal::g_score_before) in the same run, against the read bandwidth
// and the kernel's arithmetic peak.
// One timed pass of rapidin's scan as the server runs it: the store split into `threads` contiguous shards, each
// scanned by ScanTopK with top_k at both ends on its own thread. Returns the seconds; *helpful gets each shard's
// helpful selectors (one per query vector).
double TimedScan(const uint16_t* store, int64_t n, int64_t k, const float* q, int nq, int top_k, int threads,
                 rapidin::kernels::ScoreImpl impl, std::vector<std::vector<rapidin::kernels::TopK>>* helpful) {
  std::vector<std::vector<rapidin::kernels::TopK>> help(threads), harm(threads);
  const double t = Parallel(threads, [&](int w) {
    const int64_t lo = n * w / threads, hi = n * (w + 1) / threads;
    for (int j = 0; j < nq; ++j) {
      help[w].emplace_back(top_k, true);
      harm[w].emplace_back(top_k, false);
    }
    (void)rapidin::kernels::ScanTopK(store + lo * k, hi - lo, k, q, nq, lo, 1, &help[w], &harm[w], impl);
  });
  *helpful = std::move(help);
  return t;
}

int KernelOnly(int threads, int reps, double bw, bool quick, const std::string& out, const std::string& json_out) {
  const double peak = KernelPeakGflops(threads);
  std::printf("kernel arithmetic peak (L1-resident, %d threads): %.1f GFLOP/s\n", threads, peak);
  const double fma_peak = FmaPeakGflops(threads);
  std::printf("multiply-add peak (register-only FMAs, %d threads): %.1f GFLOP/s\n", threads, fma_peak);
  const auto impl = rapidin::kernels::ResolveImpl(rapidin::kernels::ScoreImpl::kAuto);
  struct KRow {
    std::string shape;
    int nq;
    double now_ms, before_ms;
  };
  std::vector<KRow> rows;
  std::vector<std::pair<int64_t, int64_t>> shapes =
      quick ? std::vector<std::pair<int64_t, int64_t>>{{20000, 4096}} : std::vector<std::pair<int64_t, int64_t>>{{100000, 4096}, {10000, 65536}};
  std::mt19937_64 rng(42);
  std::normal_distribution<float> g;
  for (const auto& [n, k] : shapes) {
    const std::string shape = absl::StrFormat("N=%d x K=%d", n, k);
    uint16_t* store = MakeStore(n, k, threads);
    for (int nq : {1, 8, 16, 32}) {
      std::vector<float> q(static_cast<size_t>(nq) * k);
      for (auto& x : q) x = g(rng);
      std::vector<std::vector<float>> answers(2);
      double ms[2];
      for (int before = 0; before < 2; ++before) {
        rapidin::kernels::internal::g_score_before = before == 1;
        std::vector<double> times;
        for (int r = 0; r < reps; ++r) {
          std::vector<std::vector<rapidin::kernels::TopK>> help;
          times.push_back(TimedScan(store, n, k, q.data(), nq, 10, threads, impl, &help));
          if (r == 0) {
            for (int j = 0; j < nq; ++j) {
              for (const auto& c : help[0][j].Sorted()) answers[before].push_back(c.score);
            }
          }
        }
        ms[before] = Median(times) * 1e3;
      }
      rapidin::kernels::internal::g_score_before = false;
      if (answers[0] != answers[1]) {
        std::fprintf(stderr, "the two loop orders disagree at %s nq=%d\n", shape.c_str(), nq);
        return 1;
      }
      rows.push_back({shape, nq, ms[0], ms[1]});
      std::printf("  %s nq=%2d  now %8.2f ms  before %8.2f ms\n", shape.c_str(), nq, ms[0], ms[1]);
    }
    std::free(store);
  }
  std::ofstream md(out);
  md << "# Scan kernel: query vectors sharing one scan\n\n";
  md << absl::StrFormat("Generated by `build/bench/scan_bench --kernel-only%s --threads %d` (median of %d runs; "
                        "rapidin's ScanTopK over %d shards, both ends, top_k 10). \"before\" is the AVX2 kernel as "
                        "it was (3-row x 4-query tiles, each block of 4 query vectors walking every row), run in the "
                        "same process; the two give identical top-k scores (checked).\n\n",
                        quick ? " --quick" : "", threads, reps, threads);
  md << absl::StrFormat("Read bandwidth: **%.2f GB/s**. Kernel arithmetic peak (ScoreF16 on an L1-resident store, %d "
                        "threads): **%.1f GFLOP/s**. Multiply-add peak (register-only FMA chains, %d threads): **%.1f GFLOP/s**; "
                        "\"floor / 1 vector\" is the least ratio these two machine limits allow: max(bytes / read "
                        "bandwidth, 2 N K q / multiply-add peak) over the one-vector time measured here.\n\n",
                        bw, threads, peak, threads, fma_peak);
  md << "| shape | query vectors | ms now | ms before | now / 1 vector | floor / 1 vector | % of read bandwidth | "
        "% of kernel peak | % of multiply-add peak |\n";
  md << "|---|---|---|---|---|---|---|---|---|\n";
  for (const auto& r : rows) {
    const KRow& one = *std::find_if(rows.begin(), rows.end(), [&](const KRow& x) { return x.shape == r.shape && x.nq == 1; });
    int64_t n = 0, k = 0;
    std::sscanf(r.shape.c_str(), "N=%ld x K=%ld", &n, &k);
    const double bytes = 2.0 * n * k, flops = 2.0 * n * k * r.nq;
    const double floor_ms = std::max(bytes / bw / 1e6, fma_peak > 0 ? flops / fma_peak / 1e6 : 0.0);
    md << absl::StrFormat("| %s | %d | %.2f | %.2f | %.2fx | %.2fx | %.0f%% | %.0f%% | %.0f%% |\n", r.shape, r.nq,
                          r.now_ms, r.before_ms, r.now_ms / one.now_ms, floor_ms / one.now_ms,
                          100 * bytes / (r.now_ms / 1e3) / 1e9 / bw, 100 * flops / (r.now_ms / 1e3) / 1e9 / peak,
                          fma_peak > 0 ? 100 * flops / (r.now_ms / 1e3) / 1e9 / fma_peak : 0.0);
  }
  std::printf("wrote %s\n", out.c_str());
  if (!json_out.empty()) {
    nlohmann::json j = {{"read_gbps", bw}, {"kernel_peak_gflops", peak}, {"fma_peak_gflops", fma_peak}};
    for (const auto& r : rows) {
      const char* suffix = r.shape == "N=100000 x K=4096" ? "" : r.shape == "N=10000 x K=65536" ? "_k65536" : nullptr;
      if (!suffix) continue;
      j[absl::StrFormat("scan_ms_%d%s", r.nq, suffix)] = r.now_ms;
      j[absl::StrFormat("scan_ms_%d%s_before", r.nq, suffix)] = r.before_ms;
    }
    std::ofstream(json_out) << j.dump(1) << "\n";
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  bool quick = false;
  bool kernel_only = false;  // rapidin's scan only (now and before), no peers
  // A Python with PyPI's faiss-cpu: bench/peers/faiss_scan.py runs on this benchmark's own store and queries.
  std::string faiss_python;
  std::string json_out;  // key figures for bench/results/perf.json (bench/run-all.sh)
  int threads = static_cast<int>(std::thread::hardware_concurrency());
  std::string out = "bench/results/scan.md";
  for (int i = 1; i < argc; ++i) {
    if (!std::strcmp(argv[i], "--quick")) quick = true;
    else if (!std::strcmp(argv[i], "--kernel-only")) kernel_only = true;
    else if (!std::strcmp(argv[i], "--faiss-python") && i + 1 < argc) faiss_python = argv[++i];
    else if (!std::strcmp(argv[i], "--json") && i + 1 < argc) json_out = argv[++i];
    else if (!std::strcmp(argv[i], "--threads") && i + 1 < argc) threads = std::atoi(argv[++i]);
    else if (!std::strcmp(argv[i], "--out") && i + 1 < argc) out = argv[++i];
    else {
      std::fprintf(stderr,
                   "usage: scan_bench [--quick] [--kernel-only] [--faiss-python PY] [--threads T] [--out FILE.md]\n");
      return 2;
    }
  }
  std::setvbuf(stdout, nullptr, _IOLBF, 0);  // progress shows when piped to a file
  omp_set_num_threads(threads);
  const int reps = quick ? 3 : 7;
  const double bw = ReadBandwidth(threads, quick ? (size_t{1} << 30) : (size_t{4} << 30), reps);
  std::printf("memory read bandwidth (%d threads): %.2f GB/s\n", threads, bw);

  if (kernel_only) {
    return KernelOnly(threads, reps, bw, quick, out == "bench/results/scan.md" ? "bench/results/scan-kernel.md" : out,
                      json_out);
  }
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
    float* store32 = nullptr;  // the same values in fp32, for the peers that read fp32
    uint16_t* store = MakeStore(n, k, threads, &store32);
    const double store_bytes = static_cast<double>(n) * k * 2;
    std::vector<float> all_q(static_cast<size_t>(8) * k);  // the first nq of these for each query count
    for (auto& x : all_q) x = g(rng);
    // PyPI's faiss-cpu on the same store and queries (its own process: a different FAISS build than the one linked).
    std::map<std::pair<std::string, int>, std::pair<double, int64_t>> pypi;  // (method, nq) -> (ms, top-1)
    std::string pypi_version;
    if (!faiss_python.empty()) {
      const std::string sp = "/tmp/rapidin_scan_store.f16", qp = "/tmp/rapidin_scan_queries.f32";
      std::ofstream(sp, std::ios::binary).write(reinterpret_cast<const char*>(store), n * k * 2);
      std::ofstream(qp, std::ios::binary).write(reinterpret_cast<const char*>(all_q.data()), all_q.size() * 4);
      const std::string cmd = absl::StrFormat("%s bench/peers/faiss_scan.py %s %s %d %d 1,8 %d %d", faiss_python, sp,
                                              qp, n, k, threads, reps);
      std::printf("  running %s\n", cmd.c_str());
      FILE* pipe = popen(cmd.c_str(), "r");
      char line[8192];
      while (pipe && std::fgets(line, sizeof line, pipe)) {
        auto j = nlohmann::json::parse(line, nullptr, false);
        if (j.is_discarded()) continue;
        pypi[{j["method"].get<std::string>(), j["nq"].get<int>()}] = {j["ms"].get<double>(), j["top1"].get<int64_t>()};
        pypi_version = absl::StrFormat("faiss-cpu %s PyPI (%s)", j["version"].get<std::string>(),
                                       j["simd"].get<std::string>());
      }
      if (!pipe || pclose(pipe) != 0) std::fprintf(stderr, "faiss_scan.py failed; PyPI rows left out\n");
      std::remove(sp.c_str());
      std::remove(qp.c_str());
    }
    // The linked FAISS: Debian's libfaiss, its version and compile options (its SIMD level).
    const std::string debian_faiss = absl::StrFormat("faiss %d.%d.%d Debian (%s)", FAISS_VERSION_MAJOR,
                                                     FAISS_VERSION_MINOR, FAISS_VERSION_PATCH,
                                                     absl::StripAsciiWhitespace(faiss::get_compile_options()));
    for (int nq : {1, 8}) {
      std::vector<float> q(all_q.begin(), all_q.begin() + static_cast<int64_t>(nq) * k);
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
          std::vector<std::vector<rapidin::kernels::TopK>> help;
          times.push_back(TimedScan(store, n, k, q.data(), nq, top_k, threads, impl, &help));
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
        faiss_run(flat, debian_faiss + " IndexFlatIP (fp32, helpful only)");
      }
      {
        faiss::IndexScalarQuantizer sq(k, faiss::ScalarQuantizer::QT_fp16, faiss::METRIC_INNER_PRODUCT);
        sq.train(std::min<int64_t>(n, 1000), store32);
        sq.add(n, store32);
        faiss_run(sq, debian_faiss + " IndexScalarQuantizer fp16");
      }
      for (const char* m : {"IndexFlatIP (fp32, helpful only)", "IndexScalarQuantizer fp16"}) {
        auto it = pypi.find({m, nq});
        if (it == pypi.end()) continue;
        add(absl::StrFormat("%s %s", pypi_version, m), {it->second.first / 1e3},
            it->second.second == ours_top1 ? "same top-1" : "TOP-1 DIFFERS");
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
  md << absl::StrFormat("Generated by `build/bench/scan_bench%s%s --threads %d`. Median of %d runs. ",
                        quick ? " --quick" : "", faiss_python.empty() ? "" : " --faiss-python PY", threads, reps);
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
  md << "\nSpeed-up of rapidin's scan over each peer (the peer's time / rapidin's, same shape and query "
        "vectors):\n\n";
  md << "| shape | query vectors | peer | rapidin speed-up |\n|---|---|---|---|\n";
  for (const auto& r : rows) {
    if (absl::StartsWith(r.method, "rapidin")) continue;
    for (const auto& o : rows) {
      if (o.shape == r.shape && o.nq == r.nq && absl::StartsWith(o.method, "rapidin")) {
        md << absl::StrFormat("| %s | %d | %s | %.2fx |\n", r.shape, r.nq, r.method, r.ms / o.ms);
      }
    }
  }
  std::printf("wrote %s\n", out.c_str());
  if (!json_out.empty()) {  // the N=100k x K=4096 figures of every method
    nlohmann::json j;
    for (const auto& r : rows) {
      if (r.shape != "N=100000 x K=4096") continue;
      std::string key;
      if (absl::StartsWith(r.method, "rapidin")) key = "rapidin";
      else if (absl::StrContains(r.method, "PyPI") && absl::StrContains(r.method, "IndexFlatIP")) key = "faiss_pypi_flat";
      else if (absl::StrContains(r.method, "PyPI")) key = "faiss_pypi_sqfp16";
      else if (absl::StrContains(r.method, "Debian") && absl::StrContains(r.method, "IndexFlatIP")) key = "faiss_debian_flat";
      else if (absl::StrContains(r.method, "Debian")) key = "faiss_debian_sqfp16";
      else key = "libtorch";
      j[absl::StrFormat("%s_ms_%d", key, r.nq)] = r.ms;
    }
    j["read_gbps"] = bw;
    std::ofstream(json_out) << j.dump(1) << "\n";
  }
  return 0;
}
