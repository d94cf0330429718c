// The IVF index against the exact scan (issue 18): recall@10 and recall@100 at both ends, latency per query and
// the speed-up, for N = 100k, 300k, 1M rows of K = 4096 fp16, plus the cost of building the index.
//
//   ann_bench --basis STORE [--sizes 100000,300000,1000000] [--dir DIR] [--queries 100] [--nprobe 4,8,16,32,64]
//             [--shards 2] [--gaussian 100000] [--md OUT.md] [--json OUT.json]
//
// Data. Nobody can cache a million real gradients on 2 cores (32 records/s: 9 hours), so the large stores are
// derived from a real one (--basis, e.g. the demo's 5,000 Alpaca records under stories260K): its rows are split
// into 4/5 "basis" and 1/5 held-out query vectors. Each synthetic row is a basis row (its anchor) plus w times
// another basis row (w uniform in [0.3, 0.9]) plus Gaussian noise of 0.35 times the anchor's norm, rescaled to the
// anchor's norm: rows stay in the span and neighbourhoods of real gradients without copying any. Queries are the
// held-out real gradients, which are in no store. Two further checks bound the result: "real" (the 4,000 basis
// rows themselves, real gradients only, small N) and --gaussian N (isotropic random rows: no structure at all, the
// index's worst case). Stores are kept in DIR and reused when present.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "bench/bench_util.h"
#include "nlohmann/json.hpp"
#include "query/ivf_index.h"
#include "query/pca_index.h"
#include "query/query_engine.h"
#include "storage/store.h"

namespace {

using rapidin::kernels::Candidate;
using rapidin::query::IvfIndex;
using rapidin::query::IvfOptions;
using rapidin::query::PcaIndex;
using rapidin::query::PcaOptions;
using rapidin::query::QueryEngine;
using rapidin::storage::IngestItem;
using rapidin::storage::Store;
using rapidin::storage::StoreOptions;
using Clock = std::chrono::steady_clock;

double Since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

void Die(const absl::Status& st) {
  std::fprintf(stderr, "ann_bench: %s\n", st.ToString().c_str());
  std::exit(1);
}

double Norm(const float* v, int64_t k) {
  double n = 0;
  for (int64_t c = 0; c < k; ++c) n += double(v[c]) * v[c];
  return std::sqrt(n);
}

// Fills a store at path with n rows from make(i, row) unless one with n rows is there already.
template <typename Make>
void EnsureStore(const std::string& path, int64_t n, int64_t k, Make make) {
  {
    StoreOptions o;
    o.host_budget_bytes = 1;  // nothing resident: this only checks the size
    auto s = Store::Open(path, o);
    if (s.ok() && static_cast<int64_t>((*s)->size()) == n && (*s)->k() == k) return;
  }
  std::filesystem::remove_all(path);
  StoreOptions o;
  o.create_if_missing = true;
  o.k = static_cast<uint32_t>(k);
  o.sync_writes = false;
  o.host_budget_bytes = 1;  // rows go to disk only while filling
  auto s = Store::Open(path, o);
  if (!s.ok()) Die(s.status());
  const auto t0 = Clock::now();
  std::vector<IngestItem> batch(2000);
  for (int64_t i = 0; i < n;) {
    const int64_t nb = std::min<int64_t>(2000, n - i);
    batch.resize(nb);
    for (int64_t b = 0; b < nb; ++b) {
      batch[b].record.set_id(absl::StrCat("row-", i + b));
      batch[b].vector.resize(k);
      make(i + b, batch[b].vector.data());
    }
    absl::Status st = (*s)->Ingest(batch).status();
    if (!st.ok()) Die(st);
    i += nb;
    if (i % 100000 == 0 || i == n) {
      std::fprintf(stderr, "  %s: %lld / %lld rows written (%.0f s)\n", path.c_str(), (long long)i, (long long)n,
                   Since(t0));
    }
  }
}

struct Run {
  std::vector<std::vector<Candidate>> helpful, harmful;
  std::vector<double> ms;
  std::vector<double> worker_ms;  // per search: the slowest worker's scan (codes, candidates, exact re-scoring)
  int64_t rows_scored = 0;
};

Run Queries(const Store& store, const QueryEngine::Options& o, const std::vector<std::vector<float>>& qs, int top_k) {
  auto engine = QueryEngine::Create(&store, o);
  if (!engine.ok()) Die(engine.status());
  Run run;
  (void)(*engine)->Search(qs[0], 1, top_k, top_k);  // warm up
  for (const auto& q : qs) {
    const auto t0 = Clock::now();
    auto r = (*engine)->Search(q, 1, top_k, top_k);
    run.ms.push_back(Since(t0) * 1e3);
    if (!r.ok()) Die(r.status());
    run.helpful.push_back(r->helpful[0]);
    run.harmful.push_back(r->harmful[0]);
    double slowest = 0;
    for (const auto& t : r->shard_timings) {
      run.rows_scored += t.rows;
      slowest = std::max(slowest, t.scan_ms);
    }
    run.worker_ms.push_back(slowest);
  }
  return run;
}

double Recall(const std::vector<std::vector<Candidate>>& got, const std::vector<std::vector<Candidate>>& want,
              size_t at) {
  double sum = 0;
  for (size_t j = 0; j < want.size(); ++j) {
    std::set<int64_t> w;
    for (size_t i = 0; i < std::min(at, want[j].size()); ++i) w.insert(want[j][i].index);
    int hit = 0;
    for (size_t i = 0; i < std::min(at, got[j].size()); ++i) hit += w.count(got[j][i].index);
    sum += w.empty() ? 1.0 : double(hit) / w.size();
  }
  return sum / want.size();
}

}  // namespace

