// Token-wise gradients on stories260K: one backward pass per token (the reference) versus batched copies of the
// sequence, for the response tokens of a real Alpaca-style record. Usage: token_bench MODEL_DIR_OR_BIN [--quick]
#include <chrono>
#include <cstdio>
#include <cstring>

#include "bench/bench_util.h"
#include "model/engine.h"

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr, "usage: token_bench stories260K.bin [--quick]\n");
    return 2;
  }
  const bool quick = argc > 2 && !std::strcmp(argv[2], "--quick");
  rapidin::model::SetComputeThreads(1);
  rapidin::model::EngineOptions o;
  o.model_path = argv[1];
  std::string tok = o.model_path.substr(0, o.model_path.find_last_of('/') + 1) + "tok512.bin";
  o.tokenizer_path = tok;
  auto e = rapidin::model::GradientEngine::Load(o);
  if (!e.ok()) {
    std::fprintf(stderr, "%s\n", e.status().ToString().c_str());
    return 1;
  }
  rapidin::model::Example ex{"Give three tips for staying healthy.", "",
                             "1. Eat a balanced diet and make sure to include plenty of fruits and vegetables. 2. "
                             "Exercise regularly to keep your body active and strong. 3. Get enough sleep."};
  auto t = (*e)->Tokenize(ex);
  if (!t.ok()) return 1;
  const int n = static_cast<int>(t->ids.size()) - t->response_begin;
  std::printf("| record tokens | response tokens | copies per pass | threads | ms total | ms per token | speed-up |\n");
  std::printf("|---|---|---|---|---|---|---|\n");
  double base = 0;
  const std::vector<std::pair<int, int>> configs = {{1, 1}, {4, 1}, {8, 1}, {16, 1}, {1, 2}};
  for (const auto& [chunk, threads] : configs) {
    std::vector<double> times;
    for (int r = 0; r < (quick ? 1 : 3); ++r) {
      std::vector<std::vector<double>> g;
      const auto t0 = std::chrono::steady_clock::now();
      if (!(*e)->TokenGradientsIds(t->ids, t->response_begin, true, chunk, &g, threads).ok()) return 1;
      times.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    }
    const double s = rapidin::bench::Median(times);
    if (chunk == 1 && threads == 1) base = s;
    std::printf("| %zu | %d | %d | %d | %.1f | %.2f | %.2fx |\n", t->ids.size(), n, chunk, threads, s * 1e3,
                s * 1e3 / n, base / s);
  }
  return 0;
}
