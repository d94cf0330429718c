// Per-record cost of the two record views of token attributions, for the records of a `rapidin query --json --tokens`
// answer, on the featurizer the server builds (stories260K, every weight matrix, K = 4096): the token-loss view as
// TokenScores over the tokens the loss is on (each token's <N(grad l_s), C^T q>, blocks reduced as they are formed)
// against the earlier TokenSketches + dot (every token's gradient written, normalised and sketched), and the
// influence view (RecordTokenInfluence). Each view alone, one record after another, on the server's thread counts;
// the largest difference between the two token-loss scores, relative to the largest score, is printed too. Against a
// roofline: the token-loss view's arithmetic, counted from the model's shape (each token s's backward covers its s
// positions: weight and input gradients of every matrix as the pass forms them, the attention backward over the causal
// square), and the rate of one large sgemm per thread on the same number of threads (what the CPUs attain on dense
// float32 products).
// Usage: attribution_views MODEL ANSWER_JSON
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <random>
#include <thread>
#include <vector>

#include "model/featurizer.h"
#include "nlohmann/json.hpp"

extern "C" void sgemm_(const char* ta, const char* tb, const int* m, const int* n, const int* k, const float* alpha,
                       const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
                       const int* ldc);

namespace {
using Clock = std::chrono::steady_clock;
double Ms(Clock::time_point a) { return std::chrono::duration<double, std::milli>(Clock::now() - a).count(); }

// Floating-point operations of TokenScores over tokens [from, T) (multiply-adds count 2): token s's loss reaches
// the top layer at its own position only, and every position [0, s) below it.
double TokenLossFlops(const rapidin::model::ModelConfig& c, int64_t from, int64_t T) {
  const double D = c.dim, Fh = c.hidden_dim, V = c.vocab_size, hd = c.dim / c.n_heads;
  const double HD = c.n_heads * hd, KD = c.n_kv_heads * hd, L = c.n_layers;
  double total = 0;
  for (int64_t s = from; s < T; ++s) {
    const double P = static_cast<double>(s);
    const double head = 6 * V * D;                    // logits, their input gradient, the head's rank-one block
    const double qkv = 4 * P * D * (HD + 2 * KD);     // weight and input gradients of wq, wk, wv
    const double top = 12 * D * Fh + 4 * D * HD + 4 * P * HD + qkv;  // one position above the last attention
    // Below it, as the pass computes them: the feed-forward's weight gradients (3 matrices) and its input gradient
    // through x W2 and one per-position matrix for W1 and W3 (5 products of P x D x Fh); wo both ways; attention over
    // P^2 / 2 key pairs with 3 products of hd each (dp, dV, dK) and dq from per-row moments (hd^2 per row and head).
    const double lower = 10 * P * D * Fh + 4 * P * D * HD + 3 * P * P * HD + 2 * P * HD * hd + qkv;
    total += head + top + (L - 1) * lower;
  }
  return total;
}

// GFLOP/s of one 1024^3 sgemm per thread, `threads` at once (BLAS itself on one thread each).
double SgemmRate(int threads) {
  const int n = 1024;
  std::vector<std::vector<float>> a(threads, std::vector<float>(size_t{n} * n, 0.5f));
  std::vector<std::vector<float>> c(threads, std::vector<float>(size_t{n} * n));
  auto run = [&](int t) {
    const float one = 1, zero = 0;
    sgemm_("N", "N", &n, &n, &n, &one, a[t].data(), &n, a[t].data(), &n, &zero, c[t].data(), &n);
  };
  for (int t = 0; t < threads; ++t) run(t);  // warm-up
  const auto t0 = Clock::now();
  const int reps = 3;
  for (int r = 0; r < reps; ++r) {
    std::vector<std::thread> pool;
    for (int t = 0; t < threads; ++t) pool.emplace_back(run, t);
    for (auto& th : pool) th.join();
  }
  return 2.0 * n * n * n * threads * reps / (Ms(t0) * 1e6);
}
}  // namespace

