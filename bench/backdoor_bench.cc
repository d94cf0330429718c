// Influence scores of every training record for every query, exact and RapidGrad-compressed at several K, for
// each scoring variant, from one gradient pass over the training set (bench/backdoor). Writes JSON for
// bench/backdoor/metrics.py.
//
//   backdoor_bench --model M [--tokenizer T] [--adapter A] [--preconditioner optimizer.safetensors]
//                  --train train.jsonl --queries NAME=file.jsonl ... [--ks 1024,4096,...] [--lambda 4] [--seed 0]
//                  [--threads 2] [--grad-batch 8] --out scores.json
//
// Variants (the options of `rapidin cache`): "dot" = RapidIn (layer-wise normalised gradients, inner product);
// "cosine" = the same with unit-normalised vectors (for exact vectors this only rescales: every block has unit
// norm, so it is reported for the sketches); "adam" and "adam-cosine" = gradients divided by sqrt(v)+eps first
// (with --preconditioner). With --raw also "raw" and "adam-raw": the gradients without layer-wise normalisation
// (plain TracIn's inner product; the records' gradient norms are kept). Exact scores accumulate in float64;
// compressed ones are the fp32 sketches' products.
#include <CLI/CLI.hpp>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <mutex>
#include <nlohmann/json.hpp>
#include <thread>

#include "cache/cache.h"
#include "kernels/rapidgrad.h"
#include "model/engine.h"
#include "model/featurizer.h"

using namespace rapidin;
using Clock = std::chrono::steady_clock;

