// Private to model/: the engine's state and the forward pass, shared by engine.cc and token_grads.cc (the two
// translation units that include LibTorch).
#ifndef RAPIDIN_MODEL_INTERNAL_ENGINE_IMPL_H_
#define RAPIDIN_MODEL_INTERNAL_ENGINE_IMPL_H_

#include <torch/torch.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <map>
#include <memory>
#include <optional>
#include <regex>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "base/mutex.h"
#include "kernels/hash.h"
#include "model/engine.h"
#include "model/internal/llama_grad.h"

namespace rapidin::model {
using kernels::Fnv1a;

// Activations recorded during a forward pass so that per-sample weight gradients can be formed from one
// backward pass: for y = x W^T, dL_b/dW = dy_b^T x_b for each sample b (samples never interact).
struct Captures {
  struct Linear {
    std::string weight;
    torch::Tensor x, y;  // [B, T, in], [B, T, out]
  };
  std::vector<Linear> linears;
  torch::Tensor ids, emb_out;  // embedding lookup: [B, T], [B, T, dim]

  // With `layers_wanted`, also each decoder layer's activations, for the hand-written backward of
  // model/token_grads.cc (shapes [B, T, *] unless noted).
  struct Layer {
    torch::Tensor x_in, r1;      // residual stream in; rsqrt of its mean square
    torch::Tensor q, k, v;       // [B, H, T, hd]: after RoPE, with the KV heads repeated to H
    torch::Tensor att;           // [B, H, T, T]: softmax probabilities
    torch::Tensor o_heads;       // [B, H, T, hd]: probabilities x v
    torch::Tensor x_mid, r2;     // residual stream after attention; rsqrt
    torch::Tensor a1, a3, s1;    // w1 and w3 outputs, silu(a1)
  };
  bool layers_wanted = false;
  std::vector<Layer> layers;
  torch::Tensor x_final, r_final;  // input of the final norm; rsqrt
};

// Autograd leaves for one gradient computation: they share storage with the model's weights but have their own
// autograd state, so backward passes running concurrently on different threads never share a leaf (sharing one
// gave wrong gradients under concurrency). Only the selected parameters require grad.
struct Leaves {
  std::map<std::string, torch::Tensor> w;
  std::vector<torch::Tensor> selected;
};
extern thread_local const Leaves* tls_leaves;

// Routes LibTorch's CPU buffers of 1 MiB and more through a bounded cache (64 MiB kept) instead of mapping and
// unmapping each one; called once by every loader.
void UseLargeBufferCache();

// LibTorch reports failures (CUDA out of memory, a device-side error) by throwing; the engine returns them as a
// Status (RESOURCE_EXHAUSTED for memory, else INTERNAL). Guarded(f) runs f and converts what it throws.
absl::Status TorchError(const std::exception& e);

// INVALID_ARGUMENT naming the first id outside [0, vocab_size).
absl::Status CheckIds(const std::vector<int32_t>& ids, int vocab_size);
// Encodes `text`, splitting first at the BOS/EOS texts the tokenizer does not match itself (SentencePiece's
// "<s>", "</s>" written by a chat template): those become their ids. Spans are into `text`.
Encoding EncodeWithSpecials(const Tokenizer& tok, const std::string& text);
// Checks a tokenized record (ids, a response, loss weights) before it reaches LibTorch.
absl::Status CheckRecord(const TokenizedExample& t, int vocab_size);
// Hugging Face module paths inside a layer -> the engine's names (loaders, LoRA, Hugging Face export); fused:
// Phi3's qkv_proj and gate_up_proj.
const std::vector<std::pair<std::string, std::string>>& HfModules(bool fused = false);
template <class F>
auto Guarded(F&& f) -> decltype(f()) {
  try {
    return f();
  } catch (const std::exception& e) {
    return TorchError(e);
  }
}

struct LeavesScope {
  explicit LeavesScope(const Leaves* l) : prev(tls_leaves) { tls_leaves = l; }
  ~LeavesScope() { tls_leaves = prev; }
  const Leaves* prev;
};

struct GradientEngine::Impl {
  EngineOptions options;
  ModelConfig cfg;
  std::unique_ptr<Tokenizer> tok;
  std::vector<std::string> names;  // every parameter, in file order
  std::map<std::string, torch::Tensor> w;
  std::vector<torch::Tensor> selected;
  std::vector<ParamInfo> infos;
  int64_t dim = 0;
  torch::Tensor cos, sin, neg_sin;  // [seq_len, head_dim / 2]
  // model_hash() may be called from any thread while TrainStep (one thread) marks the weights changed.
  Mutex hash_mu;
  std::string hash ABSL_GUARDED_BY(hash_mu);
  bool hash_stale ABSL_GUARDED_BY(hash_mu) = false;  // weights changed by TrainStep since the last Rehash
  torch::Dtype dtype = torch::kFloat;
  torch::Device device = torch::kCPU;  // every weight and activation lives here
  bool rope_half = false;  // Hugging Face rotates (i, i + hd/2) pairs; llama2.c interleaved (2i, 2i+1) pairs
  std::map<std::string, std::pair<std::string, std::string>> lora;  // weight -> (A, B) parameter names
  double lora_scale = 0;
  int lora_rank = 0;
  double lora_alpha = 0;
  std::vector<std::string> lora_targets;  // PEFT module names
  bool llama2c = false;                   // loaded from a llama2.c checkpoint
  // The decoder's variant: Hugging Face families next to Llama. Defaults are Llama's.
  struct Arch {
    std::string name = "LlamaForCausalLM";
    bool qkv_bias = false;        // Qwen2: biases on the q, k and v projections
    bool fused = false;           // Phi3: one qkv projection and one gate_up projection (gate first)
    enum class Act { kSilu, kGeluTanh, kGelu } act = Act::kSilu;
    bool norm_offset = false;     // Gemma: RMSNorm scales by (1 + w)
    bool emb_normalizer = false;  // Gemma: embeddings times sqrt(hidden_size)
    bool sandwich = false;        // Gemma2: RMSNorm on the attention and MLP outputs too
    double query_scale = 0;       // 0: 1 / sqrt(head_dim) (Gemma2: query_pre_attn_scalar^-1/2)
    double attn_softcap = 0;      // Gemma2: scores become c tanh(s / c)
    double final_softcap = 0;     // Gemma2: logits become c tanh(l / c)
    int window = 0;               // sliding window: a position sees itself and window - 1 before it; 0: all
    bool window_even_layers = false;  // Gemma2: only layers 0, 2, 4, .. slide
    // Llama 3 RoPE frequency scaling (rope_scaling type llama3): factor 0 = none.
    double rope_factor = 0, rope_low = 0, rope_high = 0, rope_original = 0;
    double rope_linear = 0;       // rope_scaling type linear: positions divided by this; 0 = none
    // The forward matches the hand-written per-token backward of token_grads.cc (plain Llama).
    bool Plain() const {
      return !qkv_bias && !fused && act == Act::kSilu && !norm_offset && !emb_normalizer && !sandwich &&
             query_scale == 0 && attn_softcap == 0 && final_softcap == 0 && window == 0;
    }
  } arch;
  std::optional<ChatTemplate> chat;             // chat records' template
  absl::Status chat_status = absl::FailedPreconditionError("no chat template");  // why chat is empty
  std::map<std::string, std::string> hf_names;  // our tensor name -> the Hugging Face one (HF directories)
  std::string hf_config;                        // config.json as read (written back by SaveHf)
  // AdamW state of the selected parameters (fine-tuning).
  std::vector<torch::Tensor> adam_m, adam_v;
  int64_t adam_step = 0;
  // Preconditioner of each selected parameter, flattened doubles on the device: 1 / (sqrt(v) + eps); undefined
  // when none is loaded. precond_desc describes it ("none" or "adam-v/<hash> eps=..").
  std::vector<torch::Tensor> precond;
  std::string precond_desc = "none";
  uint64_t precond_hash = 0;

