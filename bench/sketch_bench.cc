// RapidGrad sketch throughput: GB/s of gradient read (D x 4 bytes) against the machine's one-thread read
// bandwidth, for the memo-table path and the on-the-fly path. Usage: sketch_bench [--quick]
#include <chrono>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "bench/bench_util.h"
#include "kernels/rapidgrad.h"

int main(int argc, char** argv) {
  const bool quick = argc > 1 && !std::strcmp(argv[1], "--quick");
  const double bw1 = rapidin::bench::ReadBandwidth(1, size_t{1} << 30, quick ? 3 : 5);
  std::printf("read bandwidth, 1 thread: %.2f GB/s\n", bw1);
  std::printf("| D | K | path | ms / vector | GB/s of gradient read | %% of 1-thread read bandwidth |\n|---|---|---|---|---|---|\n");
  for (int64_t d : {int64_t{259328}, int64_t{4} << 20, int64_t{32} << 20}) {
    auto g = rapidin::kernels::RapidGrad::Create({d, 4096, 4, 1});
    if (g == nullptr) return 1;
    std::vector<float> x(d), out(4096);
    std::mt19937 rng(1);
    std::normal_distribution<float> n;
    for (auto& v : x) v = n(rng);
    for (int path = 0; path < 2; ++path) {
      std::vector<double> times;
      const int reps = path == 0 ? 7 : 3;
      for (int r = 0; r < reps; ++r) {
        const auto t0 = std::chrono::steady_clock::now();
        if (path == 0) g->Apply(x.data(), out.data());
        else g->ApplyOnTheFly(x.data(), out.data());
        times.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
      }
      const double t = rapidin::bench::Median(times);
      const double gbs = d * 4.0 / t / 1e9;
      std::printf("| %lld | 4096 | %s | %.3f | %.2f | %.0f%% |\n", static_cast<long long>(d),
                  path == 0 ? "memo table" : "on the fly", t * 1e3, gbs, 100 * gbs / bw1);
    }
  }
  return 0;
}
