// Token-wise gradients on stories260K: the reference (one forward and one autograd backward pass per token),
// batched copies of the prefixes, the shared-forward hand-written backward in LibTorch (these three with
// grad_path "autograd"), and the direct pass (grad_path "direct": model/internal/llama_grad.h), for the response
// tokens of a real Alpaca-style record. Every float32 run is checked against the loop in float64 (largest absolute
// difference of the layer-wise normalised values); speed-ups are against the float32 loop.
// Usage: token_bench MODEL_DIR_OR_BIN [--quick] [--params REGEX] [--lora RANK] [--only ROW]
#include <malloc.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <tuple>

#include "absl/strings/str_format.h"
#include "bench/bench_util.h"
#include "model/engine.h"
#include "model/testing.h"
#include "model/training.h"

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr, "usage: token_bench stories260K.bin [--quick] [--params REGEX] [--lora RANK] [--only ROW]\n");
    return 2;
  }
  using rapidin::model::TokenGradMethod;
  bool quick = false;
  int lora = 0;
  int only = -1;  // run one configuration (its row number, from 0), for profiling
  rapidin::model::EngineOptions o;
  o.model_path = argv[1];
  for (int i = 2; i < argc; ++i) {
    if (!std::strcmp(argv[i], "--quick")) quick = true;
    else if (!std::strcmp(argv[i], "--params") && i + 1 < argc) o.param_pattern = argv[++i];
    else if (!std::strcmp(argv[i], "--lora") && i + 1 < argc) lora = std::atoi(argv[++i]);
    else if (!std::strcmp(argv[i], "--only") && i + 1 < argc) only = std::atoi(argv[++i]);
  }
  rapidin::model::SetComputeThreads(1);
  // As in `rapidin cache` and the server: large per-pass buffers stay in the heap (no mmap + page faults each).
  mallopt(M_MMAP_THRESHOLD, 32 << 20);
  mallopt(M_TRIM_THRESHOLD, 1 << 30);
  mallopt(M_TOP_PAD, 1 << 30);
  o.tokenizer_path = o.model_path.substr(0, o.model_path.find_last_of('/') + 1) + "tok512.bin";
  o.grad_path = "autograd";
  auto e = rapidin::model::GradientEngine::Load(o);
  o.grad_path = "direct";
  auto ed = rapidin::model::GradientEngine::Load(o);
  o.grad_path = "autograd";
  o.use_double = true;
  auto e64 = rapidin::model::GradientEngine::Load(o);
  if (!e.ok() || !ed.ok() || !e64.ok()) {
    std::fprintf(stderr, "%s %s\n", e.status().ToString().c_str(), ed.status().ToString().c_str());
    return 1;
  }
  if (lora > 0) {  // the direct pass does not apply to adapters: its rows fall back to autograd (and say so)
    rapidin::model::LoraConfig lc;
    lc.rank = lora;
    if (!rapidin::model::AddLora(ed->get(), lc).ok()) return 1;
    if (!rapidin::model::AddLora(e64->get(), lc).ok()) return 1;
  }
  if (lora > 0) {
    rapidin::model::LoraConfig lc;
    lc.rank = lora;
    if (!rapidin::model::AddLora(e->get(), lc).ok()) return 1;
    // B starts at zero, which would make every A gradient zero: give B small random values.
    std::srand(1);
    for (size_t p = 0; p < (*e)->params().size(); ++p) {
      if ((*e)->params()[p].name.find("lora_B") == std::string::npos) continue;
      for (int64_t i = 0; i < (*e)->params()[p].numel; ++i) {
        const double d = 0.01 * (std::rand() / double(RAND_MAX) - 0.5);
        (void)rapidin::model::testing::Perturb(e->get(), static_cast<int>(p), i, d);
        (void)rapidin::model::testing::Perturb(ed->get(), static_cast<int>(p), i, d);
        (void)rapidin::model::testing::Perturb(e64->get(), static_cast<int>(p), i, d);
      }
    }
  }
  rapidin::model::Example ex{"Give three tips for staying healthy.", "",
                             "1. Eat a balanced diet and make sure to include plenty of fruits and vegetables. 2. "
                             "Exercise regularly to keep your body active and strong. 3. Get enough sleep."};
  auto t = (*e)->Tokenize(ex);
  if (!t.ok()) return 1;
  const int n = static_cast<int>(t->ids.size()) - t->response_begin;
  std::printf("parameters: %s, %lld values per token gradient\n\n",
              lora ? "LoRA matrices" : (o.param_pattern.empty() ? "every weight matrix" : o.param_pattern.c_str()),
              static_cast<long long>((*e)->grad_dim()));
  std::printf("| method | gradient path | tokens per pass | threads | record tokens | response tokens | ms total | "
              "ms per token | speed-up | max abs diff vs float64 |\n");
  std::printf("|---|---|---|---|---|---|---|---|---|---|\n");
  const char* names[] = {"loop", "batched copies", "shared forward"};
  double base = 0;
  std::vector<std::vector<double>> ref;
  struct Config {
    int engine;  // 0: float32 autograd, 1: float32 direct, 2: float64 autograd (the reference)
    TokenGradMethod method;
    int chunk, threads;
  };
  const std::vector<Config> configs = {
      {2, TokenGradMethod::kLoop, 1, 1},   {0, TokenGradMethod::kLoop, 1, 1},   {0, TokenGradMethod::kCopies, 16, 1},
      {0, TokenGradMethod::kShared, 8, 1}, {0, TokenGradMethod::kShared, 16, 1}, {1, TokenGradMethod::kShared, 4, 1},
      {1, TokenGradMethod::kShared, 8, 1}, {1, TokenGradMethod::kShared, 16, 1}, {0, TokenGradMethod::kLoop, 1, 2},
      {0, TokenGradMethod::kShared, 8, 2}, {1, TokenGradMethod::kShared, 8, 2}};
  for (size_t row = 0; row < configs.size(); ++row) {
    if (only >= 0 && static_cast<int>(row) != only && row != 0) continue;  // row 0: the reference
    const Config& cf = configs[row];
    const rapidin::model::GradientEngine& eng = cf.engine == 2 ? **e64 : cf.engine == 1 ? **ed : **e;
    std::vector<double> times;
    std::vector<std::vector<double>> g;
    for (int r = 0; r < (quick ? 1 : 3); ++r) {
      rapidin::model::TokenGradOptions to;
      to.method = cf.method;
      to.chunk = cf.chunk;
      to.threads = cf.threads;
      const auto t0 = std::chrono::steady_clock::now();
      const auto st = eng.TokenGradientsIds(t->ids, t->response_begin, to, &g);
      times.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
      if (!st.ok()) {
        std::fprintf(stderr, "%s\n", st.ToString().c_str());
        return 1;
      }
    }
    if (ref.empty()) ref = g;
    double diff = 0;
    for (size_t i = 0; i < g.size(); ++i) {
      for (size_t j = 0; j < g[i].size(); ++j) diff = std::max(diff, std::fabs(g[i][j] - ref[i][j]));
    }
    const double s = rapidin::bench::Median(times);
    if (row == 1 || (base == 0 && row > 1)) base = s;
    const std::string speedup = row == 0 ? "-" : absl::StrFormat("%.2fx", base / s);
    std::printf("| %s | %s | %d | %d | %zu | %d | %.1f | %.2f | %s | %.1e |\n",
                eng.grad_path() == "direct" ? "direct pass"  // with an adapter it falls back to autograd
                : cf.engine == 2            ? "loop, float64 (reference)"
                                            : names[static_cast<int>(cf.method)],
                eng.grad_path().c_str(), cf.chunk, cf.threads, t->ids.size(), n, s * 1e3, s * 1e3 / n,
                speedup.c_str(), diff);
  }
  return 0;
}