  // Options, dtype and device (FAILED_PRECONDITION for a CUDA device this LibTorch cannot use).
  absl::Status Init(const EngineOptions& o);
  absl::Status LoadAdapter(const std::string& path);
  // Reads options.preconditioner_path (after Finish: it must match the selected parameters).
  absl::Status LoadPreconditioner();
  // The last steps of every loader, once the weights (and any adapter) are added: the tokenizer of
  // options.tokenizer_path when given, Finish, then the preconditioner.
  absl::Status Complete();

  const torch::Tensor& W(const std::string& n) const { return tls_leaves ? tls_leaves->w.at(n) : w.at(n); }

  Leaves MakeLeaves() const {
    Leaves l;
    for (const auto& [n, t] : w) l.w[n] = t.detach();
    for (const auto& info : infos) {
      auto& t = l.w[info.name];
      t.requires_grad_(true);
      l.selected.push_back(t);
    }
    return l;
  }

  // Weight `name` as float32 in host memory, with its LoRA update B A * scale merged in when it has one (what
  // the checkpoint writers save).
  torch::Tensor Merged(const std::string& name, torch::Dtype dt = torch::kFloat) const {
    torch::Tensor t = w.at(name).to(dt);
    auto it = lora.find(name);
    if (it != lora.end()) {
      t = t + torch::matmul(w.at(it->second.second), w.at(it->second.first)).to(dt) * lora_scale;
    }
    return t.to(torch::kCPU).contiguous();
  }

