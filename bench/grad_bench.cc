// The caching stage's gradients on each model device, side by side in one run: per-record gradients (padded
// batches, as `rapidin cache --grad-batch`) and per-token gradients (the shared method, as token attributions),
// on a random Llama-architecture model of a chosen size (or a model file), in float32. Every device's first
// record and first tokens are checked against the first device's (largest difference relative to the largest
// value, printed). Times include bringing the normalised gradient back to host memory, as the product does.
// Usage: grad_bench [--devices LIST (default: cpu, and cuda when usable; cpu64: the CPU in float64)]
//                   [--dim 512 --layers 8 --heads 8 --kv-heads 8 --hidden 1376
//                   --vocab 32000] [--model PATH] [--tokens 256] [--records 16] [--batch 8] [--lora RANK]
//                   [--token-positions 32] [--threads N] [--json]
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "model/engine.h"
#include "model/training.h"
#include "nlohmann/json.hpp"

namespace {

using rapidin::model::GradientEngine;
using rapidin::model::TokenizedExample;

double Seconds(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

double RelDiff(const std::vector<double>& ref, const std::vector<double>& got) {
  double big = 0, worst = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    big = std::max(big, std::fabs(ref[i]));
    worst = std::max(worst, std::fabs(ref[i] - got[i]));
  }
  return big > 0 ? worst / big : worst;
}

struct Row {
  std::string device;
  double record_ms = 0, token_ms = 0, record_diff = 0, token_diff = 0;
  bool ok = false;
  std::string error;
};

}  // namespace