int main(int argc, char** argv) {
  std::string basis_path, dir = std::string(std::getenv("HOME") ? std::getenv("HOME") : "/tmp") + "/.cache/rapidin/ann";
  std::string md_path, json_path, dump_path, sizes_arg = "100000,300000,1000000", nprobe_arg = "4,8,16,32,64";
  int nqueries = 100, shards = 2;
  std::string pca_dims_arg = "128,256", pca_mins_arg = "256,1024";
  const int factor = 10;  // candidates per requested record (the server's default)
  int64_t gaussian_n = 0;
  bool prepare_only = false;  // --prepare-only 1: write the stores (slow, once) and stop
  double target_recall = 0.95;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string a = argv[i];
    if (a == "--basis") basis_path = argv[i + 1];
    else if (a == "--dir") dir = argv[i + 1];
    else if (a == "--sizes") sizes_arg = argv[i + 1];
    else if (a == "--nprobe") nprobe_arg = argv[i + 1];
    else if (a == "--queries") nqueries = std::atoi(argv[i + 1]);
    else if (a == "--shards") shards = std::atoi(argv[i + 1]);
    else if (a == "--gaussian") gaussian_n = std::atoll(argv[i + 1]);
    else if (a == "--md") md_path = argv[i + 1];
    else if (a == "--json") json_path = argv[i + 1];
    else if (a == "--dump") dump_path = argv[i + 1];
    else if (a == "--pca-dims") pca_dims_arg = argv[i + 1];
    else if (a == "--pca-min-candidates") pca_mins_arg = argv[i + 1];
    else if (a == "--prepare-only") prepare_only = std::atoi(argv[i + 1]) != 0;
    else {
      std::fprintf(stderr, "unknown option %s\n", a.c_str());
      return 2;
    }
  }
  if (basis_path.empty()) {
    std::fprintf(stderr, "usage: ann_bench --basis STORE (a store of real gradients, e.g. the demo's) [options]\n");
    return 2;
  }
  std::vector<int64_t> sizes;
  for (auto s : absl::StrSplit(sizes_arg, ',')) sizes.push_back(std::atoll(std::string(s).c_str()));
  std::vector<int> nprobes;
  for (auto s : absl::StrSplit(nprobe_arg, ',', absl::SkipEmpty())) nprobes.push_back(std::atoi(std::string(s).c_str()));
  std::vector<int> pca_dims, pca_mins;
  for (auto s : absl::StrSplit(pca_dims_arg, ',', absl::SkipEmpty())) pca_dims.push_back(std::atoi(std::string(s).c_str()));
  for (auto s : absl::StrSplit(pca_mins_arg, ',')) pca_mins.push_back(std::atoi(std::string(s).c_str()));
  std::filesystem::create_directories(dir);

  // The real gradients: 4 of every 5 rows are the basis, the 5th are query vectors.
  std::vector<std::vector<float>> basis, queries;
  int64_t k = 0;
  {
    StoreOptions o;
    auto s = Store::Open(basis_path, o);
    if (!s.ok()) Die(s.status());
    k = (*s)->k();
    for (uint64_t g = 0; g < (*s)->size(); ++g) {
      auto v = (*s)->GetVector(g);
      if (!v.ok()) Die(v.status());
      if (std::isnan((*v)[0])) continue;
      ((basis.size() + queries.size()) % 5 == 4 ? queries : basis).push_back(std::move(*v));
    }
  }
  if (static_cast<int>(queries.size()) < nqueries) nqueries = static_cast<int>(queries.size());
  queries.resize(nqueries);
  std::fprintf(stderr, "basis %s: K=%lld, %zu basis rows, %d query vectors (held out)\n", basis_path.c_str(),
               (long long)k, basis.size(), nqueries);

  if (!dump_path.empty()) {  // raw float32: the basis rows, then the query vectors (for offline analysis)
    std::ofstream f(dump_path, std::ios::binary);
    for (const auto* set : {&basis, &queries}) {
      for (const auto& v : *set) f.write(reinterpret_cast<const char*>(v.data()), v.size() * sizeof(float));
    }
  }
  // Noise: windows of one table of unit-variance Gaussians (fast, and deterministic).
  std::vector<float> noise(1 << 20);
  {
    std::mt19937_64 rng(7);
    std::normal_distribution<float> g;
    for (auto& x : noise) x = g(rng);
  }
  auto anchored = [&](int64_t i, float* out) {
    std::mt19937_64 rng(0x9e3779b97f4a7c15ull * (i + 1));
    const auto& a = basis[rng() % basis.size()];
    const auto& c = basis[rng() % basis.size()];
    const float w = 0.3f + 0.6f * std::uniform_real_distribution<float>()(rng);
    const size_t off = rng() % noise.size();
    const double na = Norm(a.data(), k);
    const float sn = static_cast<float>(0.35 * na / std::sqrt(double(k)));
    for (int64_t j = 0; j < k; ++j) out[j] = a[j] + w * c[j] + sn * noise[(off + j) % noise.size()];
    const float scale = static_cast<float>(na / Norm(out, k));
    for (int64_t j = 0; j < k; ++j) out[j] *= scale;
  };
  const double mean_norm = [&] {
    double s = 0;
    for (const auto& b : basis) s += Norm(b.data(), k);
    return s / basis.size();
  }();
  auto gaussian = [&](int64_t i, float* out) {
    std::mt19937_64 rng(0x51ed27ull * (i + 1));
    const size_t off = rng() % noise.size();
    for (int64_t j = 0; j < k; ++j) out[j] = noise[(off + j * 7) % noise.size()];
    const float scale = static_cast<float>(mean_norm / Norm(out, k));
    for (int64_t j = 0; j < k; ++j) out[j] *= scale;
  };

  struct Case {
    std::string data;
    int64_t n;
  };
  std::vector<Case> cases = {{"real", static_cast<int64_t>(basis.size())}};
  for (int64_t n : sizes) cases.push_back({"anchored", n});
  if (gaussian_n > 0) cases.push_back({"gaussian", gaussian_n});

  nlohmann::json out = nlohmann::json::object();
  out["cases"] = nlohmann::json::array();
  std::string md = absl::StrFormat(
      "# Indexes against the exact scan\n\n`build/bench/ann_bench --basis %s --queries %d --shards %d` (K=%lld "
      "fp16; %d held-out real gradients as queries, one query vector per search, top-100 at both ends). Data: "
      "see bench/ann_bench.cc (real = the basis rows only; anchored = synthetic rows built around real ones; "
      "gaussian = no structure). Recall of the helpful / harmful lists against the exact scan; every returned score "
      "is exact. Speed-up = exact p50 / index p50, measured in the same run.\n\n",
      basis_path, nqueries, shards, (long long)k, nqueries);
  for (const Case& cs : cases) {
    const std::string path = absl::StrCat(dir, "/", cs.data, "-", cs.n, "-k", k);
    if (cs.data == "real") {
      EnsureStore(path, cs.n, k, [&](int64_t i, float* o) { std::copy(basis[i].begin(), basis[i].end(), o); });
    } else if (cs.data == "anchored") {
      EnsureStore(path, cs.n, k, anchored);
    } else {
      EnsureStore(path, cs.n, k, gaussian);
    }
    if (prepare_only) continue;
    StoreOptions so;
    so.num_shards = shards;
    const auto tl = Clock::now();
    auto store = Store::Open(path, so);
    if (!store.ok()) Die(store.status());
    std::fprintf(stderr, "%s N=%lld: loaded in %.1f s\n", cs.data.c_str(), (long long)cs.n, Since(tl));
    const Run exact = Queries(**store, QueryEngine::Options{}, queries, 100);
    const double exact_p50 = rapidin::bench::Median(exact.ms);
    IvfOptions io;
    io.progress = [t0 = Clock::now(), last = Clock::now()](const char* stage, uint64_t d, uint64_t t) mutable {
      if (d != t && Clock::now() - last < std::chrono::seconds(10)) return;
      last = Clock::now();
      std::fprintf(stderr, "  index %s %llu/%llu (%.0f s)\n", stage, (unsigned long long)d, (unsigned long long)t,
                   Since(t0));
    };
    std::fprintf(stderr, "%s N=%lld: exact p50 %.1f ms\n", cs.data.c_str(), (long long)cs.n, exact_p50);
    nlohmann::json c = {{"data", cs.data}, {"n", cs.n}, {"k", k}, {"exact_p50_ms", exact_p50},
                        {"points", nlohmann::json::array()}};
    md += absl::StrFormat("## %s, N = %lld\n\nExact scan p50 %.1f ms.\n", cs.data, (long long)cs.n, exact_p50);
    nlohmann::json best = nullptr;
    // The IVF index (none with --nprobe ''): the nprobe best and worst lists scored exactly.
    std::unique_ptr<IvfIndex> index;
    double build_s = 0;
    if (!nprobes.empty()) {
      const auto tb = Clock::now();
      auto built = IvfIndex::Build(**store, io);
      if (!built.ok()) Die(built.status());
      index = std::move(*built);
      build_s = Since(tb);
      std::fprintf(stderr, "  ivf nlist=%d built in %.1f s\n", index->nlist(), build_s);
      c["ivf_nlist"] = index->nlist();
      md += absl::StrFormat(
          "\nIVF index: nlist %d, built in %.1f s (k-means on a sample + every row assigned).\n\n| nprobe (per end) | "
          "rows scored | recall@10 helpful / harmful | recall@100 helpful / harmful | p50 ms | speed-up |\n"
          "|---|---|---|---|---|---|\n",
          index->nlist(), build_s);
    }
    for (int p : nprobes) {
      if (p > index->nlist()) continue;
      QueryEngine::Options eo;
      eo.ivf = index.get();
      eo.nprobe = p;
      const Run ann = Queries(**store, eo, queries, 100);
      const double p50 = rapidin::bench::Median(ann.ms);
      const double r10h = Recall(ann.helpful, exact.helpful, 10), r10m = Recall(ann.harmful, exact.harmful, 10);
      const double r100h = Recall(ann.helpful, exact.helpful, 100), r100m = Recall(ann.harmful, exact.harmful, 100);
      const double frac = double(ann.rows_scored) / (double(cs.n) * nqueries);
      nlohmann::json pt = {{"index", "ivf"},          {"nprobe", p},
                           {"build_s", build_s},       {"rows_scored_fraction", frac},
                           {"recall10_helpful", r10h}, {"recall10_harmful", r10m},
                           {"recall100_helpful", r100h}, {"recall100_harmful", r100m},
                           {"p50_ms", p50},            {"speedup", exact_p50 / p50}};
      c["points"].push_back(pt);
      if (std::min(r10h, r10m) >= target_recall &&
          (best.is_null() || pt["speedup"].get<double>() > best["speedup"].get<double>())) {
        best = pt;
      }
      md += absl::StrFormat("| %d | %.1f%% | %.3f / %.3f | %.3f / %.3f | %.2f | %.1fx |\n", p, 100 * frac, r10h, r10m,
                            r100h, r100m, p50, exact_p50 / p50);
      std::fprintf(stderr, "  nprobe %d: scored %.1f%%, recall@10 %.3f/%.3f, @100 %.3f/%.3f, p50 %.2f ms, %.1fx\n", p,
                   100 * frac, r10h, r10m, r100h, r100m, p50, exact_p50 / p50);
    }
    index.reset();
    // The PCA index: codes scanned in full, candidates re-scored exactly. recall@10 and p50 from top-10 queries
    // (what a user asking for 10 gets: candidates = max(min, factor * 10)), recall@100 from top-100 queries.
    for (int dim : pca_dims) {
      PcaOptions po;
      po.dim = dim;
      po.progress = io.progress;
      const auto tp = Clock::now();
      auto pca = PcaIndex::Build(**store, po);
      if (!pca.ok()) Die(pca.status());
      const double pca_build_s = Since(tp);
      md += absl::StrFormat(
          "\nPCA index dim %d (codes %.0f MB), built in %.1f s:\n\n| candidates per end and worker (k=10 / k=100) | "
          "rows scored exactly | recall@10 helpful / harmful | recall@100 helpful / harmful | p50 ms (k=10) | "
          "speed-up |\n|---|---|---|---|---|---|\n",
          dim, double(cs.n) * dim / 1e6, pca_build_s);  // int8 codes: dim bytes a row
      for (int min_candidates : pca_mins) {
        QueryEngine::Options eo;
        eo.pca = pca->get();
        eo.candidates_per_k = factor;
        eo.min_candidates = min_candidates;
        const Run r10 = Queries(**store, eo, queries, 10);
        const Run r100 = Queries(**store, eo, queries, 100);
        const double p50 = rapidin::bench::Median(r10.ms);
        const double r10h = Recall(r10.helpful, exact.helpful, 10), r10m = Recall(r10.harmful, exact.harmful, 10);
        const double r100h = Recall(r100.helpful, exact.helpful, 100),
                     r100m = Recall(r100.harmful, exact.harmful, 100);
        const double frac = double(r10.rows_scored) / (double(cs.n) * nqueries);
        const int c10 = std::max(min_candidates, factor * 10), c100 = std::max(min_candidates, factor * 100);
        nlohmann::json pt = {{"index", "pca"},           {"dim", dim},
                             {"candidates_k10", c10},    {"candidates_k100", c100},
                             {"build_s", pca_build_s},   {"rows_scored_fraction", frac},
                             {"recall10_helpful", r10h}, {"recall10_harmful", r10m},
                             {"recall100_helpful", r100h}, {"recall100_harmful", r100m},
                             {"p50_ms", p50},            {"speedup", exact_p50 / p50}};
        c["points"].push_back(pt);
        if (std::min(r10h, r10m) >= target_recall &&
            (best.is_null() || pt["speedup"].get<double>() > best["speedup"].get<double>())) {
          best = pt;
        }
        md += absl::StrFormat("| %d / %d | %.2f%% | %.3f / %.3f | %.3f / %.3f | %.2f | %.1fx |\n", c10, c100,
                              100 * frac, r10h, r10m, r100h, r100m, p50, exact_p50 / p50);
        std::fprintf(stderr, "  pca dim %d cand %d: exact %.2f%%, recall@10 %.3f/%.3f, @100 %.3f/%.3f, p50 %.2f ms "
                     "(workers %.2f ms), %.1fx\n", dim, c10, 100 * frac, r10h, r10m, r100h, r100m, p50,
                     rapidin::bench::Median(r10.worker_ms), exact_p50 / p50);
      }
    }
    c["first_point_with_recall10_at_target"] = best;
    md += best.is_null() ? absl::StrFormat("\nNo setting tried reached recall@10 >= %.2f at both ends.\n\n", target_recall)
                         : absl::StrFormat("\nFastest setting with recall@10 >= %.2f at both ends: %s (%.1fx).\n\n",
                                           target_recall, best.dump(), best["speedup"].get<double>());
    out["cases"].push_back(c);
    if (cs.data == "anchored" && cs.n == sizes.back() && !best.is_null()) {
      out["ann_recall_at_10"] = std::min(best["recall10_helpful"].get<double>(), best["recall10_harmful"].get<double>());
      out["ann_speedup"] = best["speedup"];
      out["ann_n"] = cs.n;
      out["ann_setting"] = best;
    }
  }
  // How the cost grows with N: the exact scan, and each index at its fastest setting that meets the target.
  md += "## Cost against N (anchored data)\n\n| N | exact p50 ms | index at recall@10 >= target | p50 ms | speed-up | "
        "build s |\n|---|---|---|---|---|---|\n";
  for (const auto& c : out["cases"]) {
    if (c["data"] != "anchored") continue;
    const auto& b = c["first_point_with_recall10_at_target"];
    md += b.is_null() ? absl::StrFormat("| %lld | %.1f | none | | | |\n", c["n"].get<long long>(),
                                        c["exact_p50_ms"].get<double>())
                      : absl::StrFormat("| %lld | %.1f | %s | %.2f | %.1fx | %.1f |\n", c["n"].get<long long>(),
                                        c["exact_p50_ms"].get<double>(),
                                        b["index"] == "pca" ? absl::StrCat("pca dim ", b["dim"].get<int>(), ", ",
                                                                           b["candidates_k10"].get<int>(), " cand.")
                                                            : absl::StrCat("ivf nprobe ", b["nprobe"].get<int>()),
                                        b["p50_ms"].get<double>(), b["speedup"].get<double>(),
                                        b["build_s"].get<double>());
  }
  if (!md_path.empty()) std::ofstream(md_path) << md;
  if (!json_path.empty()) std::ofstream(json_path) << out.dump(1) << "\n";
  std::printf("%s", md.c_str());
  return 0;
}