  // Options for a new tensor of the engine's dtype on its device.
  torch::TensorOptions Opts() const { return torch::TensorOptions().dtype(dtype).device(device); }

  void Add(const std::string& name, torch::Tensor t) {
    names.push_back(name);
    w[name] = t.to(device, dtype, /*non_blocking=*/false, /*copy=*/true);  // own storage, not the file buffer
  }

  absl::Status Finish() {
    // A NaN or Inf weight makes every gradient NaN; say so at load rather than storing or scoring NaNs later.
    for (const auto& name : names) {
      const int64_t bad = (~torch::isfinite(w[name])).sum().item<int64_t>();
      if (bad > 0) {
        return absl::DataLossError(absl::StrCat("weight ", name, " has ", bad, " non-finite value(s) (NaN or Inf)"));
      }
    }
    const int hd = cfg.HeadDim();
    auto freqs = torch::arange(0, hd, 2, torch::kDouble) / hd;
    freqs = torch::pow(static_cast<double>(cfg.rope_theta), -freqs);  // [hd/2]
    if (arch.rope_factor > 0) {  // Llama 3: long wavelengths slowed by factor, a smooth ramp in between
      auto wavelen = 2 * M_PI / freqs;
      const double low_wl = arch.rope_original / arch.rope_low, high_wl = arch.rope_original / arch.rope_high;
      auto scaled = torch::where(wavelen > low_wl, freqs / arch.rope_factor, freqs);
      auto smooth = (arch.rope_original / wavelen - arch.rope_low) / (arch.rope_high - arch.rope_low);
      auto smoothed = (1 - smooth) * scaled / arch.rope_factor + smooth * scaled;
      auto medium = (wavelen >= high_wl).logical_and(wavelen <= low_wl);
      freqs = torch::where(medium, smoothed, scaled);
    }
    auto pos = torch::arange(0, cfg.seq_len, torch::kDouble);
    if (arch.rope_linear > 0) pos = pos / arch.rope_linear;
    auto ang = torch::outer(pos, freqs);
    cos = torch::cos(ang).to(device, dtype);
    sin = torch::sin(ang).to(device, dtype);
    neg_sin = -sin;
    absl::Status st = Select();
    if (!st.ok()) return st;
    Rehash();
    return absl::OkStatus();
  }

  // Parameter selection: the pattern, else the LoRA matrices when an adapter is attached, else every matrix.
  absl::Status Select() {
    selected.clear();
    infos.clear();
    dim = 0;
    adam_m.clear();
    adam_v.clear();
    adam_step = 0;
    precond.clear();  // it belonged to the previous selection
    std::regex re;
    try {
      if (!options.param_pattern.empty()) re = std::regex(options.param_pattern);
    } catch (const std::regex_error& e) {
      return absl::InvalidArgumentError(absl::StrCat("bad --params pattern \"", options.param_pattern, "\": ", e.what()));
    }
    for (const auto& n : names) {
      const auto& t = w[n];
      const bool take = !options.param_pattern.empty() ? std::regex_search(n, re)
                        : !lora.empty()                 ? n.find(".lora_") != std::string::npos
                                                        : t.dim() == 2;
      if (!take) continue;
      selected.push_back(t);
      infos.push_back({n, t.numel(), dim});
      dim += t.numel();
    }
    if (selected.empty()) {
      return absl::InvalidArgumentError(absl::StrCat("parameter pattern \"", options.param_pattern,
                                                     "\" selects no parameter"));
    }
    direct = ComputeDirectApplies();
    return absl::OkStatus();
  }

