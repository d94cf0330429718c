// The gradient engine: shared helpers, tokenisation, losses, per-record gradients and token influence.
// LibTorch lives in model/*.cc (engine, loaders, training, token_grads) and model/internal/engine_impl.h.
#include "model/engine.h"

#include <dlfcn.h>
#include <torch/torch.h>

#include <atomic>
#include <cmath>
#include <cstdint>
#include <mutex>
#include <unordered_map>
#include <map>
#include <c10/core/CPUAllocator.h>
#include <thread>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <set>
#include <fstream>
#include <random>
#include <regex>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "model/internal/engine_impl.h"
#include "model/testing.h"

namespace rapidin::model {

void SetComputeThreads(int threads) {
  at::set_num_threads(threads < 1 ? 1 : threads);
  // OpenBLAS's own pool would oversubscribe the cores that rapidin's threads already use.
  using SetFn = void (*)(int);
  if (auto fn = reinterpret_cast<SetFn>(dlsym(RTLD_DEFAULT, "openblas_set_num_threads"))) fn(1);
}

thread_local const Leaves* tls_leaves = nullptr;

namespace {

// LibTorch's CPU buffers of 1 MiB and more, kept for reuse in a bounded cache. rapidin-server maps such buffers
// from the kernel (M_MMAP_THRESHOLD 1 MiB, against heap fragmentation), so without a cache every gradient pass
// mapped, faulted in and unmapped its attention and gradient buffers (13 ms of the demo's 57 ms text query).
// Sizes are rounded up to 1/8 of their power of two so that similar lengths share blocks; at most kLimit bytes
// are kept, the rest is freed at once. Smaller buffers go to LibTorch's default allocator.
class LargeBufferCache final : public c10::Allocator {
 public:
  static constexpr size_t kMin = size_t{1} << 20;
  static constexpr size_t kLimit = size_t{64} << 20;

  // LibTorch 2 made allocate() non-const and added copy_data(); Debian's 1.13 has the const one.
#if TORCH_VERSION_MAJOR >= 2
  c10::DataPtr allocate(size_t n) override { return Allocate(n); }
  void copy_data(void* dest, const void* src, size_t count) const override { default_copy_data(dest, src, count); }
#else
  c10::DataPtr allocate(size_t n) const override { return Allocate(n); }
#endif
  c10::DeleterFnPtr raw_deleter() const override { return &Release; }

  static LargeBufferCache& Get() {
    static LargeBufferCache* cache = new LargeBufferCache();  // never destroyed: tensors may outlive main
    return *cache;
  }

 private:
  c10::DataPtr Allocate(size_t n) const {
    if (n < kMin) return base_->allocate(n);
    const size_t size = Round(n);
    void* p = nullptr;
    {
      MutexLock l(&mu_);
      auto it = free_.find(size);
      if (it != free_.end()) {
        p = it->second;
        free_.erase(it);
        cached_ -= size;
      }
    }
    if (p == nullptr && posix_memalign(&p, 64, size) != 0) throw std::bad_alloc();
    {
      MutexLock l(&mu_);
      sizes_[p] = size;
    }
    return {p, p, &Release, c10::Device(c10::DeviceType::CPU)};
  }

  LargeBufferCache() : base_(c10::GetDefaultCPUAllocator()) {}

  static size_t Round(size_t n) {
    size_t top = size_t{1} << (63 - __builtin_clzll(n));  // highest power of two <= n
    const size_t step = top / 8;
    return (n + step - 1) / step * step;
  }
  static void Release(void* p) {
    LargeBufferCache& c = Get();
    MutexLock l(&c.mu_);
    auto it = c.sizes_.find(p);
    const size_t size = it->second;
    c.sizes_.erase(it);
    if (c.cached_ + size <= kLimit) {
      c.free_.emplace(size, p);
      c.cached_ += size;
      return;
    }
    std::free(p);
  }