namespace {

// Layer-wise unit norm of g (optionally multiplied by p first), as the engine's Block(); without `normalise`,
// g (times p) alone.
std::vector<float> Normalised(const std::vector<double>& g, const std::vector<double>* p,
                              const std::vector<model::ParamInfo>& params, bool normalise = true) {
  std::vector<float> out(g.size());
  for (const auto& info : params) {
    double ss = 0;
    for (int64_t i = info.offset; i < info.offset + info.numel; ++i) {
      const double v = p ? g[i] * (*p)[i] : g[i];
      ss += v * v;
    }
    const double inv = !normalise ? 1.0 : ss > 0 ? 1.0 / std::sqrt(ss) : 0.0;
    for (int64_t i = info.offset; i < info.offset + info.numel; ++i) {
      out[i] = static_cast<float>((p ? g[i] * (*p)[i] : g[i]) * inv);
    }
  }
  return out;
}

void UnitNorm(std::vector<float>* v) {
  double ss = 0;
  for (float x : *v) ss += static_cast<double>(x) * x;
  if (ss > 0) {
    const double inv = 1.0 / std::sqrt(ss);
    for (float& x : *v) x = static_cast<float>(x * inv);
  }
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"backdoor_bench: exact and compressed influence scores of every training record"};
  model::EngineOptions eo;
  std::string train, out, label = "selected parameters", preconditioner;
  std::vector<std::string> query_specs;
  std::vector<int64_t> ks = {1024, 4096, 16384, 65536};
  int lambda = 4, threads = 2, grad_batch = 8;
  bool with_raw = false;
  uint64_t seed = 0;
  app.add_option("--model", eo.model_path)->required();
  app.add_option("--tokenizer", eo.tokenizer_path);
  app.add_option("--adapter", eo.adapter_path);
  app.add_option("--params", eo.param_pattern);
  app.add_option("--max-length", eo.max_length);
  app.add_option("--preconditioner", preconditioner, "Adam second moments: adds the adam variants");
  app.add_option("--train", train)->required();
  app.add_option("--queries", query_specs, "NAME=file.jsonl (repeatable)")->required();
  app.add_option("--ks", ks)->delimiter(',');
  app.add_option("--lambda", lambda);
  app.add_option("--seed", seed);
  app.add_option("--threads", threads);
  app.add_option("--grad-batch", grad_batch, "records per forward/backward pass");
  app.add_option("--out", out)->required();
  app.add_option("--label", label, "name of the parameter selection in the report");
  app.add_flag("--raw", with_raw, "also the variants without layer-wise normalisation (raw, adam-raw)");
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
  std::vector<double> pre;
  if (!preconditioner.empty()) {
    model::EngineOptions po = eo;
    po.preconditioner_path = preconditioner;
    auto pe = model::GradientEngine::Load(po);
    if (!pe.ok()) {
      std::fprintf(stderr, "%s\n", pe.status().ToString().c_str());
      return 1;
    }
    pre = (*pe)->PreconditionerValues();
  }
  struct Variant {
    std::string name;
    bool adam, cosine, normalise = true;
  };
  std::vector<Variant> variants = {{"dot", false, false}, {"cosine", false, true}};
  if (!pre.empty()) variants.push_back({"adam", true, false}), variants.push_back({"adam-cosine", true, true});
  if (with_raw) {
    variants.push_back({"raw", false, false, false});
    if (!pre.empty()) variants.push_back({"adam-raw", true, false, false});
  }
  const size_t V = variants.size();
  std::vector<cache::BadRecord> bad;
  auto records = cache::ReadInstructionData(train, &bad);
  if (!records.ok()) {
    std::fprintf(stderr, "%s\n", records.status().ToString().c_str());
    return 1;
  }
  std::vector<std::unique_ptr<kernels::RapidGrad>> sketches;
  for (int64_t k : ks) {
    std::string error;
    sketches.push_back(kernels::RapidGrad::Create({D, k, lambda, seed}, &error));
    if (!sketches.back()) {
      std::fprintf(stderr, "%s\n", error.c_str());
      return 2;
    }
  }
  // Per variant: the feature vector (exact) and its sketches, cosine variants unit-normalised after sketching.
  auto features = [&](const std::vector<double>& raw, const Variant& v, std::vector<float>* exact,
                      std::vector<std::vector<float>>* sk) {
    *exact = Normalised(raw, v.adam ? &pre : nullptr, e.params(), v.normalise);
    sk->assign(ks.size(), {});
    for (size_t ki = 0; ki < ks.size(); ++ki) {
      (*sk)[ki].resize(ks[ki]);
      sketches[ki]->Apply(exact->data(), (*sk)[ki].data());
      if (v.cosine) UnitNorm(&(*sk)[ki]);
    }
  };
  struct Query {
    std::string set, id;
    std::vector<std::vector<float>> exact;                   // [variant][D]
    std::vector<std::vector<std::vector<float>>> sketched;  // [variant][k][K]
  };
  std::vector<Query> queries;
  for (const auto& spec : query_specs) {
    const auto eq = spec.find('=');
    if (eq == std::string::npos) {
      std::fprintf(stderr, "--queries wants NAME=FILE, got %s\n", spec.c_str());
      return 2;
    }
    auto qs = cache::ReadInstructionData(spec.substr(eq + 1), &bad);
    if (!qs.ok()) {
      std::fprintf(stderr, "%s\n", qs.status().ToString().c_str());
      return 1;
    }
    for (const auto& q : *qs) {
      auto t = e.Tokenize(q.example);
      std::vector<double> raw;
      absl::Status st = t.status();
      if (st.ok()) st = e.GradientIds(*t, false, &raw).status();
      if (!st.ok()) {
        std::fprintf(stderr, "query %s: %s\n", q.id.c_str(), st.ToString().c_str());
        continue;
      }
      Query x{spec.substr(0, eq), q.id, std::vector<std::vector<float>>(V), {}};
      x.sketched.resize(V);
      for (size_t v = 0; v < V; ++v) features(raw, variants[v], &x.exact[v], &x.sketched[v]);
      queries.push_back(std::move(x));
    }
  }
  const size_t Q = queries.size(), N = records->size();
  // exact[v][q][i], comp[v][k][q][i]
  std::vector<std::vector<std::vector<double>>> exact(V, std::vector<std::vector<double>>(Q, std::vector<double>(N)));
  std::vector<std::vector<std::vector<std::vector<float>>>> comp(
      V, std::vector<std::vector<std::vector<float>>>(ks.size(), std::vector<std::vector<float>>(Q, std::vector<float>(N))));
  std::vector<char> ok(N, 0);
  std::atomic<size_t> next{0}, done{0};
  std::atomic<double> grad_s{0}, score_s{0};
  const auto t0 = Clock::now();
  std::mutex print_mu;
  auto work = [&] {
    double gs = 0, ss = 0;
    std::vector<float> ex;
    std::vector<std::vector<float>> sk;
    for (size_t first; (first = next.fetch_add(grad_batch)) < N;) {
      const size_t last = std::min(N, first + grad_batch);
      const auto a = Clock::now();
      std::vector<model::TokenizedExample> batch;
      std::vector<size_t> where;
      for (size_t i = first; i < last; ++i) {
        auto t = e.Tokenize((*records)[i].example);
        if (t.ok()) batch.push_back(std::move(*t)), where.push_back(i);
      }
      std::vector<std::vector<double>> raws;
      std::vector<model::GradInfo> infos;
      if (batch.empty() || !e.GradientIdsBatch(batch, false, &raws, &infos).ok()) continue;
      const auto b = Clock::now();
      gs += std::chrono::duration<double>(b - a).count();
      for (size_t j = 0; j < where.size(); ++j) {
        const size_t i = where[j];
        ok[i] = 1;
        for (size_t v = 0; v < V; ++v) {
          features(raws[j], variants[v], &ex, &sk);
          for (size_t q = 0; q < Q; ++q) {
            double acc = 0;
            const float* qg = queries[q].exact[v].data();
            for (int64_t d = 0; d < D; ++d) acc += static_cast<double>(ex[d]) * qg[d];
            exact[v][q][i] = acc;
            for (size_t ki = 0; ki < ks.size(); ++ki) {
              const float* qs = queries[q].sketched[v][ki].data();
              float c = 0;
              for (int64_t k = 0; k < ks[ki]; ++k) c += sk[ki][k] * qs[k];
              comp[v][ki][q][i] = c;
            }
          }
        }
      }
      ss += std::chrono::duration<double>(Clock::now() - b).count();
      const size_t d = done += where.size();
      if (d / 200 != (d - where.size()) / 200) {
        std::lock_guard<std::mutex> l(print_mu);
        const double el = std::chrono::duration<double>(Clock::now() - t0).count();
        std::fprintf(stderr, "backdoor_bench: %zu / %zu records, %.0f s, ETA %.0f s\n", d, N, el, el / d * (N - d));
      }
    }
    grad_s = grad_s + gs;
    score_s = score_s + ss;
  };
  std::vector<std::thread> pool;
  for (int t = 0; t < threads; ++t) pool.emplace_back(work);
  for (auto& t : pool) t.join();
  const double wall = std::chrono::duration<double>(Clock::now() - t0).count();