  void Rehash() {
    MutexLock l(&hash_mu);
    RehashLocked();
  }
  void RehashLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(hash_mu) {
    uint64_t h = kernels::kFnv1aOffset;
    for (const auto& n : names) {
      auto c = w[n].detach().to(torch::kCPU, torch::kFloat).contiguous();
      h = Fnv1a(h, n.data(), n.size());
      h = Fnv1a(h, c.data_ptr<float>(), c.numel() * sizeof(float));
    }
    const std::string sel = options.param_pattern.empty() ? "<matrices>" : options.param_pattern;
    h = Fnv1a(h, sel.data(), sel.size());
    // Changes to the function or the records' text change the hash; Llama without a chat template keeps the
    // hash it always had, so existing stores stay valid.
    std::string tmpl = absl::StrCat("alpaca/v1 max_length=", options.max_length);
    if (arch.name != "LlamaForCausalLM") absl::StrAppend(&tmpl, " arch=", arch.name);
    if (arch.rope_factor > 0 || arch.rope_linear > 0) {
      absl::StrAppend(&tmpl, " rope=", arch.rope_factor, ",", arch.rope_low, ",", arch.rope_high, ",",
                      arch.rope_original, ",", arch.rope_linear);
    }
    if (chat) {
      const TemplateSpec& c = chat->spec();
      absl::StrAppend(&tmpl, " chat=", c.name, "|", c.begin, "|", c.system_prefix, "|", c.system_suffix, "|",
                      c.user_prefix, "|", c.user_suffix, "|", c.assistant_prefix, "|", c.assistant_suffix, "|",
                      c.assistant_trained_suffix, "|", c.default_system, "|", c.system_in_first_user,
                      c.strip_content);
    }
    h = Fnv1a(h, tmpl.data(), tmpl.size());
    if (!precond.empty()) h = Fnv1a(h, &precond_hash, sizeof precond_hash);
    hash = absl::StrFormat("%016x", h);
  }

  // r, when given, receives rsqrt(mean(x^2) + eps).
  torch::Tensor RmsNorm(const torch::Tensor& x, const torch::Tensor& g, torch::Tensor* r = nullptr) const {
    auto s = torch::rsqrt(x.pow(2).mean(-1, true) + cfg.norm_eps);
    if (r) *r = s;
    return arch.norm_offset ? x * s * (1 + g) : x * s * g;
  }

  torch::Tensor Act(const torch::Tensor& a) const {
    switch (arch.act) {
      case Arch::Act::kGeluTanh: return torch::gelu(a, "tanh");
      case Arch::Act::kGelu: return torch::gelu(a);
      default: return torch::silu(a);
    }
  }

  // x: [B, T, H, hd]; llama2.c rotates interleaved pairs (2i, 2i+1), Hugging Face (i, i + hd/2).
  // inverse: rotate back (the transpose, for hand-written backward passes).
  torch::Tensor Rope(const torch::Tensor& x, bool inverse = false) const {
    const int64_t B = x.size(0), T = x.size(1), H = x.size(2), hd = x.size(3);
    const torch::Tensor& sin = inverse ? neg_sin : this->sin;
    if (rope_half) {
      auto x0 = x.slice(-1, 0, hd / 2), x1 = x.slice(-1, hd / 2, hd);
      auto c = cos.slice(0, 0, T).view({1, T, 1, hd / 2});
      auto s = sin.slice(0, 0, T).view({1, T, 1, hd / 2});
      return torch::cat({x0 * c - x1 * s, x1 * c + x0 * s}, -1);
    }
    auto xr = x.reshape({B, T, H, hd / 2, 2});
    auto x0 = xr.select(-1, 0), x1 = xr.select(-1, 1);
    auto c = cos.slice(0, 0, T).view({1, T, 1, hd / 2});
    auto s = sin.slice(0, 0, T).view({1, T, 1, hd / 2});
    return torch::stack({x0 * c - x1 * s, x0 * s + x1 * c}, -1).reshape({B, T, H, hd});
  }

  torch::Tensor Lin(const torch::Tensor& x, const std::string& name, Captures* cap) const {
    auto y = torch::matmul(x, W(name).t());
    if (cap) cap->linears.push_back({name, x.detach(), y});
    if (arch.qkv_bias) {  // Qwen2's q, k, v projections: "<module>.weight" has "<module>.bias"
      const std::string bias = name.substr(0, name.size() - 6) + "bias";
      if (w.count(bias)) y = y + W(bias);
    }
    auto it = lora.find(name);
    if (it != lora.end()) y = y + Lin(Lin(x, it->second.first, cap), it->second.second, cap) * lora_scale;
    return y;
  }

