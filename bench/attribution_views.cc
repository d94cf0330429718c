// Per-record cost of the two record views of token attributions, for the records of a `rapidin query --json
// --tokens` answer, on the featurizer the server builds (stories260K, every weight matrix, K = 4096): the token-loss
// view as TokenScores (each token's <N(grad l_s), C^T q>, blocks reduced as they are formed) against the earlier
// TokenSketches + dot (every token's gradient written, normalised and sketched), and the influence view
// (RecordTokenInfluence). Each view alone, one record after another, on the server's thread counts; the largest
// difference between the two token-loss scores, relative to the largest score, is printed too.
// Usage: attribution_views MODEL ANSWER_JSON
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <random>

#include "model/featurizer.h"
#include "nlohmann/json.hpp"

namespace {
using Clock = std::chrono::steady_clock;
double Ms(Clock::time_point a) { return std::chrono::duration<double, std::milli>(Clock::now() - a).count(); }
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
  std::printf("| record | tokens | token-loss view: scores ms | sketches + dot ms (before) | influence view ms | max rel diff |\n");
  std::printf("|---|---|---|---|---|---|\n");
  double sum_scores = 0, sum_sketch = 0, sum_infl = 0, worst = 0;
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
      if (!(*f)->TokenScores(t->ids, 1, q, &scores).ok()) return 1;
      const double a = Ms(t0);
      t0 = Clock::now();
      if (!(*f)->TokenSketches(t->ids, 1, &sk).ok()) return 1;
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
      std::printf("| %s | %zu | %.1f | %.1f | %.1f | %.1e |\n", r["id"].get<std::string>().c_str(), t->ids.size(), a,
                  b, c, diff / big);
      sum_scores += a, sum_sketch += b, sum_infl += c, ++n;
    }
  }
  std::printf("| mean of %d | | %.1f | %.1f | %.1f | %.1e |\n", n, sum_scores / n, sum_sketch / n, sum_infl / n, worst);
  return 0;
}