  nlohmann::json j;
  j["grad_dim"] = D;
  j["label"] = label;
  j["ks"] = ks;
  j["preconditioner"] = preconditioner;
  j["variants"] = nlohmann::json::array();
  for (const auto& v : variants) j["variants"].push_back(v.name);
  j["records"] = nlohmann::json::array();
  for (size_t i = 0; i < N; ++i) {
    if (ok[i]) j["records"].push_back((*records)[i].id);
  }
  j["queries"] = nlohmann::json::array();
  for (size_t q = 0; q < Q; ++q) {
    nlohmann::json vj = nlohmann::json::object();
    for (size_t v = 0; v < V; ++v) {
      std::vector<double> ex;
      for (size_t i = 0; i < N; ++i) {
        if (ok[i]) ex.push_back(exact[v][q][i]);
      }
      nlohmann::json kj = nlohmann::json::object();
      for (size_t ki = 0; ki < ks.size(); ++ki) {
        std::vector<float> c;
        for (size_t i = 0; i < N; ++i) {
          if (ok[i]) c.push_back(comp[v][ki][q][i]);
        }
        kj[std::to_string(ks[ki])] = c;
      }
      vj[variants[v].name] = {{"exact", ex}, {"compressed", kj}};
    }
    j["queries"].push_back({{"set", queries[q].set}, {"id", queries[q].id}, {"variants", vj}});
  }
  j["seconds"] = {{"wall", wall}, {"gradients", grad_s.load()}, {"scores", score_s.load()}, {"threads", threads}};
  std::ofstream(out) << j.dump() << "\n";
  std::fprintf(stderr, "backdoor_bench: %zu records x %zu queries x %zu variants, D=%lld, %.1f s -> %s\n", N, Q, V,
               static_cast<long long>(D), wall, out.c_str());
  return 0;
}