  // ids: [B, T] int64 -> logits [B, T - from, vocab] for positions [from, T) (the output head is the largest
  // matrix product, and a loss usually needs only the response positions). With cap, records every linear
  // layer's input and output.
  // emb_scale ([B, T, 1], optional): token s's embedding becomes mean + alpha_s (e_s - mean), mean the average
  // embedding row (training-side token attributions: alpha_s = 0 removes what is specific to token s).
  torch::Tensor Forward(const torch::Tensor& ids, Captures* cap = nullptr, int64_t from = 0,
                        const torch::Tensor& emb_scale = torch::Tensor()) const {
    const int64_t B = ids.size(0), T = ids.size(1);
    const int H = cfg.n_heads, KV = cfg.n_kv_heads, hd = cfg.HeadDim();
    auto x = torch::embedding(W("tok_embeddings.weight"), ids);
    if (emb_scale.defined()) {  // interpolate between the mean embedding (alpha 0) and each token's own (alpha 1)
      auto base = W("tok_embeddings.weight").mean(0).detach();
      x = base + (x - base) * emb_scale;
    }
    if (cap) {
      cap->ids = ids;
      cap->emb_out = x;
    }
    // Gemma: sqrt(hidden_size) rounded to the activations' dtype, as transformers does.
    if (arch.emb_normalizer) x = x * torch::tensor(std::sqrt(static_cast<double>(cfg.dim)), Opts());
    auto mask = torch::full({T, T}, -std::numeric_limits<double>::infinity(), Opts()).triu(1);
    torch::Tensor window_mask;  // also hides keys window or more positions back
    if (arch.window > 0 && arch.window < T) {
      window_mask = mask + torch::full({T, T}, -std::numeric_limits<double>::infinity(), Opts()).tril(-arch.window);
    }
    const double scale = arch.query_scale > 0 ? arch.query_scale : 1.0 / std::sqrt(static_cast<double>(hd));
    const bool rec = cap && cap->layers_wanted;
    if (rec) cap->layers.assign(cfg.n_layers, {});
    for (int l = 0; l < cfg.n_layers; ++l) {
      const std::string p = absl::StrCat("layers.", l, ".");
      Captures::Layer* r = rec ? &cap->layers[l] : nullptr;
      if (r) r->x_in = x;
      auto h = RmsNorm(x, W(p + "attention_norm.weight"), r ? &r->r1 : nullptr);
      torch::Tensor q, k, v;
      if (arch.fused) {
        auto qkv = Lin(h, p + "attention.wqkv.weight", cap);
        q = qkv.narrow(-1, 0, H * hd);
        k = qkv.narrow(-1, H * hd, KV * hd);
        v = qkv.narrow(-1, (H + KV) * hd, KV * hd);
      } else {
        q = Lin(h, p + "attention.wq.weight", cap);
        k = Lin(h, p + "attention.wk.weight", cap);
        v = Lin(h, p + "attention.wv.weight", cap);
      }
      q = Rope(q.reshape({B, T, H, hd}));
      k = Rope(k.reshape({B, T, KV, hd}));
      v = v.reshape({B, T, KV, hd});
      if (KV != H) {
        k = k.repeat_interleave(H / KV, 2);
        v = v.repeat_interleave(H / KV, 2);
      }
      q = q.transpose(1, 2);
      k = k.transpose(1, 2);
      v = v.transpose(1, 2);
      auto scores = torch::matmul(q, k.transpose(-2, -1)) * scale;
      if (arch.attn_softcap > 0) scores = torch::tanh(scores / arch.attn_softcap) * arch.attn_softcap;
      const bool slides = window_mask.defined() && (!arch.window_even_layers || l % 2 == 0);
      auto att = torch::softmax(scores + (slides ? window_mask : mask), -1);
      auto oh = torch::matmul(att, v);
      auto a = Lin(oh.transpose(1, 2).reshape({B, T, H * hd}), p + "attention.wo.weight", cap);
      if (arch.sandwich) a = RmsNorm(a, W(p + "attention_post_norm.weight"));
      x = x + a;
      h = RmsNorm(x, W(p + "ffn_norm.weight"), r ? &r->r2 : nullptr);
      torch::Tensor a1, a3;
      if (arch.fused) {
        auto gu = Lin(h, p + "feed_forward.w13.weight", cap);
        a1 = gu.narrow(-1, 0, cfg.hidden_dim);
        a3 = gu.narrow(-1, cfg.hidden_dim, cfg.hidden_dim);
      } else {
        a1 = Lin(h, p + "feed_forward.w1.weight", cap);
        a3 = Lin(h, p + "feed_forward.w3.weight", cap);
      }
      auto s1 = Act(a1);
      if (r) *r = {r->x_in, r->r1, q, k, v, att, oh, x, r->r2, a1, a3, s1};
      auto m = Lin(s1 * a3, p + "feed_forward.w2.weight", cap);
      if (arch.sandwich) m = RmsNorm(m, W(p + "ffn_post_norm.weight"));
      x = x + m;
    }
    if (from > 0) x = x.slice(1, from, T);
    if (rec) cap->x_final = x;
    x = RmsNorm(x, W("norm.weight"), rec ? &cap->r_final : nullptr);
    auto logits = Lin(x, cfg.tied_output ? "tok_embeddings.weight" : "output.weight", cap);
    if (arch.final_softcap > 0) logits = torch::tanh(logits / arch.final_softcap) * arch.final_softcap;
    return logits;
  }

