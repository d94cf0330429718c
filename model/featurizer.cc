#include "model/featurizer.h"

#include <algorithm>
#include <cmath>
#include <chrono>
#include <thread>
#include <filesystem>
#include <fstream>
#include <map>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include <nlohmann/json.hpp>

#include "model/internal/device_sketch.h"

namespace rapidin::model {
namespace {

// Finite weights can still overflow in the forward pass; a NaN or Inf compressed gradient would be refused by the
// store, or score as NaN, so it is an error here, named for what it is.
template <class T>
absl::Status CheckFinite(const std::vector<T>& v, const char* what) {
  for (T x : v) {
    if (!std::isfinite(x)) {
      return absl::FailedPreconditionError(
          absl::StrCat(what, " is not finite: the model's activations overflow on this example"));
    }
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status ResolveTokenizer(EngineOptions* eo) {
  if (!eo->tokenizer_path.empty()) return absl::OkStatus();
  // llama2.c keeps its tokenizer next to the checkpoint; a Hugging Face directory holds a SentencePiece model or
  // a tokenizer.json (the SentencePiece model first when both are there: Llama 2's tokenizer.json is not
  // byte-level).
  const std::filesystem::path model(eo->model_path);
  const auto dir = std::filesystem::is_directory(model) ? model : model.parent_path();
  for (const char* name : {"tokenizer.bin", "tok512.bin", "tokenizer.model", "tokenizer.json"}) {
    if (std::filesystem::exists(dir / name)) {
      eo->tokenizer_path = (dir / name).string();
      return absl::OkStatus();
    }
  }
  if (std::filesystem::exists(eo->model_path) && !std::filesystem::is_directory(model)) {
    return absl::InvalidArgumentError(absl::StrCat("no llama2.c tokenizer.bin with ", eo->model_path,
                                                   "; pass the tokenizer path (--tokenizer)"));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<Featurizer>> Featurizer::Create(const FeaturizerOptions& options) {
  std::unique_ptr<Featurizer> f(new Featurizer());
  EngineOptions eo = options.engine;
  absl::Status tst = ResolveTokenizer(&eo);
  if (!tst.ok()) return tst;
  auto engine = GradientEngine::Load(eo);
  if (!engine.ok()) return engine.status();
  f->engine_ = std::move(*engine);
  if (f->engine_->tokenizer() == nullptr) {  // every record would fail one by one
    return absl::InvalidArgumentError(absl::StrCat("no tokenizer for ", eo.model_path,
                                                   ": pass its tokenizer.bin or tokenizer.model (--tokenizer)"));
  }
  f->token_method_ = options.token_method;
  f->unit_norm_ = options.unit_norm;
  f->layer_norm_ = options.layer_norm;
  std::string error;
  auto sketch = kernels::RapidGrad::Create({f->engine_->grad_dim(), options.k, options.lambda, options.seed}, &error);
  if (sketch == nullptr) return absl::InvalidArgumentError(error);
  f->sketch_ = std::move(sketch);
  if (const int index = f->engine_->cuda_device(); index >= 0) {
    auto device_sketch = internal::MakeDeviceSketch(*f->sketch_, index);  // null without the CUDA layer
    if (!device_sketch.ok()) return device_sketch.status();
    f->device_sketch_ = std::move(*device_sketch);
  }
  std::vector<std::string> names;
  for (const auto& p : f->engine_->params()) names.push_back(p.name);
  f->state_ = absl::StrCat(f->sketch_->Describe(), "\nmodel=", f->engine_->model_hash(),
                           " max_length=", options.engine.max_length, " tensors=", names.size(), "\n");
  const std::string pre = f->engine_->preconditioner();
  if (options.unit_norm || pre != "none" || !options.layer_norm) {
    absl::StrAppend(&f->state_, "score=", options.unit_norm ? "cosine" : "dot", " precondition=", pre,
                    options.layer_norm ? "" : " normalize=none", "\n");
  }
  // TracIn-CP: every earlier checkpoint must select the same parameters, so that one sketch serves them all.
  std::vector<std::string> weights, hashes;
  for (const CheckpointOptions& c : options.checkpoints) {
    if (!(c.weight > 0) || !std::isfinite(c.weight)) {
      return absl::InvalidArgumentError(absl::StrCat("checkpoint ", c.model_path, ": weight must be > 0"));
    }
    EngineOptions ce = eo;
    ce.model_path = c.model_path;
    ce.adapter_path = c.adapter_path;
    ce.preconditioner_path = c.preconditioner_path;
    auto e = GradientEngine::Load(ce);
    if (!e.ok()) return e.status();
    std::vector<std::string> cn;
    for (const auto& p : (*e)->params()) cn.push_back(p.name);
    if (cn != names || (*e)->grad_dim() != f->engine_->grad_dim()) {
      return absl::InvalidArgumentError(absl::StrCat("checkpoint ", c.model_path, " has other parameters (",
                                                     cn.size(), " tensors, ", (*e)->grad_dim(),
                                                     " values) than the model (", names.size(), ", ",
                                                     f->engine_->grad_dim(), ")"));
    }
    if (((*e)->preconditioner() == "none") != (pre == "none")) {
      return absl::InvalidArgumentError(
          absl::StrCat("checkpoint ", c.model_path, ": every checkpoint needs an optimizer state, or none"));
    }
    f->scale_.push_back(std::sqrt(c.weight));
    weights.push_back(absl::StrFormat("%.9g", c.weight));
    hashes.push_back((*e)->model_hash());
    f->earlier_.push_back(std::move(*e));
  }
  if (!options.checkpoints.empty()) {
    if (!(options.weight > 0) || !std::isfinite(options.weight)) {
      return absl::InvalidArgumentError("the final checkpoint's weight must be > 0");
    }
    weights.push_back(absl::StrFormat("%.9g", options.weight));
    absl::StrAppend(&f->state_, "tracincp=", options.checkpoints.size() + 1, " weights=", absl::StrJoin(weights, ","),
                    " earlier=", absl::StrJoin(hashes, ","), "\n");
  }
  f->scale_.push_back(f->earlier_.empty() ? 1.0 : std::sqrt(options.weight));
  return f;
}

Featurizer::~Featurizer() = default;

namespace {

// Unit L2 norm (accumulated in double); a zero vector stays zero.
void UnitNorm(std::vector<float>* v) {
  double ss = 0;
  for (float x : *v) ss += static_cast<double>(x) * x;
  if (!(ss > 0)) return;
  const double inv = 1.0 / std::sqrt(ss);
  for (float& x : *v) x = static_cast<float>(x * inv);
}

}  // namespace

absl::StatusOr<GradInfo> Featurizer::Compress(const Example& ex, std::vector<float>* out, Timing* timing) const {
  // A batch of one: the same tokenisation, gradient (GradientIds is GradientIdsBatch of one), sketch and checks.
  std::vector<std::vector<float>> outs;
  std::vector<absl::StatusOr<GradInfo>> infos;
  CompressBatch({ex}, &outs, &infos, timing);
  if (infos[0].ok()) *out = std::move(outs[0]);
  return infos[0];
}

void Featurizer::CompressBatch(const std::vector<Example>& exs, std::vector<std::vector<float>>* out,
                               std::vector<absl::StatusOr<GradInfo>>* infos, Timing* timing) const {
  out->assign(exs.size(), {});
  infos->assign(exs.size(), absl::UnknownError("not computed"));
  std::vector<TokenizedExample> batch;
  std::vector<size_t> where;
  for (size_t i = 0; i < exs.size(); ++i) {
    auto t = engine_->Tokenize(exs[i]);
    if (!t.ok()) {
      (*infos)[i] = t.status();
      continue;
    }
    batch.push_back(std::move(*t));
    where.push_back(i);
  }
  std::vector<GradInfo> gi;
  std::vector<std::vector<float>> part;
  // Earlier checkpoints first, the model last (its GradInfo, the loss of the final model, is reported).
  for (size_t c = 0; c <= earlier_.size() && !batch.empty(); ++c) {
    const GradientEngine& e = c < earlier_.size() ? *earlier_[c] : *engine_;
    absl::Status st = CompressWith(e, batch, &part, &gi, timing);
    if (!st.ok()) {
      for (size_t i : where) (*infos)[i] = st;
      return;
    }
    const float sc = static_cast<float>(scale_[c]);
    for (size_t j = 0; j < where.size(); ++j) {
      auto& o = (*out)[where[j]];
      if (scale_.size() == 1) {
        o = std::move(part[j]);
        continue;
      }
      for (float x : part[j]) o.push_back(x * sc);
    }
  }
  for (size_t j = 0; j < where.size(); ++j) {
    auto& o = (*out)[where[j]];
    if (unit_norm_) UnitNorm(&o);
    absl::Status fin = CheckFinite(o, "the compressed gradient");
    (*infos)[where[j]] = fin.ok() ? absl::StatusOr<GradInfo>(gi[j]) : fin;
  }
}

absl::Status Featurizer::CompressWith(const GradientEngine& e, const std::vector<TokenizedExample>& batch,
                                      std::vector<std::vector<float>>* out, std::vector<GradInfo>* gi,
                                      Timing* timing) const {
  using Clock = std::chrono::steady_clock;
  const auto t0 = Clock::now();
  const int64_t k = sketch_->params().k;
  out->assign(batch.size(), {});
  if (device_sketch_ || e.grad_path() == "direct") {
    // Rows in float32 where the engine writes them, sketched there: in device memory by the device sketch, or in host
    // memory (the direct pass's, normalised as they are written) one row at a time.
    double sketch_s = 0;
    absl::Status st = e.GradientRowsBatch(
        batch, layer_norm_,
        [&](const float* rows, int64_t n) {
          const auto ts = Clock::now();
          absl::Status s;
          if (device_sketch_) {
            std::vector<float> all(n * k);
            s = device_sketch_->Apply(rows, n, all.data());
            for (int64_t j = 0; s.ok() && j < n; ++j) (*out)[j].assign(all.begin() + j * k, all.begin() + (j + 1) * k);
          } else {
            for (int64_t j = 0; j < n; ++j) {
              (*out)[j].resize(k);
              sketch_->Apply(rows + j * e.grad_dim(), (*out)[j].data());
            }
          }
          sketch_s = std::chrono::duration<double>(Clock::now() - ts).count();
          return s;
        },
        gi);
    if (!st.ok()) return st;
    if (timing) {  // the normalisation is part of writing the rows, in grad
      timing->grad += std::chrono::duration<double>(Clock::now() - t0).count() - sketch_s;
      timing->sketch += sketch_s;
    }
    return absl::OkStatus();
  }
  std::vector<std::vector<double>> grads;
  absl::Status st = e.GradientIdsBatch(batch, layer_norm_, &grads, gi);
  if (!st.ok()) return st;
  const auto t1 = Clock::now();
  double sketch_s = 0;
  std::vector<float> gf;
  for (size_t j = 0; j < batch.size(); ++j) {
    gf.assign(grads[j].begin(), grads[j].end());
    const auto ts = Clock::now();
    (*out)[j].resize(k);
    sketch_->Apply(gf.data(), (*out)[j].data());
    sketch_s += std::chrono::duration<double>(Clock::now() - ts).count();
  }
  if (timing) {
    timing->grad += std::chrono::duration<double>(t1 - t0).count();
    timing->sketch += sketch_s;
    timing->normalize += std::chrono::duration<double>(Clock::now() - t1).count() - sketch_s;
  }
  return absl::OkStatus();
}

TokenGradOptions Featurizer::TokenOptions(int n) const {
  TokenGradOptions o;
  o.method = token_method_;
  o.normalize = layer_norm_;
  o.threads = static_cast<int>(std::max(1u, std::min(4u, std::thread::hardware_concurrency())));
  // Enough chunks for every thread, none longer than 8 tokens (the fastest size in bench/results/tokens.md).
  o.chunk = std::max(1, std::min(8, (n + o.threads - 1) / o.threads));
  return o;
}

absl::Status Featurizer::TokenScores(const std::vector<int32_t>& ids, int from, const std::vector<float>& q,
                                     std::vector<double>* out) const {
  if (static_cast<int64_t>(q.size()) != dim()) {
    return absl::InvalidArgumentError(absl::StrCat("query vector has ", q.size(), " values, the featurizer ", dim()));
  }
  std::vector<double> u(engine_->grad_dim());
  sketch_->ApplyTranspose(q.data() + final_offset(), u.data());
  absl::Status st = engine_->TokenScores(ids, from, TokenOptions(static_cast<int>(ids.size()) - from), u, out);
  return st.ok() ? CheckFinite(*out, "a token's score") : st;
}

absl::Status Featurizer::TokenSketches(const std::vector<int32_t>& ids, int from,
                                      std::vector<std::vector<float>>* out) const {
  const int n = static_cast<int>(ids.size()) - from;
  const TokenGradOptions o = TokenOptions(n);
  // Chunk by chunk as float32 rows, sketched as they come (never every token's full gradient at once): on the
  // engine's device by the device sketch, else on the CPU row by row.
  const int64_t k = sketch_->params().k, dim = engine_->grad_dim();
  if (n > 0) out->assign(n, std::vector<float>(k));
  return engine_->TokenGradientRows(ids, from, o, [&](const float* rows, int first, int count) {
    if (device_sketch_) {
      std::vector<float> sk(static_cast<size_t>(count) * k);
      absl::Status s = device_sketch_->Apply(rows, count, sk.data());
      if (s.ok()) s = CheckFinite(sk, "a token's compressed gradient");
      for (int i = 0; s.ok() && i < count; ++i) (*out)[first + i].assign(sk.begin() + i * k, sk.begin() + (i + 1) * k);
      return s;
    }
    for (int i = 0; i < count; ++i) {
      std::vector<float>& sk = (*out)[first + i];
      sketch_->Apply(rows + i * dim, sk.data());
      if (absl::Status fin = CheckFinite(sk, "a token's compressed gradient"); !fin.ok()) return fin;
    }
    return absl::OkStatus();
  });
}

absl::StatusOr<double> Featurizer::RecordTokenInfluence(const TokenizedExample& t, const std::vector<float>& q,
                                                        std::vector<double>* scores) const {
  if (static_cast<int64_t>(q.size()) != dim()) {
    return absl::InvalidArgumentError(absl::StrCat("query vector has ", q.size(), " values, the featurizer ", dim()));
  }
  // Under TracIn-CP the score is the sum over checkpoints c of <N_c(grad L_c(t)), scale_c C^T q_c>, so the view
  // is that sum too: one double backward per checkpoint, each at its own weights.
  const int64_t k = sketch_->params().k;
  std::vector<double> u(engine_->grad_dim()), part;
  double total = 0;
  for (size_t c = 0; c <= earlier_.size(); ++c) {
    const GradientEngine& e = c < earlier_.size() ? *earlier_[c] : *engine_;
    sketch_->ApplyTranspose(q.data() + k * static_cast<int64_t>(c), u.data());
    for (double& x : u) x *= scale_[c];
    auto i = e.InfluenceTokens(t, u, c == 0 ? scores : &part, nullptr, layer_norm_);
    if (!i.ok()) return i.status();
    total += *i;
    if (c > 0) {
      for (size_t s = 0; s < part.size(); ++s) (*scores)[s] += part[s];
    }
  }
  return total;
}

absl::StatusOr<FeaturizerOptions> OptionsFromState(const std::string& state, const EngineOptions& engine,
                                                   const std::string& checkpoints_summary) {
  FeaturizerOptions o;
  o.engine = engine;
  int64_t d = 0;
  int found = 0, tracincp = 0;
  std::string precondition = "none";
  for (absl::string_view tok : absl::StrSplit(state, absl::ByAnyChar(" \n"), absl::SkipEmpty())) {
    std::pair<std::string, std::string> kv = absl::StrSplit(tok, absl::MaxSplits('=', 1));
    const std::string& v = kv.second;
    bool ok = true;
    if (kv.first == "k") ok = absl::SimpleAtoi(v, &o.k), ++found;
    else if (kv.first == "lambda") ok = absl::SimpleAtoi(v, &o.lambda), ++found;
    else if (kv.first == "seed") ok = absl::SimpleAtoi(v, &o.seed), ++found;
    else if (kv.first == "max_length") ok = absl::SimpleAtoi(v, &o.engine.max_length), ++found;
    else if (kv.first == "d") ok = absl::SimpleAtoi(v, &d);
    else if (kv.first == "precondition") precondition = v;
    else if (kv.first == "tracincp") ok = absl::SimpleAtoi(v, &tracincp) && tracincp >= 2;
    else if (kv.first == "normalize") {
      ok = v == "none" || v == "layer";
      o.layer_norm = v != "none";
    } else if (kv.first == "score") {
      ok = v == "dot" || v == "cosine";
      o.unit_norm = v == "cosine";
    }
    if (!ok) return absl::DataLossError(absl::StrCat("projection state: bad value in \"", tok, "\""));
  }
  if (state.empty()) {
    return absl::FailedPreconditionError(
        "the store has no projection state: it holds precomputed vectors (created with --k), not gradients "
        "compressed from a model; build a store with `rapidin cache` to query by text");
  }
  if (state.rfind("rapidgrad/v1 ", 0) != 0 || found != 4) {
    return absl::FailedPreconditionError(
        "the store's projection state is not a rapidgrad/v1 state (was it built by `rapidin cache`?)");
  }
  if (precondition != "none" && engine.preconditioner_path.empty()) {
    return absl::FailedPreconditionError(absl::StrCat(
        "the store was cached with Adam preconditioning (", precondition,
        "): give the same optimizer state (--preconditioner, the optimizer.safetensors of `rapidin finetune`)"));
  }
  if (tracincp > 0 && checkpoints_summary.empty()) {
    return absl::FailedPreconditionError(absl::StrCat(
        "the store was cached with TracIn-CP over ", tracincp,
        " checkpoints: give the same ones (--checkpoints, the JSON summary of `rapidin finetune --checkpoint-every`)"));
  }
  if (!checkpoints_summary.empty()) {
    if (tracincp == 0) {
      return absl::FailedPreconditionError(
          "--checkpoints was given, but the store was cached from one model (no TracIn-CP in its projection state)");
    }
    absl::Status st = ReadFinetuneCheckpoints(checkpoints_summary, precondition != "none", &o);
    if (!st.ok()) return st;
  }
  return o;
}

absl::Status ReadFinetuneCheckpoints(const std::string& summary_path, bool precondition, FeaturizerOptions* fo) {
  std::ifstream in(summary_path);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot read the fine-tuning summary ", summary_path));
  const nlohmann::json j = nlohmann::json::parse(in, nullptr, /*allow_exceptions=*/false);
  auto bad = [&](const std::string& why) {
    return absl::DataLossError(absl::StrCat(summary_path, ": ", why, " (expected the JSON summary of "
                                            "`rapidin finetune --json --checkpoint-every N`)"));
  };
  if (j.is_discarded() || !j.is_object()) return bad("not a JSON object");
  if (!j.contains("checkpoints") || !j["checkpoints"].is_array()) return bad("no \"checkpoints\" list");
  const auto& cs = j["checkpoints"];
  if (cs.size() < 2) {
    return absl::InvalidArgumentError(absl::StrCat(summary_path, " lists ", cs.size(),
                                                   " checkpoint(s); TracIn-CP needs at least 2"));
  }
  std::vector<CheckpointOptions> out;
  for (const auto& c : cs) {
    if (!c.is_object() || !c.contains("path") || !c["path"].is_string() || !c.contains("lr") ||
        !c["lr"].is_number() || !c.contains("optimizer_state") || !c["optimizer_state"].is_string()) {
      return bad("a checkpoint without path, optimizer_state or lr");
    }
    CheckpointOptions co;
    const std::string path = c["path"].get<std::string>();
    // A LoRA checkpoint is an adapter directory over the base model; a full one is a model file.
    if (std::filesystem::exists(std::filesystem::path(path) / "adapter_config.json")) {
      co.model_path = fo->engine.model_path;
      co.adapter_path = path;
    } else {
      co.model_path = path;
    }
    if (precondition) co.preconditioner_path = c["optimizer_state"].get<std::string>();
    co.weight = c["lr"].get<double>();
    out.push_back(std::move(co));
  }
  const CheckpointOptions& last = out.back();
  const std::string& mine = fo->engine.adapter_path.empty() ? fo->engine.model_path : fo->engine.adapter_path;
  const std::string& theirs = last.adapter_path.empty() ? last.model_path : last.adapter_path;
  std::error_code ec;
  if (!std::filesystem::equivalent(mine, theirs, ec)) {
    return absl::InvalidArgumentError(absl::StrCat("the last checkpoint of ", summary_path, " is ", theirs,
                                                   ", not the model given (", mine, ")"));
  }
  fo->weight = last.weight;
  out.pop_back();
  fo->checkpoints = std::move(out);
  return absl::OkStatus();
}

std::string DescribeStateDifference(const std::string& store_state, const std::string& model_state) {
  if (store_state == model_state) return "";
  auto fields = [](const std::string& s) {
    std::map<std::string, std::string> m;
    for (absl::string_view line : absl::StrSplit(s, '\n', absl::SkipEmpty())) {
      for (absl::string_view tok : absl::StrSplit(line, ' ', absl::SkipEmpty())) {
        std::pair<std::string, std::string> kv = absl::StrSplit(tok, absl::MaxSplits('=', 1));
        if (!kv.second.empty()) m[kv.first] = kv.second;
      }
    }
    return m;
  };
  if (store_state.empty()) return "the store has no projection state (it was not built by `rapidin cache`)";
  auto a = fields(store_state), b = fields(model_state);
  std::vector<std::string> diffs;
  for (const auto& [k, v] : a) {
    auto it = b.find(k);
    if (it == b.end()) diffs.push_back(absl::StrCat(k, ": store ", v, ", model has none"));
    else if (it->second != v) diffs.push_back(absl::StrCat(k, ": store ", v, ", model ", it->second));
  }
  if (diffs.empty()) return absl::StrCat("projection states differ: store \"", store_state, "\" vs \"", model_state, "\"");
  return absl::StrJoin(diffs, "; ");
}

}  // namespace rapidin::model
