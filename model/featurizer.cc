#include "model/featurizer.h"

#include <chrono>
#include <map>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"

namespace rapidin::model {

absl::StatusOr<std::unique_ptr<Featurizer>> Featurizer::Create(const FeaturizerOptions& options) {
  std::unique_ptr<Featurizer> f(new Featurizer());
  auto engine = GradientEngine::Load(options.engine);
  if (!engine.ok()) return engine.status();
  f->engine_ = std::move(*engine);
  if (!f->engine_->tokenizer()) return absl::InvalidArgumentError("a tokenizer is required (--tokenizer)");
  auto sketch = kernels::RapidGrad::Create({f->engine_->grad_dim(), options.k, options.lambda, options.seed});
  if (!sketch.ok()) return sketch.status();
  f->sketch_ = std::move(*sketch);
  std::vector<std::string> names;
  for (const auto& p : f->engine_->params()) names.push_back(p.name);
  f->state_ = absl::StrCat(f->sketch_->Describe(), "\nmodel=", f->engine_->model_hash(),
                           "\nparams=", names.size(), " tensors, D=", f->engine_->grad_dim(), "\n");
  return f;
}

absl::StatusOr<GradInfo> Featurizer::Compress(const Example& ex, std::vector<float>* out, Timing* timing) const {
  using Clock = std::chrono::steady_clock;
  const auto t0 = Clock::now();
  auto t = engine_->Tokenize(ex);
  if (!t.ok()) return t.status();
  std::vector<double> g;
  auto info = engine_->GradientIds(*t, /*normalize=*/true, &g);
  if (!info.ok()) return info.status();
  const auto t1 = Clock::now();
  std::vector<float> gf(g.begin(), g.end());
  const auto t2 = Clock::now();
  out->resize(sketch_->params().k);
  sketch_->Apply(gf.data(), out->data());
  const auto t3 = Clock::now();
  if (timing) {
    timing->grad += std::chrono::duration<double>(t1 - t0).count();
    timing->normalize += std::chrono::duration<double>(t2 - t1).count();
    timing->sketch += std::chrono::duration<double>(t3 - t2).count();
  }
  return info;
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