  // Selected parameter p's per-sample gradients (per_p: [B, ...]) as [B, numel] doubles on the device,
  // preconditioned (when a preconditioner is loaded), then scaled to unit L2 norm per row when normalize (a zero
  // row stays zero).
  torch::Tensor Block(const torch::Tensor& per_p, int64_t B, bool normalize, size_t p) const {
    auto g = per_p.to(torch::kDouble).reshape({B, -1});
    if (!precond.empty()) g = g * precond[p].view({1, -1});
    if (!normalize) return g;
    auto n = g.norm(2, 1, true);
    return g / torch::where(n > 0, n, torch::ones_like(n));
  }

  // Per-sample gradients (per[p]: [B, ...] for selected parameter p; undefined: zero) as B vectors of `dim`
  // doubles, out[first + b], each parameter's block through Block().
  void Assemble(const std::vector<torch::Tensor>& per, int64_t B, bool normalize,
                std::vector<std::vector<double>>* out, size_t first = 0) const {
    for (int64_t b = 0; b < B; ++b) (*out)[first + b].assign(dim, 0.0);
    for (size_t p = 0; p < infos.size(); ++p) {
      if (!per[p].defined()) continue;
      auto g = Block(per[p], B, normalize, p).to(torch::kCPU).contiguous();  // one copy to the host per block
      for (int64_t b = 0; b < B; ++b) {
        std::memcpy((*out)[first + b].data() + infos[p].offset, g[b].data_ptr<double>(), g.size(1) * sizeof(double));
      }
    }
  }

  // Waits for the engine's device, so that code outside LibTorch (another CUDA runtime, another stream) can read
  // what it wrote. Nothing to do on the CPU.
  void SyncDevice() const {
    if (device.is_cuda()) torch::cuda::synchronize(device.index());
  }

  // The same as one [B, dim] float32 tensor on the engine's device (GradientRowsBatch).
  torch::Tensor Rows(const std::vector<torch::Tensor>& per, int64_t B, bool normalize) const {
    auto rows = torch::zeros({B, dim}, Opts().dtype(torch::kFloat));
    for (size_t p = 0; p < infos.size(); ++p) {
      if (per[p].defined()) rows.narrow(1, infos[p].offset, infos[p].numel).copy_(Block(per[p], B, normalize, p));
    }
    return rows;
  }

  // Rows() for float32 blocks in host memory (the direct pass's), written into out (B x dim floats) without
  // LibTorch's double round trip: the same preconditioning and per-block unit norm, the norm summed in double.
  void RowsHostF32(const std::vector<torch::Tensor>& per, int64_t B, bool normalize, float* out) const {
    for (size_t p = 0; p < infos.size(); ++p) {
      const int64_t numel = infos[p].numel;
      const double* pre = precond.empty() ? nullptr : precond[p].data_ptr<double>();
      for (int64_t b = 0; b < B; ++b) {
        float* dst = out + b * dim + infos[p].offset;
        if (!per[p].defined()) {  // no gradient: zero
          std::fill_n(dst, numel, 0.0f);
          continue;
        }
        const float* blk = per[p].data_ptr<float>() + b * numel;
        auto value = [&](int64_t j) { return pre ? blk[j] * pre[j] : static_cast<double>(blk[j]); };
        double dot, ss;
        internal::BlockDotNorm(blk, pre, nullptr, numel, &dot, &ss);
        const double inv = normalize && ss > 0 ? 1.0 / std::sqrt(ss) : 1.0;
        for (int64_t e = 0; e < numel; ++e) dst[e] = static_cast<float>(value(e) * inv);
      }
    }
  }