int main(int argc, char** argv) {
  if (argc < 3) {
    std::fprintf(stderr, "usage: attribution_views MODEL ANSWER_JSON\n");
    return 2;
  }
  rapidin::model::FeaturizerOptions fo;
  fo.engine.model_path = argv[1];
  if (absl::Status st = rapidin::model::ResolveTokenizer(&fo.engine); !st.ok()) {
    std::fprintf(stderr, "%s\n", st.ToString().c_str());
    return 1;
  }
  rapidin::model::SetComputeThreads(1);
  auto f = rapidin::model::Featurizer::Create(fo);
  if (!f.ok()) {
    std::fprintf(stderr, "%s\n", f.status().ToString().c_str());
    return 1;
  }
  const auto answer = nlohmann::json::parse(std::ifstream(argv[2]));
  std::mt19937 rng(7);
  std::normal_distribution<float> g;
  std::vector<float> q((*f)->dim());  // the views' cost does not depend on q's values
  for (auto& v : q) v = g(rng);
  std::printf("| record | tokens (response) | token-loss view: scores ms | GFLOP | GFLOP/s | sketches + dot ms (before) | influence view ms | max rel diff |\n");
  std::printf("|---|---|---|---|---|---|---|---|\n");
  double sum_scores = 0, sum_sketch = 0, sum_infl = 0, worst = 0, sum_flops = 0;
  int n = 0;
  for (const char* side : {"helpful", "harmful"}) {
    for (const auto& r : answer["result"][side]) {
      rapidin::model::Example ex;
      ex.instruction = r["record"]["instruction"];
      ex.input = r["record"]["input"];
      ex.output = r["record"]["output"];
      auto t = (*f)->engine().Tokenize(ex);
      if (!t.ok()) return 1;
      std::vector<double> scores, infl;
      std::vector<std::vector<float>> sk;
      auto t0 = Clock::now();
      // As the server: the tokens the record's loss is on (an Alpaca record's output).
      const int from = std::max(1, t->response_begin);
      if (!(*f)->TokenScores(t->ids, from, q, &scores).ok()) return 1;
      const double a = Ms(t0);
      t0 = Clock::now();
      if (!(*f)->TokenSketches(t->ids, from, &sk).ok()) return 1;
      double big = 0, diff = 0;
      for (size_t s = 0; s < sk.size(); ++s) {
        double dot = 0;
        for (size_t i = 0; i < q.size(); ++i) dot += static_cast<double>(sk[s][i]) * q[i];
        big = std::max(big, std::fabs(dot));
        diff = std::max(diff, std::fabs(dot - scores[s]));
      }
      const double b = Ms(t0);
      t0 = Clock::now();
      if (!(*f)->RecordTokenInfluence(*t, q, &infl).ok()) return 1;
      const double c = Ms(t0);
      worst = std::max(worst, diff / big);
      const double flops = TokenLossFlops((*f)->engine().config(), from, static_cast<int64_t>(t->ids.size()));
      std::printf("| %s | %zu (%zu) | %.1f | %.1f | %.1f | %.1f | %.1f | %.1e |\n", r["id"].get<std::string>().c_str(),
                  t->ids.size(), t->ids.size() - from, a, flops / 1e9, flops / (a * 1e6), b, c, diff / big);
      sum_scores += a, sum_sketch += b, sum_infl += c, sum_flops += flops, ++n;
    }
  }
  std::printf("| mean of %d | | %.1f | %.1f | %.1f | %.1f | %.1f | %.1e |\n", n, sum_scores / n, sum_flops / n / 1e9,
              sum_flops / (sum_scores * 1e6), sum_sketch / n, sum_infl / n, worst);
  const int threads = static_cast<int>(std::max(1u, std::min(4u, std::thread::hardware_concurrency())));  // as TokenScores
  const double peak = SgemmRate(threads);
  std::printf("\nRoofline: one 1024^3 sgemm per thread on %d threads runs at %.1f GFLOP/s; the token-loss view's "
              "arithmetic alone would take %.1f ms per record at that rate (%.0f%% of it attained).\n",
              threads, peak, sum_flops / n / (peak * 1e6), 100.0 * (sum_flops / (sum_scores * 1e6)) / peak);
  return 0;
}