int main(int argc, char** argv) {
  const auto rt = rapidin::model::GetTorchRuntime();
  std::string devices = rt.cuda_devices > 0 ? "cpu,cuda" : "cpu", model;
  rapidin::model::ModelConfig c;
  c.dim = 512, c.hidden_dim = 1376, c.n_layers = 8, c.n_heads = 8, c.n_kv_heads = 8, c.vocab_size = 32000;
  c.tied_output = false;
  int tokens = 256, records = 16, batch = 8, lora = 0, positions = 32;
  int threads = static_cast<int>(std::thread::hardware_concurrency());
  bool json = false;
  for (int i = 1; i < argc; ++i) {
    auto next = [&]() -> const char* {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "grad_bench: %s needs a value\n", argv[i]);
        std::exit(2);
      }
      return argv[++i];
    };
    const std::string a = argv[i];
    if (a == "--devices") devices = next();
    else if (a == "--model") model = next();
    else if (a == "--dim") c.dim = std::atoi(next());
    else if (a == "--layers") c.n_layers = std::atoi(next());
    else if (a == "--heads") c.n_heads = std::atoi(next());
    else if (a == "--kv-heads") c.n_kv_heads = std::atoi(next());
    else if (a == "--hidden") c.hidden_dim = std::atoi(next());
    else if (a == "--vocab") c.vocab_size = std::atoi(next());
    else if (a == "--tokens") tokens = std::atoi(next());
    else if (a == "--records") records = std::atoi(next());
    else if (a == "--batch") batch = std::atoi(next());
    else if (a == "--lora") lora = std::atoi(next());
    else if (a == "--token-positions") positions = std::atoi(next());
    else if (a == "--threads") threads = std::atoi(next());
    else if (a == "--json") json = true;
    else {
      std::fprintf(stderr, "grad_bench: unknown argument %s (see the header of bench/grad_bench.cc)\n", argv[i]);
      return 2;
    }
  }
  if (tokens < 4 || records < 1 || batch < 1 || positions < 1 || positions >= tokens || threads < 1) {
    std::fprintf(stderr, "grad_bench: bad sizes\n");
    return 2;
  }
  c.seq_len = tokens;
  rapidin::model::SetComputeThreads(threads);  // LibTorch's CPU threads (the GPU run uses them for host work)

  // The same random records for every device: the second half of each is the response.
  std::mt19937 rng(1);
  std::vector<TokenizedExample> recs(records);
  const int vocab = model.empty() ? c.vocab_size : 0;
  std::vector<std::string> names;
  std::stringstream ss(devices);
  for (std::string d; std::getline(ss, d, ',');) names.push_back(d);

  std::vector<Row> rows;
  std::vector<double> ref_record;
  std::vector<std::vector<double>> ref_tokens;
  rapidin::model::ModelConfig used = c;
  int64_t grad_dim = 0;
  for (const auto& dev : names) {
    Row row;
    row.device = dev;
    rapidin::model::EngineOptions o;
    // "cpu64": the CPU in float64, so that the table shows what float32 rounding alone gives on this model (a
    // device's difference from the first one is comparable to it, or a fault).
    o.device = dev == "cpu64" ? "cpu" : dev;
    o.use_double = dev == "cpu64";
    absl::StatusOr<std::unique_ptr<GradientEngine>> e =
        model.empty() ? GradientEngine::Random(c, 7, o) : (o.model_path = model, GradientEngine::Load(o));
    if (e.ok() && lora > 0) {
      rapidin::model::LoraConfig lc;
      lc.rank = lora;
      absl::Status st = rapidin::model::AddLora(e->get(), lc);
      if (!st.ok()) e = st;
    }
    if (!e.ok()) {
      row.error = std::string(e.status().message());
      rows.push_back(row);
      continue;
    }
    used = (*e)->config();
    grad_dim = (*e)->grad_dim();
    if (recs[0].ids.empty()) {
      const int v = vocab > 0 ? vocab : used.vocab_size;
      const int len = std::min(tokens, used.seq_len);
      for (auto& r : recs) {
        for (int i = 0; i < len; ++i) r.ids.push_back(static_cast<int32_t>(rng() % v));
        r.response_begin = len / 2;
      }
    }
    std::vector<std::vector<double>> out;
    std::vector<rapidin::model::GradInfo> infos;
    absl::Status st = (*e)->GradientIdsBatch({recs.begin(), recs.begin() + std::min(batch, records)}, true, &out,
                                             &infos);  // warm-up (and the cross-check's record)
    if (st.ok()) {
      if (ref_record.empty()) ref_record = out[0];
      row.record_diff = RelDiff(ref_record, out[0]);
      const auto t0 = std::chrono::steady_clock::now();
      for (int b = 0; b < records && st.ok(); b += batch) {
        std::vector<TokenizedExample> part(recs.begin() + b, recs.begin() + std::min(records, b + batch));
        st = (*e)->GradientIdsBatch(part, true, &out, &infos);
      }
      row.record_ms = Seconds(t0) * 1e3 / records;
    }
    if (st.ok()) {  // the last `positions` tokens of record 0, 8 losses per backward pass
      rapidin::model::TokenGradOptions to;
      to.chunk = 8;
      const int from = static_cast<int>(recs[0].ids.size()) - positions;
      std::vector<std::vector<double>> tg;
      st = (*e)->TokenGradientsIds(recs[0].ids, from, to, &tg);  // warm-up
      const auto t0 = std::chrono::steady_clock::now();
      if (st.ok()) st = (*e)->TokenGradientsIds(recs[0].ids, from, to, &tg);
      row.token_ms = Seconds(t0) * 1e3 / positions;
      if (st.ok()) {
        if (ref_tokens.empty()) ref_tokens = tg;
        for (size_t t = 0; t < tg.size(); ++t) row.token_diff = std::max(row.token_diff, RelDiff(ref_tokens[t], tg[t]));
      }
    }
    row.ok = st.ok();
    if (!st.ok()) row.error = std::string(st.message());
    rows.push_back(row);
  }

  bool all = true;
  for (const Row& r : rows) all = all && r.ok;
  if (json) {
    nlohmann::json j = {{"libtorch", rt.version}, {"cuda_devices", rt.cuda_devices}, {"dim", used.dim},
                        {"layers", used.n_layers}, {"vocab", used.vocab_size}, {"tokens", tokens}, {"lora", lora},
                        {"grad_dim", grad_dim}, {"threads", threads}, {"rows", nlohmann::json::array()}};
    for (const Row& r : rows) {
      j["rows"].push_back({{"device", r.device}, {"ok", r.ok}, {"ms_per_record", r.record_ms},
                           {"ms_per_token", r.token_ms}, {"record_rel_diff", r.record_diff},
                           {"token_rel_diff", r.token_diff}, {"error", r.error}});
    }
    std::printf("%s\n", j.dump().c_str());
    return all ? 0 : 1;
  }
  std::printf("LibTorch %s, %d CUDA device(s); model dim %d, %d layers, vocab %d; %d-token records (half response), "
              "%s, gradient dimension %lld; CPU threads %d\n\n",
              rt.version.c_str(), rt.cuda_devices, used.dim, used.n_layers, used.vocab_size, tokens,
              lora > 0 ? ("LoRA r" + std::to_string(lora)).c_str() : "every matrix",
              static_cast<long long>(grad_dim), threads);
  std::printf("| device | ms per record (batches of %d) | ms per token (shared, last %d tokens) | record diff | "
              "token diff |\n|---|---|---|---|---|\n",
              batch, positions);
  for (const Row& r : rows) {
    if (!r.ok) {
      std::printf("| %s | not run: %s | | | |\n", r.device.c_str(), r.error.c_str());
      continue;
    }
    std::printf("| %s | %.2f | %.2f | %.1e | %.1e |\n", r.device.c_str(), r.record_ms, r.token_ms, r.record_diff,
                r.token_diff);
  }
  // Speed against the float32 CPU when it ran (the differences above are against the first device).
  size_t base = 0;
  for (size_t i = 0; i < rows.size(); ++i) {
    if (rows[i].device == "cpu") base = i;
  }
  for (size_t i = 0; i < rows.size(); ++i) {
    if (i == base || !rows[i].ok || !rows[base].ok) continue;
    std::printf("\n%s vs %s: %.1fx per record, %.1fx per token\n", rows[i].device.c_str(), rows[base].device.c_str(),
                rows[base].record_ms / rows[i].record_ms, rows[base].token_ms / rows[i].token_ms);
  }
  return all ? 0 : 1;
}