  // For parameter p's float32 blocks in host memory ([B, numel]): out[b] += <P g_b, u_p> / |P g_b| (without
  // normalize, <P g_b, u_p>; a zero block adds nothing, a non-finite one makes out[b] NaN), P the preconditioner:
  // RowsHostF32's rows against u, without writing them.
  void BlockScoresHostF32(size_t p, const torch::Tensor& blocks, int64_t B, bool normalize, const double* u,
                          double* out) const {
    const int64_t numel = infos[p].numel;
    for (int64_t b = 0; b < B; ++b) {
      double s2 = 0, d2 = 0;
      internal::BlockDotNorm(blocks.data_ptr<float>() + b * numel, Precond(p), u + infos[p].offset, numel, &d2, &s2);
      AddScore(d2, s2, normalize, out + b);
    }
  }
  const double* Precond(size_t p) const { return precond.empty() ? nullptr : precond[p].data_ptr<double>(); }
  // One parameter's part of a token score from its block's dot and squared norm (BlockDotNorm).
  static void AddScore(double d2, double s2, bool normalize, double* out) {
    if (!std::isfinite(s2) || !std::isfinite(d2)) {  // an overflow: the score says so (not a zero block)
      *out = std::numeric_limits<double>::quiet_NaN();
    } else if (!normalize) {
      *out += d2;
    } else if (s2 > 0) {
      *out += d2 / std::sqrt(s2);
    }
  }