  c10::Allocator* base_;
  mutable Mutex mu_;
  mutable std::multimap<size_t, void*> free_ ABSL_GUARDED_BY(mu_);
  mutable std::unordered_map<void*, size_t> sizes_ ABSL_GUARDED_BY(mu_);
  mutable size_t cached_ ABSL_GUARDED_BY(mu_) = 0;
};

}  // namespace

void UseLargeBufferCache() {
  static std::once_flag once;
  std::call_once(once, [] {
    // RAPIDIN_NO_BUFFER_CACHE=1: LibTorch's own allocator (benchmarks measure the difference side by side).
    const char* off = std::getenv("RAPIDIN_NO_BUFFER_CACHE");
    if (off == nullptr || std::string(off) != "1") c10::SetCPUAllocator(&LargeBufferCache::Get(), /*priority=*/1);
  });
}

absl::Status TorchError(const std::exception& e) {
  const auto* c10e = dynamic_cast<const c10::Error*>(&e);
  const std::string what = c10e ? c10e->what_without_backtrace() : e.what();
  if (what.find("out of memory") != std::string::npos || what.find("can't allocate memory") != std::string::npos) {
    return absl::ResourceExhaustedError(absl::StrCat("LibTorch: ", what));
  }
  return absl::InternalError(absl::StrCat("LibTorch: ", what));
}

TorchRuntime GetTorchRuntime() {
  TorchRuntime r;
  r.version = TORCH_VERSION;
  r.cuda_devices = torch::cuda::is_available() ? static_cast<int>(torch::cuda::device_count()) : 0;
  return r;
}

absl::Status CheckIds(const std::vector<int32_t>& ids, int vocab_size) {
  for (int32_t id : ids) {
    if (id < 0 || id >= vocab_size) {
      return absl::InvalidArgumentError(absl::StrCat("token id ", id, " is outside the vocabulary of ", vocab_size));
    }
  }
  return absl::OkStatus();
}


const std::vector<std::pair<std::string, std::string>>& HfModules(bool fused) {
  static const std::vector<std::pair<std::string, std::string>> k = {
      {"self_attn.q_proj", "attention.wq"}, {"self_attn.k_proj", "attention.wk"},
      {"self_attn.v_proj", "attention.wv"}, {"self_attn.o_proj", "attention.wo"},
      {"mlp.gate_proj", "feed_forward.w1"}, {"mlp.down_proj", "feed_forward.w2"},
      {"mlp.up_proj", "feed_forward.w3"}};
  static const std::vector<std::pair<std::string, std::string>> f = {
      {"self_attn.qkv_proj", "attention.wqkv"}, {"self_attn.o_proj", "attention.wo"},
      {"mlp.gate_up_proj", "feed_forward.w13"}, {"mlp.down_proj", "feed_forward.w2"}};
  return fused ? f : k;
}

// Checks a tokenized record before it reaches LibTorch, which would throw on it or read past its end.

absl::Status CheckRecord(const TokenizedExample& t, int vocab_size) {
  const int64_t n = static_cast<int64_t>(t.ids.size());
  if (t.response_begin < 1 || t.response_begin >= n) return absl::InvalidArgumentError("no response tokens");
  if (absl::Status st = CheckIds(t.ids, vocab_size); !st.ok()) return st;
  if (t.loss_weights.empty()) return absl::OkStatus();
  if (static_cast<int64_t>(t.loss_weights.size()) != n - t.response_begin) {
    return absl::InvalidArgumentError(
        absl::StrCat(t.loss_weights.size(), " loss weights for ", n - t.response_begin, " response tokens"));
  }
  double sum = 0;
  for (double w : t.loss_weights) {
    if (!(w >= 0) || !std::isfinite(w)) return absl::InvalidArgumentError("loss weights must be finite and >= 0");
    sum += w;
  }
  if (!(sum > 0)) return absl::InvalidArgumentError("a record's loss weights sum to zero");
  return absl::OkStatus();
}


const ModelConfig& GradientEngine::config() const { return impl_->cfg; }
std::string GradientEngine::device() const { return impl_->device.str(); }
std::string GradientEngine::grad_path() const { return impl_->DirectApplies() ? "direct" : "autograd"; }
int GradientEngine::cuda_device() const { return impl_->device.is_cuda() ? impl_->device.index() : -1; }
const std::vector<ParamInfo>& GradientEngine::params() const { return impl_->infos; }
int64_t GradientEngine::grad_dim() const { return impl_->dim; }
std::string GradientEngine::preconditioner() const { return impl_->precond_desc; }
std::vector<double> GradientEngine::PreconditionerValues() const {
  std::vector<double> out;
  if (impl_->precond.empty()) return out;
  out.reserve(impl_->dim);
  for (const auto& p : impl_->precond) {
    auto c = p.to(torch::kCPU, torch::kDouble).contiguous();
    out.insert(out.end(), c.data_ptr<double>(), c.data_ptr<double>() + c.numel());
  }
  return out;
}
std::string GradientEngine::model_hash() const {
  MutexLock l(&impl_->hash_mu);
  if (impl_->hash_stale) {
    impl_->RehashLocked();
    impl_->hash_stale = false;
  }
  return impl_->hash;
}
const Tokenizer* GradientEngine::tokenizer() const { return impl_->tok.get(); }

namespace {

// Sets loss_weights to 1 on the response tokens whose place is `field` and whose span overlaps an occurrence of a
// hotword in `text` (that field's text), 0 elsewhere.
absl::Status ApplyHotwords(const std::vector<std::string>& hotwords, const std::string& text, const std::string& field,
                           TokenizedExample* t) {
  const size_t n = t->ids.size() - t->response_begin;
  t->loss_weights.assign(n, 0.0);
  for (const std::string& hw : hotwords) {
    if (hw.empty()) return absl::InvalidArgumentError("empty hotword");
    bool found = false;
    for (size_t pos = text.find(hw); pos != std::string::npos; pos = text.find(hw, pos + 1)) {
      found = true;
      const int32_t b = static_cast<int32_t>(pos), e = static_cast<int32_t>(pos + hw.size());
      for (size_t i = 0; i < n; ++i) {
        const TokenPlace& pl = t->places[t->response_begin + i];
        if (pl.field == field && pl.span.begin < e && pl.span.end > b) t->loss_weights[i] = 1.0;
      }
    }
    if (!found) return absl::InvalidArgumentError(absl::StrCat("hotword \"", hw, "\" does not occur in the generation"));
  }
  double sum = 0;
  for (double w : t->loss_weights) sum += w;
  if (sum == 0) return absl::InvalidArgumentError("the hotwords fall outside the tokens kept after truncation");
  return absl::OkStatus();
}

}  // namespace

Encoding EncodeWithSpecials(const Tokenizer& tok, const std::string& text) {
  std::vector<std::pair<std::string, int32_t>> specials;
  for (int32_t id : {tok.bos(), tok.eos()}) {
    if (id < 0) continue;
    const std::string piece = tok.Piece(id);
    if (!piece.empty() && tok.TokenId(piece) < 0) specials.push_back({piece, id});
  }
  Encoding out;
  size_t pos = 0;
  while (pos <= text.size()) {
    size_t best = std::string::npos;
    std::pair<std::string, int32_t> hit;
    for (const auto& sp : specials) {
      const size_t at = text.find(sp.first, pos);
      if (at < best) best = at, hit = sp;
    }
    const size_t stop = best == std::string::npos ? text.size() : best;
    if (stop > pos) {
      Encoding e = tok.Encode(text.substr(pos, stop - pos), /*dummy_prefix=*/true);
      for (size_t i = 0; i < e.ids.size(); ++i) {
        out.ids.push_back(e.ids[i]);
        out.spans.push_back({e.spans[i].begin + static_cast<int32_t>(pos), e.spans[i].end + static_cast<int32_t>(pos)});
      }
    }
    if (best == std::string::npos) break;
    out.ids.push_back(hit.second);
    out.spans.push_back({static_cast<int32_t>(best), static_cast<int32_t>(best + hit.first.size())});
    pos = best + hit.first.size();
  }
  return out;
}

std::string GradientEngine::chat_template() const { return impl_->chat ? impl_->chat->name() : ""; }

absl::StatusOr<TokenizedExample> GradientEngine::Tokenize(const Example& ex) const {
  if (!impl_->tok) return absl::FailedPreconditionError("no tokenizer loaded");
  const Tokenizer& tok = *impl_->tok;
  const int max_len = std::min(impl_->options.max_length, impl_->cfg.seq_len);
  TokenizedExample t;
  if (ex.format == RecordFormat::kText) {
    if (ex.text.empty()) return absl::InvalidArgumentError("empty text");
    if (tok.bos() >= 0) {
      t.ids.push_back(tok.bos());
      t.places.push_back({"template", {0, 0}});
    }
    const Encoding e = tok.Encode(ex.text, /*dummy_prefix=*/true);
    for (size_t i = 0; i < e.ids.size(); ++i) {
      t.ids.push_back(e.ids[i]);
      t.places.push_back({"text", e.spans[i]});
    }
    if (tok.eos() >= 0) {
      t.ids.push_back(tok.eos());
      const int32_t len = static_cast<int32_t>(ex.text.size());
      t.places.push_back({"text", {len, len}});
    }
    if (t.ids.size() < 2) return absl::InvalidArgumentError("a text record needs at least two tokens");
    t.response_begin = 1;  // every token the model predicts
    if (static_cast<int>(t.ids.size()) > max_len) {
      t.ids.resize(max_len);
      t.places.resize(max_len);
      t.truncated = true;
    }
    for (size_t i = t.response_begin; i < t.ids.size(); ++i) t.response_spans.push_back(t.places[i].span);
    if (!ex.hotwords.empty()) {
      if (absl::Status st = ApplyHotwords(ex.hotwords, ex.text, "text", &t); !st.ok()) return st;
    }
    return t;
  }
  if (ex.format == RecordFormat::kChat) {
    if (!impl_->chat) return impl_->chat_status;
    int last = -1;
    for (int i = 0; i < static_cast<int>(ex.messages.size()); ++i) {
      if (ex.messages[i].role == "assistant") last = i;
    }
    if (last < 0) return absl::InvalidArgumentError("a chat record needs an assistant turn (the loss is on assistant turns)");
    auto r = impl_->chat->Render(ex.messages, /*add_generation_prompt=*/false);
    if (!r.ok()) return r.status();
    // Trained byte ranges: every assistant turn, or the last one only (a query).
    std::vector<std::pair<int32_t, int32_t>> trained;
    for (const auto& c : r->contents) {
      if (ex.messages[c.message].role != "assistant" || (ex.last_turn_only && c.message != last)) continue;
      trained.push_back({c.begin, c.end});
      if (c.suffix_begin >= 0) trained.push_back({c.suffix_begin, c.suffix_end});
    }
    const Encoding e = EncodeWithSpecials(tok, r->text);
    std::vector<bool> is_trained;
    for (size_t i = 0; i < e.ids.size(); ++i) {
      const Span sp = e.spans[i];
      TokenPlace pl{"template", sp};
      for (const auto& c : r->contents) {
        if (sp.begin >= c.begin && sp.end <= c.end) {
          pl = {absl::StrCat("messages[", c.message, "]"),
                {sp.begin - c.begin + c.content_offset, sp.end - c.begin + c.content_offset}};
          break;
        }
      }
      bool tr = false;
      for (const auto& [b, en] : trained) tr = tr || (sp.begin < en && sp.end > b);
      t.ids.push_back(e.ids[i]);
      t.places.push_back(std::move(pl));
      is_trained.push_back(tr);
    }
    int first = -1;
    for (size_t i = 0; i < is_trained.size() && first < 0; ++i) {
      if (is_trained[i]) first = static_cast<int>(i);
    }
    if (first < 0) return absl::InvalidArgumentError("the assistant turns are empty");
    if (first == 0) {  // nothing before the first trained token predicts it: drop it from the loss
      is_trained[0] = false;
      first = -1;
      for (size_t i = 1; i < is_trained.size() && first < 0; ++i) {
        if (is_trained[i]) first = static_cast<int>(i);
      }
      if (first < 0) return absl::InvalidArgumentError("the assistant turn has no token to predict");
    }
    if (static_cast<int>(t.ids.size()) > max_len) {
      if (first >= max_len) {
        return absl::InvalidArgumentError(absl::StrCat("the conversation before the first trained assistant turn is ",
                                                       first, " tokens; max_length is ", max_len));
      }
      t.ids.resize(max_len);
      t.places.resize(max_len);
      is_trained.resize(max_len);
      t.truncated = true;
    }
    t.response_begin = first;
    for (size_t i = first; i < t.ids.size(); ++i) {
      t.loss_weights.push_back(is_trained[i] ? 1.0 : 0.0);
      t.response_spans.push_back(t.places[i].span);
    }
    for (int i = 0; i < first; ++i) t.prompt_spans.push_back(t.places[i].span);
    bool uniform = true;
    for (double w : t.loss_weights) uniform = uniform && w == 1.0;
    if (uniform) t.loss_weights.clear();
    if (!ex.hotwords.empty()) {
      if (absl::Status st = ApplyHotwords(ex.hotwords, ex.messages[last].content, absl::StrCat("messages[", last, "]"), &t);
          !st.ok()) {
        return st;
      }
    }
    return t;
  }
  const Encoding p = tok.Encode(AlpacaPrompt(ex.instruction, ex.input), /*dummy_prefix=*/true);
  const Encoding r = tok.Encode(ex.output, /*dummy_prefix=*/false);
  const PromptFields fields = AlpacaPromptFields(ex.instruction, ex.input);
  if (tok.bos() >= 0) {
    t.ids.push_back(tok.bos());
    t.places.push_back({"template", {0, 0}});
  }
  t.ids.insert(t.ids.end(), p.ids.begin(), p.ids.end());
  for (const Span& sp : p.spans) {
    const FieldSpan f = LocateInPrompt(fields, sp);
    t.places.push_back({f.field, f.span});
  }
  t.response_begin = static_cast<int32_t>(t.ids.size());
  t.ids.insert(t.ids.end(), r.ids.begin(), r.ids.end());
  t.response_spans = r.spans;
  t.prompt_spans = p.spans;
  if (tok.eos() >= 0) {
    t.ids.push_back(tok.eos());
    const int32_t len = static_cast<int32_t>(ex.output.size());
    t.response_spans.push_back({len, len});
  }
  for (const Span& sp : t.response_spans) t.places.push_back({"output", sp});
  if (static_cast<int>(t.ids.size()) > max_len) {
    if (t.response_begin >= max_len) {
      return absl::InvalidArgumentError(absl::StrCat("the prompt alone is ", t.response_begin,
                                                     " tokens; max_length is ", max_len));
    }
    t.ids.resize(max_len);
    t.places.resize(max_len);
    t.response_spans.resize(max_len - t.response_begin);
    t.truncated = true;
  }
  if (!ex.hotwords.empty()) {
    if (absl::Status st = ApplyHotwords(ex.hotwords, ex.output, "output", &t); !st.ok()) return st;
  }
  return t;
}

absl::StatusOr<double> GradientEngine::MeanNll(const std::string& text, int64_t* tokens) const {
  return Guarded([&]() -> absl::StatusOr<double> {
    if (!impl_->tok) return absl::FailedPreconditionError("no tokenizer loaded");
    torch::NoGradGuard no_grad;
    Encoding e = impl_->tok->Encode(text, true);
    std::vector<int32_t> ids;
    if (impl_->tok->bos() >= 0) ids.push_back(impl_->tok->bos());
    ids.insert(ids.end(), e.ids.begin(), e.ids.end());
    if (static_cast<int>(ids.size()) > impl_->cfg.seq_len) ids.resize(impl_->cfg.seq_len);
    if (ids.size() < 2) return absl::InvalidArgumentError("text is empty");
    auto t = impl_->Ids(ids);
    auto logits = impl_->Forward(t);
    const int64_t T = t.size(1);
    auto loss = torch::nn::functional::cross_entropy(logits[0].slice(0, 0, T - 1), t[0].slice(0, 1, T));
    if (tokens) *tokens = T - 1;
    return loss.item<double>();
  });
}

absl::StatusOr<std::vector<float>> GradientEngine::LogitsIds(const std::vector<int32_t>& ids) const {
  return Guarded([&]() -> absl::StatusOr<std::vector<float>> {
    torch::NoGradGuard no_grad;
    if (ids.empty() || static_cast<int>(ids.size()) > impl_->cfg.seq_len) {
      return absl::InvalidArgumentError("bad length");
    }
    if (absl::Status st = CheckIds(ids, impl_->cfg.vocab_size); !st.ok()) return st;
    auto l = impl_->Forward(impl_->Ids(ids)).to(torch::kCPU, torch::kFloat).contiguous();
    return std::vector<float>(l.data_ptr<float>(), l.data_ptr<float>() + l.numel());
  });
}

absl::StatusOr<double> GradientEngine::LossIds(const TokenizedExample& t) const {
  return Guarded([&]() -> absl::StatusOr<double> {
    torch::NoGradGuard no_grad;
    if (absl::Status st = CheckRecord(t, impl_->cfg.vocab_size); !st.ok()) return st;
    return impl_->ResponseLoss(t).item<double>();
  });
}

absl::StatusOr<GradInfo> GradientEngine::GradientIds(const TokenizedExample& t, bool normalize,
                                                     std::vector<double>* out) const {
  // A batch of one takes PerSample's per-record autograd pass: the reference the batched path is tested against.
  std::vector<std::vector<double>> one;
  std::vector<GradInfo> infos;
  if (absl::Status st = GradientIdsBatch({t}, normalize, &one, &infos); !st.ok()) return st;
  *out = std::move(one[0]);
  return infos[0];
}

absl::Status GradientEngine::Impl::PerSample(const std::vector<TokenizedExample>& batch,
                                             std::vector<torch::Tensor>* per, std::vector<double>* losses_out) const {
  const int64_t B = static_cast<int64_t>(batch.size());
  per->assign(infos.size(), torch::Tensor());
  losses_out->assign(B, 0.0);
  if (B == 0) return absl::OkStatus();
  if (DirectApplies()) return DirectPerSample(batch, per, losses_out);
  bool capturable = true;
  for (const auto& p : infos) capturable = capturable && w.at(p.name).dim() == 2;
  if (!capturable || B == 1) {
    std::vector<std::vector<torch::Tensor>> each(infos.size());
    for (int64_t b = 0; b < B; ++b) {
      if (absl::Status st = CheckRecord(batch[b], cfg.vocab_size); !st.ok()) return st;
      const Leaves leaves = MakeLeaves();
      LeavesScope scope(&leaves);
      auto loss = ResponseLoss(batch[b]);
      auto grads = torch::autograd::grad({loss}, leaves.selected);
      for (size_t p = 0; p < infos.size(); ++p) each[p].push_back(grads[p].detach());
      (*losses_out)[b] = loss.item<double>();
    }
    for (size_t p = 0; p < infos.size(); ++p) (*per)[p] = torch::stack(each[p]);
    return absl::OkStatus();
  }
  int64_t T = 0;
  for (const auto& t : batch) {
    if (absl::Status st = CheckRecord(t, cfg.vocab_size); !st.ok()) return st;
    T = std::max<int64_t>(T, t.ids.size());
  }
  // Pad at the end: under the causal mask padding never reaches the real positions, and its loss weight is 0.
  std::vector<int64_t> flat(B * T, 0);  // padding id: never seen by a real position
  std::vector<double> wts(B * (T - 1), 0.0);
  for (int64_t b = 0; b < B; ++b) {
    const auto& t = batch[b];
    const int64_t len = t.ids.size();
    for (int64_t i = 0; i < len; ++i) flat[b * T + i] = t.ids[i];
    double wsum = 0;
    for (int64_t i = t.response_begin; i < len; ++i) {
      wsum += t.loss_weights.empty() ? 1.0 : t.loss_weights[i - t.response_begin];
    }
    for (int64_t i = t.response_begin - 1; i < len - 1; ++i) {
      const double w = t.loss_weights.empty() ? 1.0 : t.loss_weights[i + 1 - t.response_begin];
      wts[b * (T - 1) + i] = w / wsum;
    }
  }
  auto ids = torch::from_blob(flat.data(), {B, T}, torch::kLong).to(device, torch::kLong, false, /*copy=*/true);
  auto weight = torch::from_blob(wts.data(), {B, T - 1}, torch::kDouble).to(device, dtype);
  const Leaves leaves = MakeLeaves();
  LeavesScope scope(&leaves);
  Captures cap;
  auto logits = Forward(ids, &cap);
  auto logp = torch::log_softmax(logits.slice(1, 0, T - 1), -1);
  auto nll = -logp.gather(2, ids.slice(1, 1, T).unsqueeze(-1)).squeeze(-1);  // [B, T-1]
  auto losses = (nll * weight).sum(1);                                      // [B]
  std::map<std::string, int> index;
  for (size_t i = 0; i < infos.size(); ++i) index[infos[i].name] = static_cast<int>(i);
  std::vector<torch::Tensor> wrt;  // outputs of the selected linears, in capture order, then the embedding
  for (const auto& l : cap.linears) {
    if (index.count(l.weight)) wrt.push_back(l.y);
  }
  const bool emb = index.count("tok_embeddings.weight") > 0;
  if (emb) wrt.push_back(cap.emb_out);
  auto grads = torch::autograd::grad({losses.sum()}, wrt, {}, false, false, /*allow_unused=*/true);
  // (*per)[p]: [B, out, in]
  size_t gi = 0;
  for (const auto& l : cap.linears) {
    auto it = index.find(l.weight);
    if (it == index.end()) continue;
    const auto& g = grads[gi++];
    if (!g.defined()) continue;
    auto contrib = torch::matmul(g.transpose(1, 2), l.x);  // [B, out, in]
    auto& acc = (*per)[it->second];
    acc = acc.defined() ? acc + contrib : contrib;
  }
  if (emb && grads.back().defined()) {
    const int p = index["tok_embeddings.weight"];
    auto e = torch::zeros({B, cfg.vocab_size, cfg.dim}, Opts());
    for (int64_t b = 0; b < B; ++b) e[b].index_add_(0, ids[b], grads.back()[b]);
    (*per)[p] = (*per)[p].defined() ? (*per)[p] + e : e;
  }
  auto host_losses = losses.detach().to(torch::kCPU, torch::kDouble).contiguous();
  losses_out->assign(host_losses.data_ptr<double>(), host_losses.data_ptr<double>() + B);
  return absl::OkStatus();
}

bool GradientEngine::Impl::ComputeDirectApplies() const {
  if (options.grad_path != "direct" || !device.is_cpu() || !arch.Plain() || !lora.empty()) return false;
  if (dtype != torch::kFloat && dtype != torch::kDouble) return false;
  if (cfg.n_kv_heads <= 0 || cfg.n_heads % cfg.n_kv_heads != 0 || cfg.HeadDim() % 2 != 0) return false;
  static const std::regex matrix(
      R"(tok_embeddings\.weight|output\.weight|layers\.\d+\.(attention\.w[qkvo]|feed_forward\.w[123])\.weight)");
  for (const auto& p : infos) {
    if (!std::regex_match(p.name, matrix)) return false;
  }
  for (const auto& [n, t] : w) {
    if (!t.is_contiguous()) return false;
  }
  return cos.is_contiguous() && sin.is_contiguous();
}

namespace {

template <class F>
absl::Status DirectRecords(const EngineAccess::Impl& m, const std::vector<TokenizedExample>& batch,
                           std::vector<torch::Tensor>* per, std::vector<double>* losses) {
  const internal::LlamaShape s = m.DirectShape();
  const internal::LlamaWeights<F> wt = m.template DirectWeights<F>();
  const int64_t B = static_cast<int64_t>(batch.size());
  for (size_t i = 0; i < m.infos.size(); ++i) (*per)[i] = torch::empty({B, m.infos[i].numel}, m.Opts());
  for (int64_t b = 0; b < B; ++b) {
    const TokenizedExample& t = batch[b];
    (*losses)[b] = internal::LlamaLossGradient<F>(s, wt, t.ids.data(), static_cast<int>(t.ids.size()),
                                                  t.response_begin,
                                                  t.loss_weights.empty() ? nullptr : t.loss_weights.data(),
                                                  m.template DirectGrads<F>(per, b));
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status GradientEngine::Impl::DirectPerSample(const std::vector<TokenizedExample>& batch,
                                                   std::vector<torch::Tensor>* per,
                                                   std::vector<double>* losses) const {
  for (const auto& t : batch) {
    if (absl::Status st = CheckRecord(t, cfg.vocab_size); !st.ok()) return st;
    if (static_cast<int64_t>(t.ids.size()) > cfg.seq_len) {
      return absl::InvalidArgumentError(
          absl::StrCat("a record of ", t.ids.size(), " tokens exceeds the model's context of ", cfg.seq_len));
    }
  }
  torch::NoGradGuard no_grad;
  return dtype == torch::kDouble ? DirectRecords<double>(*this, batch, per, losses)
                                 : DirectRecords<float>(*this, batch, per, losses);
}

namespace {

void FillInfos(const std::vector<TokenizedExample>& batch, const std::vector<double>& losses,
               std::vector<GradInfo>* infos) {
  infos->assign(batch.size(), {});
  for (size_t b = 0; b < batch.size(); ++b) {
    GradInfo& info = (*infos)[b];
    info.tokens = static_cast<int>(batch[b].ids.size());
    info.response_tokens = info.tokens - batch[b].response_begin;
    info.truncated = batch[b].truncated;
    info.loss = losses[b];
  }
}

}  // namespace

absl::Status GradientEngine::GradientIdsBatch(const std::vector<TokenizedExample>& batch, bool normalize,
                                              std::vector<std::vector<double>>* out,
                                              std::vector<GradInfo>* infos) const {
  return Guarded([&]() -> absl::Status {
    std::vector<torch::Tensor> per;
    std::vector<double> losses;
    if (absl::Status st = impl_->PerSample(batch, &per, &losses); !st.ok()) return st;
    out->assign(batch.size(), {});
    if (!batch.empty()) impl_->Assemble(per, static_cast<int64_t>(batch.size()), normalize, out);
    FillInfos(batch, losses, infos);
    return absl::OkStatus();
  });
}

absl::Status GradientEngine::GradientRowsBatch(const std::vector<TokenizedExample>& batch, bool normalize,
                                               const RowsConsumer& consume, std::vector<GradInfo>* infos) const {
  return Guarded([&]() -> absl::Status {
    if (batch.empty()) return absl::InvalidArgumentError("GradientRowsBatch: empty batch");
    std::vector<torch::Tensor> per;
    std::vector<double> losses;
    if (absl::Status st = impl_->PerSample(batch, &per, &losses); !st.ok()) return st;
    const int64_t B = static_cast<int64_t>(batch.size());
    FillInfos(batch, losses, infos);
    if (impl_->DirectApplies() && impl_->dtype == torch::kFloat) {
      // The direct pass's float32 blocks are already in host memory: normalised straight into the rows, without
      // LibTorch's double round trip (which took 7% of caching's samples under perf). Up to 64 MiB of rows stay
      // with the thread (stories260K's are 1 MiB a record), faulted in once rather than per record.
      constexpr size_t kKeptFloats = size_t{16} << 20;
      thread_local std::vector<float> kept;
      std::vector<float> once;
      const size_t n = static_cast<size_t>(B * impl_->dim);
      std::vector<float>& rows = n <= kKeptFloats ? kept : once;
      rows.resize(n);
      impl_->RowsHostF32(per, B, normalize, rows.data());
      return consume(rows.data(), B);
    }
    const torch::Tensor rows = impl_->Rows(per, B, normalize);
    impl_->SyncDevice();
    return consume(rows.data_ptr<float>(), B);
  });
}

absl::StatusOr<GradInfo> GradientEngine::Gradient(const Example& ex, bool normalize, std::vector<float>* out) const {
  auto t = Tokenize(ex);
  if (!t.ok()) return t.status();
  std::vector<double> g;
  auto info = GradientIds(*t, normalize, &g);
  if (!info.ok()) return info.status();
  out->assign(g.begin(), g.end());
  return info;
}

namespace {

// InfluenceTokens by the hand-written pass (DirectApplies()): the record's gradient g (LlamaLossGradient), the
// direction dI/dg of I = sum over blocks of <P g_b, u_b> / |P g_b| (P the preconditioner), then one
// forward-over-reverse pass for the input gradient's derivative along it (LlamaInputGradTangent). With
// x_s = m + alpha_s (e_s - m) (m the mean row, held fixed as in ResponseLoss), dI/dalpha_s = d/de of
// <dL/dx_s, e_s - m> along the direction: <(dL/dx_s)', e_s - m> + <dL/dx_s, e_s'>.
template <class F>
double DirectInfluence(const EngineAccess::Impl& m, const TokenizedExample& t, const std::vector<double>& u,
                       bool normalize, std::vector<double>* scores) {
  const internal::LlamaShape s = m.DirectShape();
  const internal::LlamaWeights<F> wt = m.template DirectWeights<F>();
  const int n = static_cast<int>(t.ids.size()), D = s.dim;
  const double* lw = t.loss_weights.empty() ? nullptr : t.loss_weights.data();
  std::vector<torch::Tensor> per(m.infos.size()), dir(m.infos.size());
  for (size_t p = 0; p < m.infos.size(); ++p) {
    per[p] = torch::empty({1, m.infos[p].numel}, m.Opts());
    dir[p] = torch::empty({1, m.infos[p].numel}, m.Opts());
  }
  internal::LlamaLossGradient<F>(s, wt, t.ids.data(), n, t.response_begin, lw, m.template DirectGrads<F>(&per, 0));
  double influence = 0;
  for (size_t p = 0; p < m.infos.size(); ++p) {
    const int64_t numel = m.infos[p].numel;
    const F* g = per[p].template data_ptr<F>();
    F* d = dir[p].template data_ptr<F>();
    const double* pre = m.precond.empty() ? nullptr : m.precond[p].template data_ptr<double>();
    const double* up = u.data() + m.infos[p].offset;
    auto pg = [&](int64_t j) { return pre ? g[j] * pre[j] : static_cast<double>(g[j]); };
    double dot, ss;
    internal::BlockDotNorm(g, pre, up, numel, &dot, &ss);
    if (!normalize) {
      influence += dot;
      for (int64_t j = 0; j < numel; ++j) d[j] = static_cast<F>(pre ? pre[j] * up[j] : up[j]);
      continue;
    }
    if (!(ss > 0)) {  // a zero block stays zero (as in Block)
      std::fill_n(d, numel, F(0));
      continue;
    }
    const double nrm = std::sqrt(ss), c = dot / (ss * nrm);
    influence += dot / nrm;
    for (int64_t j = 0; j < numel; ++j) d[j] = static_cast<F>((pre ? pre[j] : 1.0) * (up[j] / nrm - c * pg(j)));
  }
  const internal::LlamaGrads<F> dg = m.template DirectGrads<F>(&dir, 0);
  internal::LlamaWeights<F> dw;
  dw.emb = dg.emb;
  dw.head = dg.head;
  for (const auto& l : dg.layers) dw.layers.push_back({l.wq, l.wk, l.wv, l.wo, l.w1, l.w2, l.w3, nullptr, nullptr});
  std::vector<F> gx(static_cast<size_t>(n) * D), gxt(static_cast<size_t>(n) * D);
  internal::LlamaInputGradTangent<F>(s, wt, dw, t.ids.data(), n, t.response_begin, lw, gx.data(), gxt.data());
  std::vector<double> mean(D, 0.0);
  for (int r = 0; r < s.vocab; ++r) {
    for (int j = 0; j < D; ++j) mean[j] += wt.emb[int64_t{r} * D + j];
  }
  for (double& x : mean) x /= s.vocab;
  scores->assign(n, 0.0);
  for (int i = 0; i < n; ++i) {
    const F* e = wt.emb + int64_t{t.ids[i]} * D;
    const F* de = dw.emb ? dw.emb + int64_t{t.ids[i]} * D : nullptr;
    double acc = 0;
    for (int j = 0; j < D; ++j) {
      acc += static_cast<double>(gxt[int64_t{i} * D + j]) * (e[j] - mean[j]);
      if (de) acc += static_cast<double>(gx[int64_t{i} * D + j]) * de[j];
    }
    (*scores)[i] = acc;
  }
  return influence;
}

}  // namespace

absl::StatusOr<double> GradientEngine::InfluenceTokens(const TokenizedExample& t, const std::vector<double>& u,
                                                       std::vector<double>* scores,
                                                       const std::vector<double>* token_scale,
                                                       bool normalize) const {
  return Guarded([&]() -> absl::StatusOr<double> {
    const Impl& d = *impl_;
    if (static_cast<int64_t>(u.size()) != d.dim) {
      return absl::InvalidArgumentError(absl::StrFormat("InfluenceTokens: u has %d values, the gradient %d",
                                                        u.size(), d.dim));
    }
    if (absl::Status st = CheckRecord(t, d.cfg.vocab_size); !st.ok()) return st;
    const int64_t T = static_cast<int64_t>(t.ids.size());
    if (token_scale && static_cast<int64_t>(token_scale->size()) != T) {
      return absl::InvalidArgumentError("InfluenceTokens: token_scale needs one value per token");
    }
    if (d.DirectApplies() && !token_scale && T <= d.cfg.seq_len) {
      torch::NoGradGuard no_grad;
      return d.dtype == torch::kDouble ? DirectInfluence<double>(d, t, u, normalize, scores)
                                       : DirectInfluence<float>(d, t, u, normalize, scores);
    }
    auto ut = torch::tensor(u, torch::kDouble).to(d.device);
    // I at embedding interpolation alpha (with its derivative in alpha when wanted).
    auto eval = [&](const torch::Tensor& alpha, bool grads_wanted, torch::Tensor* dalpha) -> double {
      const Leaves leaves = d.MakeLeaves();
      LeavesScope scope(&leaves);
      auto loss = d.ResponseLoss(t, alpha);
      auto g = torch::autograd::grad({loss}, leaves.selected, {}, /*retain_graph=*/grads_wanted,
                                     /*create_graph=*/grads_wanted, /*allow_unused=*/true);
      torch::Tensor influence = torch::zeros({}, torch::TensorOptions().dtype(torch::kDouble).device(d.device));
      for (size_t p = 0; p < d.infos.size(); ++p) {
        if (!g[p].defined()) continue;
        auto gp = g[p].to(torch::kDouble).reshape({-1});
        if (!d.precond.empty()) gp = gp * d.precond[p];
        auto dot = gp.dot(ut.narrow(0, d.infos[p].offset, d.infos[p].numel));
        if (!normalize) {
          influence = influence + dot;
          continue;
        }
        auto n = gp.norm();
        if (!(n.item<double>() > 0)) continue;  // a zero block stays zero (as in Block)
        influence = influence + dot / n;
      }
      if (grads_wanted) {
        *dalpha = torch::zeros({T}, torch::kDouble);
        if (influence.requires_grad()) {
          auto ga = torch::autograd::grad({influence}, {alpha}, {}, false, false, /*allow_unused=*/true)[0];
          if (ga.defined()) *dalpha = ga.detach().to(torch::kCPU, torch::kDouble).view({-1});
        }
      }
      return influence.item<double>();
    };
    if (token_scale) {
      return eval(torch::tensor(*token_scale, torch::kDouble).to(d.device, d.dtype).view({1, T, 1}), false, nullptr);
    }
    torch::Tensor da;
    const double value = eval(torch::ones({1, T, 1}, d.Opts()).requires_grad_(true), true, &da);
    da = da.contiguous();
    scores->assign(da.data_ptr<double>(), da.data_ptr<double>() + T);
    return value;
  });
}

namespace testing {

absl::Status Perturb(GradientEngine* engine, int p, int64_t i, double delta) {
  return Guarded([&]() -> absl::Status {
    EngineAccess::Impl& d = EngineAccess::Of(*engine);
    if (p < 0 || p >= static_cast<int>(d.selected.size()) || i < 0 || i >= d.infos[p].numel) {
      return absl::OutOfRangeError("no such parameter element");
    }
    torch::NoGradGuard no_grad;
    auto flat = d.selected[p].view({-1});
    flat[i] += delta;
    return absl::OkStatus();
  });
}

namespace {
void AppendAsDouble(const torch::Tensor& t, std::vector<double>* out) {
  auto c = t.detach().to(torch::kCPU, torch::kDouble).contiguous();
  out->insert(out->end(), c.data_ptr<double>(), c.data_ptr<double>() + c.numel());
}
}  // namespace

std::vector<double> SelectedValues(const GradientEngine& engine) {
  const EngineAccess::Impl& d = EngineAccess::Of(engine);
  std::vector<double> out;
  out.reserve(d.dim);
  for (const auto& t : d.selected) AppendAsDouble(t, &out);
  return out;
}

std::vector<double> AllValues(const GradientEngine& engine) {
  const EngineAccess::Impl& d = EngineAccess::Of(engine);
  std::vector<double> out;
  for (const auto& n : d.names) AppendAsDouble(d.w.at(n), &out);
  return out;
}

}  // namespace testing

}  // namespace rapidin::model
