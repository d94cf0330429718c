// Influence scores of every training record for every query, exact and RapidGrad-compressed at several K, from
// one gradient pass over the training set (the K sweep of bench/backdoor). Writes JSON for bench/backdoor/metrics.py.
//
//   backdoor_bench --model M [--tokenizer T] [--adapter A] --train train.jsonl --queries NAME=file.jsonl ...
//                  [--ks 1024,4096,...] [--lambda 4] [--seed 0] [--threads 2] --out scores.json
//
// Exact scores are inner products of the layer-wise normalised gradients (float64 accumulation); compressed
// scores are inner products of their RapidGrad sketches (the same parameters `rapidin cache` uses), in fp32.
#include <CLI/CLI.hpp>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <mutex>
#include <nlohmann/json.hpp>
#include <thread>

#include "client/cache.h"
#include "kernels/rapidgrad.h"
#include "model/engine.h"
#include "model/featurizer.h"

using namespace rapidin;
using Clock = std::chrono::steady_clock;

int main(int argc, char** argv) {
  CLI::App app{"backdoor_bench: exact and compressed influence scores of every training record"};
  model::EngineOptions eo;
  std::string train, out, label = "selected parameters";
  std::vector<std::string> query_specs;
  std::vector<int64_t> ks = {1024, 4096, 16384, 65536};
  int lambda = 4, threads = 2;
  uint64_t seed = 0;
  app.add_option("--model", eo.model_path)->required();
  app.add_option("--tokenizer", eo.tokenizer_path);
  app.add_option("--adapter", eo.adapter_path);
  app.add_option("--params", eo.param_pattern);
  app.add_option("--train", train)->required();
  app.add_option("--queries", query_specs, "NAME=file.jsonl (repeatable)")->required();
  app.add_option("--ks", ks)->delimiter(',');
  app.add_option("--lambda", lambda);
  app.add_option("--seed", seed);
  app.add_option("--threads", threads);
  app.add_option("--out", out)->required();
  app.add_option("--label", label, "name of the parameter selection in the report");
  CLI11_PARSE(app, argc, argv);
  if (absl::Status st = model::ResolveTokenizer(&eo); !st.ok()) {
    std::fprintf(stderr, "%s\n", st.ToString().c_str());
    return 1;
  }
  model::SetComputeThreads(1);
  auto engine = model::GradientEngine::Load(eo);
  if (!engine.ok()) {
    std::fprintf(stderr, "%s\n", engine.status().ToString().c_str());
    return 1;
  }
  const model::GradientEngine& e = **engine;
  const int64_t D = e.grad_dim();
  std::vector<client::BadRecord> bad;
  auto records = client::ReadInstructionData(train, &bad);
  if (!records.ok()) {
    std::fprintf(stderr, "%s\n", records.status().ToString().c_str());
    return 1;
  }
  // Query gradients.
  struct Query {
    std::string set, id;
    std::vector<float> g;
  };
  std::vector<Query> queries;
  for (const auto& spec : query_specs) {
    const auto eq = spec.find('=');
    if (eq == std::string::npos) {
      std::fprintf(stderr, "--queries wants NAME=FILE, got %s\n", spec.c_str());
      return 2;
    }
    auto qs = client::ReadInstructionData(spec.substr(eq + 1), &bad);
    if (!qs.ok()) {
      std::fprintf(stderr, "%s\n", qs.status().ToString().c_str());
      return 1;
    }
    for (const auto& q : *qs) {
      Query x{spec.substr(0, eq), q.id, {}};
      auto info = e.Gradient(q.example, true, &x.g);
      if (!info.ok()) {
        std::fprintf(stderr, "query %s: %s\n", q.id.c_str(), info.status().ToString().c_str());
        continue;
      }
      queries.push_back(std::move(x));
    }
  }
  const size_t Q = queries.size(), N = records->size();
  std::vector<std::unique_ptr<kernels::RapidGrad>> sketches;
  std::vector<std::vector<float>> sketched_queries(ks.size());  // [k][q * K]
  for (size_t ki = 0; ki < ks.size(); ++ki) {
    std::string error;
    sketches.push_back(kernels::RapidGrad::Create({D, ks[ki], lambda, seed}, &error));
    if (!sketches.back()) {
      std::fprintf(stderr, "%s\n", error.c_str());
      return 2;
    }
    for (const auto& q : queries) {
      auto s = sketches.back()->Apply(q.g);
      sketched_queries[ki].insert(sketched_queries[ki].end(), s.begin(), s.end());
    }
  }
  std::vector<std::vector<double>> exact(Q, std::vector<double>(N, 0));
  std::vector<std::vector<std::vector<float>>> comp(ks.size(), std::vector<std::vector<float>>(Q, std::vector<float>(N)));
  std::vector<char> ok(N, 0);
  std::atomic<size_t> next{0}, done{0};
  std::atomic<double> grad_s{0}, exact_s{0}, sketch_s{0};
  const auto t0 = Clock::now();
  std::mutex print_mu;
  auto work = [&] {
    std::vector<float> g, s;
    double gs = 0, es = 0, ss = 0;
    for (size_t i; (i = next++) < N;) {
      const auto a = Clock::now();
      auto info = e.Gradient((*records)[i].example, true, &g);
      const auto b = Clock::now();
      gs += std::chrono::duration<double>(b - a).count();
      if (!info.ok()) continue;
      ok[i] = 1;
      for (size_t q = 0; q < Q; ++q) {
        double acc = 0;
        const float* qg = queries[q].g.data();
        for (int64_t d = 0; d < D; ++d) acc += static_cast<double>(g[d]) * qg[d];
        exact[q][i] = acc;
      }
      const auto c = Clock::now();
      es += std::chrono::duration<double>(c - b).count();
      for (size_t ki = 0; ki < ks.size(); ++ki) {
        s.resize(ks[ki]);
        sketches[ki]->Apply(g.data(), s.data());
        for (size_t q = 0; q < Q; ++q) {
          const float* qs = sketched_queries[ki].data() + q * ks[ki];
          float acc = 0;
          for (int64_t k = 0; k < ks[ki]; ++k) acc += s[k] * qs[k];
          comp[ki][q][i] = acc;
        }
      }
      ss += std::chrono::duration<double>(Clock::now() - c).count();
      const size_t d = ++done;
      if (d % 500 == 0) {
        std::lock_guard<std::mutex> l(print_mu);
        const double el = std::chrono::duration<double>(Clock::now() - t0).count();
        std::fprintf(stderr, "backdoor_bench: %zu / %zu records, %.0f s, ETA %.0f s\n", d, N, el, el / d * (N - d));
      }
    }
    grad_s = grad_s + gs;
    exact_s = exact_s + es;
    sketch_s = sketch_s + ss;
  };
  std::vector<std::thread> pool;
  for (int t = 0; t < threads; ++t) pool.emplace_back(work);
  for (auto& t : pool) t.join();
  const double wall = std::chrono::duration<double>(Clock::now() - t0).count();

  nlohmann::json j;
  j["grad_dim"] = D;
  j["label"] = label;
  j["ks"] = ks;
  j["records"] = nlohmann::json::array();
  for (size_t i = 0; i < N; ++i) {
    if (ok[i]) j["records"].push_back((*records)[i].id);
  }
  j["queries"] = nlohmann::json::array();
  for (size_t q = 0; q < Q; ++q) {
    std::vector<double> ex;
    nlohmann::json kj = nlohmann::json::object();
    for (size_t i = 0; i < N; ++i) {
      if (ok[i]) ex.push_back(exact[q][i]);
    }
    for (size_t ki = 0; ki < ks.size(); ++ki) {
      std::vector<float> v;
      for (size_t i = 0; i < N; ++i) {
        if (ok[i]) v.push_back(comp[ki][q][i]);
      }
      kj[std::to_string(ks[ki])] = v;
    }
    j["queries"].push_back({{"set", queries[q].set}, {"id", queries[q].id}, {"exact", ex}, {"compressed", kj}});
  }
  j["seconds"] = {{"wall", wall}, {"gradients", grad_s.load()}, {"exact_scores", exact_s.load()},
                  {"sketch_and_score", sketch_s.load()}, {"threads", threads}};
  std::ofstream(out) << j.dump() << "\n";
  std::fprintf(stderr, "backdoor_bench: %zu records x %zu queries, D=%lld, %.1f s -> %s\n", N, Q,
               static_cast<long long>(D), wall, out.c_str());
  return 0;
}