  // Per-sample gradients of a batch (per[p] as above) and each record's loss: one padded forward and backward
  // pass (each linear layer's per-sample weight gradient from its recorded input and output gradient), or one
  // autograd pass per record when the batch has one record or a selected parameter is not a weight matrix.
  absl::Status PerSample(const std::vector<TokenizedExample>& batch, std::vector<torch::Tensor>* per,
                         std::vector<double>* losses) const;
  // Whether PerSample takes the hand-written CPU pass (model/internal/llama_grad.h): grad_path "direct", a plain
  // Llama on the CPU without an adapter, every selected parameter one of its weight matrices. Decided by Select()
  // (every loader and AddLora end there), not per gradient.
  bool DirectApplies() const { return direct; }
  bool direct = false;
  bool ComputeDirectApplies() const;
  // The direct pass's view of this model (DirectApplies() must hold; F is the engine's dtype).
  internal::LlamaShape DirectShape() const {
    internal::LlamaShape s;
    s.dim = cfg.dim;
    s.hidden = cfg.hidden_dim;
    s.layers = cfg.n_layers;
    s.heads = cfg.n_heads;
    s.kv_heads = cfg.n_kv_heads;
    s.head_dim = cfg.HeadDim();
    s.vocab = cfg.vocab_size;
    s.norm_eps = cfg.norm_eps;
    s.rope_half = rope_half;
    return s;
  }
  template <class F>
  internal::LlamaWeights<F> DirectWeights() const {
    auto ptr = [&](const std::string& n) { return w.at(n).template data_ptr<F>(); };
    internal::LlamaWeights<F> wt;
    wt.emb = ptr("tok_embeddings.weight");
    wt.head = cfg.tied_output ? wt.emb : ptr("output.weight");
    wt.final_norm = ptr("norm.weight");
    wt.cos = cos.template data_ptr<F>();
    wt.sin = sin.template data_ptr<F>();
    for (int l = 0; l < cfg.n_layers; ++l) {
      const std::string p = absl::StrCat("layers.", l, ".");
      wt.layers.push_back({ptr(p + "attention.wq.weight"), ptr(p + "attention.wk.weight"),
                           ptr(p + "attention.wv.weight"), ptr(p + "attention.wo.weight"),
                           ptr(p + "feed_forward.w1.weight"), ptr(p + "feed_forward.w2.weight"),
                           ptr(p + "feed_forward.w3.weight"), ptr(p + "attention_norm.weight"),
                           ptr(p + "ffn_norm.weight")});
    }
    return wt;
  }
  // Where the direct pass writes: block b of per[p] ([B, numel] tensors, one per selected parameter).
  template <class F>
  internal::LlamaGrads<F> DirectGrads(std::vector<torch::Tensor>* per, int64_t b) const {
    auto grad = [&](const std::string& n) -> F* {
      for (size_t i = 0; i < infos.size(); ++i) {
        if (infos[i].name == n) return (*per)[i][b].template data_ptr<F>();
      }
      return nullptr;
    };
    internal::LlamaGrads<F> g;
    g.emb = grad("tok_embeddings.weight");
    g.head = cfg.tied_output ? g.emb : grad("output.weight");
    for (int l = 0; l < cfg.n_layers; ++l) {
      const std::string p = absl::StrCat("layers.", l, ".");
      typename internal::LlamaGrads<F>::Layer gl;
      gl.wq = grad(p + "attention.wq.weight");
      gl.wk = grad(p + "attention.wk.weight");
      gl.wv = grad(p + "attention.wv.weight");
      gl.wo = grad(p + "attention.wo.weight");
      gl.w1 = grad(p + "feed_forward.w1.weight");
      gl.w2 = grad(p + "feed_forward.w2.weight");
      gl.w3 = grad(p + "feed_forward.w3.weight");
      g.layers.push_back(gl);
    }
    return g;
  }
  // The direct token pass's targets for scores against u (grad_dim values): parameter p's dot and ss for c tokens
  // at out + 2 c p and out + 2 c p + c.
  internal::LlamaTargets DirectTargets(const double* u, int c, double* out) const {
    auto target = [&](const std::string& n) {
      internal::LlamaTarget t;
      for (size_t i = 0; i < infos.size(); ++i) {
        if (infos[i].name == n) {
          t.u = u + infos[i].offset;
          t.pre = Precond(i);
          t.dot = out + 2 * int64_t{c} * static_cast<int64_t>(i);
          t.ss = t.dot + c;
        }
      }
      return t;
    };
    internal::LlamaTargets t;
    t.emb = target("tok_embeddings.weight");
    t.head = cfg.tied_output ? t.emb : target("output.weight");
    for (int l = 0; l < cfg.n_layers; ++l) {
      const std::string p = absl::StrCat("layers.", l, ".");
      t.layers.push_back({target(p + "attention.wq.weight"), target(p + "attention.wk.weight"),
                          target(p + "attention.wv.weight"), target(p + "attention.wo.weight"),
                          target(p + "feed_forward.w1.weight"), target(p + "feed_forward.w2.weight"),
                          target(p + "feed_forward.w3.weight")});
    }
    return t;
  }
  // PerSample through that pass, one record at a time.
  absl::Status DirectPerSample(const std::vector<TokenizedExample>& batch, std::vector<torch::Tensor>* per,
                               std::vector<double>* losses) const;

  torch::Tensor Ids(const std::vector<int32_t>& ids) const {
    std::vector<int64_t> v(ids.begin(), ids.end());
    return torch::tensor(v, torch::kLong).view({1, static_cast<int64_t>(v.size())}).to(device);
  }

  // Mean cross-entropy of positions [from-1, T-1) predicting tokens [from, T).
  torch::Tensor ResponseLoss(const TokenizedExample& t, const torch::Tensor& emb_scale = torch::Tensor()) const {
    auto ids = Ids(t.ids);
    const int64_t T = ids.size(1);
    auto logits = Forward(ids, nullptr, t.response_begin - 1, emb_scale);  // positions [response_begin - 1, T)
    auto pred = logits[0].slice(0, 0, T - t.response_begin);
    auto target = ids[0].slice(0, t.response_begin, T);
    if (t.loss_weights.empty()) return torch::nn::functional::cross_entropy(pred, target);
    auto w = torch::tensor(t.loss_weights, torch::kDouble).to(device, dtype);
    auto ce = torch::nn::functional::cross_entropy(
        pred, target, torch::nn::functional::CrossEntropyFuncOptions().reduction(torch::kNone));
    return (ce * w).sum() / w.sum();
  }
};

// model/'s files other than the engine's own (token_grads.cc) reach its state through this; nothing outside
// model/ can, since GradientEngine::Impl is private.
struct EngineAccess {
  using Impl = GradientEngine::Impl;
  static Impl& Of(GradientEngine& e) { return *e.impl_; }
  static const Impl& Of(const GradientEngine& e) { return *e.impl_; }
};

}  // namespace rapidin::model

#endif  // RAPIDIN_MODEL_INTERNAL_ENGINE_IMPL_H_
