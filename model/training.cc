// Training and output: LoRA adapters, AdamW steps, saving (PEFT adapter, optimizer state, Hugging Face, llama2.c)
// and greedy generation.
#include "model/training.h"

#include <dlfcn.h>
#include <torch/torch.h>

#include <atomic>
#include <cmath>
#include <cstdint>
#include <mutex>
#include <thread>
#include <filesystem>
#include <functional>
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

namespace rapidin::model {

absl::Status AddLora(GradientEngine* engine, const LoraConfig& lc) {
  return Guarded([&]() -> absl::Status {
    EngineAccess::Impl& d = EngineAccess::Of(*engine);
    if (!d.lora.empty()) return absl::FailedPreconditionError("a LoRA adapter is already attached");
    if (lc.rank < 1 || !(lc.alpha > 0) || lc.target_modules.empty()) {
      return absl::InvalidArgumentError("LoRA needs rank >= 1, alpha > 0 and at least one target module");
    }
    std::set<std::string> targets(lc.target_modules.begin(), lc.target_modules.end());
    std::set<std::string> known;
    for (const auto& [hf, ours] : HfModules(d.arch.fused)) known.insert(hf.substr(hf.find('.') + 1));
    for (const auto& t : targets) {
      if (!known.count(t)) return absl::InvalidArgumentError(absl::StrCat("unknown LoRA target module \"", t, "\""));
    }
    std::mt19937_64 rng(lc.seed);
    for (int l = 0; l < d.cfg.n_layers; ++l) {
      for (const auto& [hf, ours] : HfModules(d.arch.fused)) {
        if (!targets.count(hf.substr(hf.find('.') + 1))) continue;
        const std::string p = absl::StrCat("layers.", l, ".", ours);
        const torch::Tensor& base = d.w.at(p + ".weight");
        const int64_t in = base.size(1), out = base.size(0);
        // PEFT: kaiming_uniform_(a=sqrt(5)) on A, i.e. U(-1/sqrt(in), 1/sqrt(in)); B starts at zero.
        std::uniform_real_distribution<double> u(-1.0 / std::sqrt(static_cast<double>(in)),
                                                 1.0 / std::sqrt(static_cast<double>(in)));
        std::vector<float> a(static_cast<size_t>(lc.rank) * in);
        for (auto& v : a) v = static_cast<float>(u(rng));
        d.Add(p + ".lora_A.weight", torch::from_blob(a.data(), {lc.rank, in}, torch::kFloat));
        d.Add(p + ".lora_B.weight", torch::zeros({out, lc.rank}, torch::kFloat));
        d.lora[p + ".weight"] = {p + ".lora_A.weight", p + ".lora_B.weight"};
      }
    }
    d.lora_rank = lc.rank;
    d.lora_alpha = lc.alpha;
    d.lora_scale = lc.alpha / lc.rank;
    d.lora_targets.assign(targets.begin(), targets.end());
    absl::Status st = d.Select();
    if (!st.ok()) return st;
    d.Rehash();
    return absl::OkStatus();
  });
}

absl::StatusOr<double> TrainStep(GradientEngine* engine, const std::vector<TokenizedExample>& batch,
                                 const AdamWOptions& o) {
  return Guarded([&]() -> absl::StatusOr<double> {
    EngineAccess::Impl& d = EngineAccess::Of(*engine);
    if (batch.empty()) return absl::InvalidArgumentError("TrainStep: empty batch");
    if (!(o.lr > 0) || o.beta1 < 0 || o.beta1 >= 1 || o.beta2 < 0 || o.beta2 >= 1 || !(o.eps > 0) ||
        o.weight_decay < 0) {
      return absl::InvalidArgumentError("TrainStep: bad AdamW settings");
    }
    const int64_t B = static_cast<int64_t>(batch.size());
    int64_t T = 0;
    for (const auto& t : batch) {
      if (absl::Status st = CheckRecord(t, d.cfg.vocab_size); !st.ok()) return st;
      T = std::max<int64_t>(T, static_cast<int64_t>(t.ids.size()));
    }
    // Right padding: with the causal mask, padding never influences the real positions; its weight is zero.
    std::vector<int64_t> ids(B * T, 0);
    std::vector<double> weight(B * (T - 1), 0.0);
    for (int64_t b = 0; b < B; ++b) {
      const auto& t = batch[b];
      const int64_t n = static_cast<int64_t>(t.ids.size()), r = t.response_begin;
      for (int64_t i = 0; i < n; ++i) ids[b * T + i] = t.ids[i];
      double total = 0;
      for (int64_t s = r; s < n; ++s) total += t.loss_weights.empty() ? 1.0 : t.loss_weights[s - r];
      for (int64_t s = r; s < n; ++s) {
        weight[b * (T - 1) + s - 1] = (t.loss_weights.empty() ? 1.0 : t.loss_weights[s - r]) / total;
      }
    }
    const Leaves leaves = d.MakeLeaves();
    LeavesScope scope(&leaves);
    auto idt = torch::tensor(ids, torch::kLong).view({B, T}).to(d.device);
    auto logp = torch::log_softmax(d.Forward(idt).slice(1, 0, T - 1), -1);
    auto nll = -logp.gather(-1, idt.slice(1, 1, T).unsqueeze(-1)).squeeze(-1);  // [B, T-1]
    auto w = torch::tensor(weight, torch::kDouble).to(d.device, d.dtype).view({B, T - 1});
    auto loss = (nll * w).sum() / static_cast<double>(B);
    const double value = loss.item<double>();
    if (!std::isfinite(value)) return absl::InternalError("TrainStep: the loss is not finite");
    auto grads = torch::autograd::grad({loss}, leaves.selected);
    torch::NoGradGuard no_grad;
    if (d.adam_m.empty()) {
      for (const auto& p : d.selected) {
        d.adam_m.push_back(torch::zeros_like(p));
        d.adam_v.push_back(torch::zeros_like(p));
      }
    }
    ++d.adam_step;
    const double bc1 = 1 - std::pow(o.beta1, static_cast<double>(d.adam_step));
    const double bc2 = 1 - std::pow(o.beta2, static_cast<double>(d.adam_step));
    for (size_t i = 0; i < d.selected.size(); ++i) {
      torch::Tensor& p = d.selected[i];
      const torch::Tensor& g = grads[i];
      if (o.weight_decay > 0) p.mul_(1 - o.lr * o.weight_decay);
      d.adam_m[i].mul_(o.beta1).add_(g, 1 - o.beta1);
      d.adam_v[i].mul_(o.beta2).addcmul_(g, g, 1 - o.beta2);
      p.addcdiv_(d.adam_m[i] / bc1, (d.adam_v[i] / bc2).sqrt_().add_(o.eps), -o.lr);
    }
    // Hashing reads every weight (the base model too): do it when the hash is asked for, not every step.
    MutexLock l(&d.hash_mu);
    d.hash_stale = true;
    return value;
  });
}

namespace {

// Writes path.tmp through `write`, then renames it over path: a killed writer leaves the old file whole.
absl::Status WriteFileAtomically(const std::string& path, const std::function<void(std::ostream&)>& write) {
  const std::string tmp = path + ".tmp";
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    write(out);
    if (!out.flush()) return absl::UnavailableError(absl::StrCat("cannot write ", tmp));
  }
  std::error_code ec;
  std::filesystem::rename(tmp, path, ec);
  if (ec) return absl::UnavailableError(absl::StrCat("cannot rename ", tmp, ": ", ec.message()));
  return absl::OkStatus();
}

// safetensors: 8-byte little-endian header length, a JSON header, then the raw tensors.
absl::Status WriteSafetensors(const std::string& path, const std::vector<std::pair<std::string, torch::Tensor>>& ts,
                              const nlohmann::json& metadata = nlohmann::json()) {
  nlohmann::json header = nlohmann::json::object();
  if (metadata.is_object()) header["__metadata__"] = metadata;  // safetensors: string values only
  std::string data;
  for (const auto& [name, t] : ts) {
    auto c = t.detach().to(torch::kCPU, torch::kFloat).contiguous();
    const size_t begin = data.size();
    data.append(reinterpret_cast<const char*>(c.data_ptr<float>()), c.numel() * sizeof(float));
    header[name] = {{"dtype", "F32"}, {"shape", c.sizes().vec()}, {"data_offsets", {begin, data.size()}}};
  }
  std::string h = header.dump();
  while (h.size() % 8 != 0) h += ' ';
  const uint64_t n = h.size();
  return WriteFileAtomically(path, [&](std::ostream& out) {
    out.write(reinterpret_cast<const char*>(&n), 8);
    out << h << data;
  });
}

}  // namespace

absl::Status SaveAdapter(const GradientEngine& engine, const std::string& dir, const std::string& base_model) {
  return Guarded([&]() -> absl::Status {
    const EngineAccess::Impl& d = EngineAccess::Of(engine);
    if (d.lora.empty()) return absl::FailedPreconditionError("no LoRA adapter is attached");
    std::error_code ec;
    std::filesystem::create_directories(dir, ec);
    if (ec) return absl::UnavailableError(absl::StrCat("cannot create ", dir, ": ", ec.message()));
    std::vector<std::pair<std::string, torch::Tensor>> ts;
    for (int l = 0; l < d.cfg.n_layers; ++l) {
      for (const auto& [hf, ours] : HfModules(d.arch.fused)) {
        auto it = d.lora.find(absl::StrCat("layers.", l, ".", ours, ".weight"));
        if (it == d.lora.end()) continue;
        const std::string base = absl::StrCat("base_model.model.model.layers.", l, ".", hf);
        ts.push_back({base + ".lora_A.weight", d.w.at(it->second.first)});
        ts.push_back({base + ".lora_B.weight", d.w.at(it->second.second)});
      }
    }
    absl::Status st = WriteSafetensors((std::filesystem::path(dir) / "adapter_model.safetensors").string(), ts);
    if (!st.ok()) return st;
    nlohmann::json cfg = {{"peft_type", "LORA"},         {"task_type", "CAUSAL_LM"},
                          {"r", d.lora_rank},            {"lora_alpha", d.lora_alpha},
                          {"target_modules", d.lora_targets}, {"lora_dropout", 0.0},
                          {"bias", "none"},              {"fan_in_fan_out", false},
                          {"base_model_name_or_path", base_model}};
    std::ofstream out(std::filesystem::path(dir) / "adapter_config.json", std::ios::trunc);
    out << cfg.dump(2) << "\n";
    if (!out.flush()) return absl::UnavailableError(absl::StrCat("cannot write ", dir, "/adapter_config.json"));
    return absl::OkStatus();
  });
}

absl::Status SaveOptimizerState(const GradientEngine& engine, const std::string& path, const AdamWOptions& o) {
  return Guarded([&]() -> absl::Status {
    const EngineAccess::Impl& d = EngineAccess::Of(engine);
    if (d.adam_step == 0) return absl::FailedPreconditionError("no optimizer state: no TrainStep has run");
    const double bc2 = 1 - std::pow(o.beta2, static_cast<double>(d.adam_step));
    std::vector<std::pair<std::string, torch::Tensor>> ts;
    for (size_t i = 0; i < d.infos.size(); ++i) ts.push_back({d.infos[i].name, d.adam_v[i] / bc2});
    const nlohmann::json meta = {{"format", "rapidin adam second moments v1"},
                                 {"step", std::to_string(d.adam_step)},
                                 {"beta2", absl::StrFormat("%.17g", o.beta2)},
                                 {"eps", absl::StrFormat("%.17g", o.eps)}};
    return WriteSafetensors(path, ts, meta);
  });
}

absl::Status SaveHf(const GradientEngine& engine, const std::string& dir) {
  return Guarded([&]() -> absl::Status {
    const EngineAccess::Impl& d = EngineAccess::Of(engine);
    const ModelConfig& c = d.cfg;
    torch::NoGradGuard no_grad;
    std::error_code ec;
    std::filesystem::create_directories(dir, ec);
    if (ec) return absl::UnavailableError(absl::StrCat("cannot create ", dir, ": ", ec.message()));
    if (!d.hf_names.empty()) {  // loaded from Hugging Face: every tensor under its own name, its config as read
      std::vector<std::pair<std::string, torch::Tensor>> ts;
      for (const auto& n : d.names) {
        auto it = d.hf_names.find(n);
        if (it != d.hf_names.end()) ts.push_back({it->second, d.Merged(n)});
      }
      absl::Status st = WriteSafetensors((std::filesystem::path(dir) / "model.safetensors").string(), ts,
                                         nlohmann::json{{"format", "pt"}});
      if (!st.ok()) return st;
      return WriteFileAtomically((std::filesystem::path(dir) / "config.json").string(),
                                 [&](std::ostream& out) { out << d.hf_config << "\n"; });
    }
    const int64_t hd = c.dim / c.n_heads;
    // Interleaved (2i, 2i+1) pairs -> (i, i + hd/2) halves, per head (transformers' convert_llama_weights_to_hf).
    auto permute = [&](const torch::Tensor& w, int64_t heads) {
      if (!d.llama2c) return w;  // loaded from Hugging Face: already in its order
      return w.view({heads, hd / 2, 2, w.size(1)}).transpose(1, 2).reshape({heads * hd, w.size(1)}).contiguous();
    };
    std::vector<std::pair<std::string, torch::Tensor>> ts;
    ts.push_back({"model.embed_tokens.weight", d.Merged("tok_embeddings.weight")});
    for (int l = 0; l < c.n_layers; ++l) {
      const std::string p = absl::StrCat("layers.", l, "."), h = absl::StrCat("model.layers.", l, ".");
      ts.push_back({h + "input_layernorm.weight", d.Merged(p + "attention_norm.weight")});
      ts.push_back({h + "post_attention_layernorm.weight", d.Merged(p + "ffn_norm.weight")});
      for (const auto& [hf, ours] : HfModules()) {
        torch::Tensor w = d.Merged(p + ours + ".weight");
        if (ours == "attention.wq") w = permute(w, c.n_heads);
        if (ours == "attention.wk") w = permute(w, c.n_kv_heads);
        ts.push_back({h + hf + ".weight", w});
      }
    }
    ts.push_back({"model.norm.weight", d.Merged("norm.weight")});
    if (!c.tied_output) ts.push_back({"lm_head.weight", d.Merged("output.weight")});
    absl::Status st = WriteSafetensors((std::filesystem::path(dir) / "model.safetensors").string(), ts,
                                       nlohmann::json{{"format", "pt"}});
    if (!st.ok()) return st;
    nlohmann::json cfg = {{"architectures", {"LlamaForCausalLM"}},
                          {"model_type", "llama"},
                          {"hidden_size", c.dim},
                          {"intermediate_size", c.hidden_dim},
                          {"num_hidden_layers", c.n_layers},
                          {"num_attention_heads", c.n_heads},
                          {"num_key_value_heads", c.n_kv_heads},
                          {"vocab_size", c.vocab_size},
                          {"max_position_embeddings", c.seq_len},
                          {"rms_norm_eps", c.norm_eps},
                          {"rope_theta", c.rope_theta},
                          {"tie_word_embeddings", c.tied_output},
                          {"hidden_act", "silu"},
                          {"attention_bias", false},
                          {"mlp_bias", false},
                          {"bos_token_id", 1},
                          {"eos_token_id", 2},
                          {"torch_dtype", "float32"}};
    return WriteFileAtomically((std::filesystem::path(dir) / "config.json").string(),
                               [&](std::ostream& out) { out << cfg.dump(2) << "\n"; });
  });
}

absl::Status SaveLlama2c(const GradientEngine& engine, const std::string& path) {
  return Guarded([&]() -> absl::Status {
    const EngineAccess::Impl& d = EngineAccess::Of(engine);
    if (!d.llama2c) return absl::UnimplementedError("SaveLlama2c: the base model was not a llama2.c checkpoint");
    const ModelConfig& c = d.cfg;
    torch::NoGradGuard no_grad;
    return WriteFileAtomically(path, [&](std::ostream& out) {
      const int32_t hdr[7] = {c.dim, c.hidden_dim, c.n_layers, c.n_heads, c.n_kv_heads,
                              c.tied_output ? c.vocab_size : -c.vocab_size, c.seq_len};
      out.write(reinterpret_cast<const char*>(hdr), sizeof hdr);
      auto put = [&](const torch::Tensor& t) {
        auto f = t.to(torch::kCPU, torch::kFloat).contiguous();
        out.write(reinterpret_cast<const char*>(f.data_ptr<float>()), f.numel() * sizeof(float));
      };
      put(d.Merged("tok_embeddings.weight"));
      for (const char* k : {"attention_norm", "attention.wq", "attention.wk", "attention.wv", "attention.wo",
                            "ffn_norm", "feed_forward.w1", "feed_forward.w2", "feed_forward.w3"}) {
        for (int l = 0; l < c.n_layers; ++l) put(d.Merged(absl::StrCat("layers.", l, ".", k, ".weight")));
      }
      put(d.Merged("norm.weight"));
      put(d.cos);  // freq_cis_real / imag, as llama2.c writes them
      put(d.sin);
      if (!c.tied_output) put(d.Merged("output.weight"));
    });
  });
}

namespace {

// Greedy decoding after ids until max_new tokens, EOS or `stop` (-1: none).
absl::StatusOr<std::string> GenerateAfter(const EngineAccess::Impl& d, std::vector<int32_t> ids, int max_new,
                                          int32_t stop);

}  // namespace

absl::StatusOr<std::string> GenerateChat(const GradientEngine& engine, std::vector<Message> messages, int max_new) {
  return Guarded([&]() -> absl::StatusOr<std::string> {
    const EngineAccess::Impl& d = EngineAccess::Of(engine);
    if (!d.tok) return absl::FailedPreconditionError("no tokenizer loaded");
    if (!d.chat) return d.chat_status;
    if (!messages.empty() && messages.back().role == "assistant") messages.pop_back();
    auto r = d.chat->Render(messages, /*add_generation_prompt=*/true);
    if (!r.ok()) return r.status();
    const Encoding e = EncodeWithSpecials(*d.tok, r->text);
    const std::string& end = d.chat->spec().assistant_trained_suffix;
    return GenerateAfter(d, e.ids, max_new, end.empty() ? -1 : d.tok->TokenId(end));
  });
}

absl::StatusOr<std::string> Generate(const GradientEngine& engine, const std::string& instruction,
                                     const std::string& input, int max_new) {
  return Guarded([&]() -> absl::StatusOr<std::string> {
    const EngineAccess::Impl& d = EngineAccess::Of(engine);
    if (!d.tok) return absl::FailedPreconditionError("no tokenizer loaded");
    const Encoding p = d.tok->Encode(AlpacaPrompt(instruction, input), /*dummy_prefix=*/true);
    std::vector<int32_t> ids;
    if (d.tok->bos() >= 0) ids.push_back(d.tok->bos());
    ids.insert(ids.end(), p.ids.begin(), p.ids.end());
    return GenerateAfter(d, std::move(ids), max_new, -1);
  });
}

namespace {

absl::StatusOr<std::string> GenerateAfter(const EngineAccess::Impl& d, std::vector<int32_t> ids, int max_new,
                                          int32_t stop) {
  {
    const size_t max_len = static_cast<size_t>(std::min(d.options.max_length, d.cfg.seq_len));
    if (ids.size() >= max_len) return absl::InvalidArgumentError("the prompt fills max_length");
    torch::NoGradGuard no_grad;
    std::string text;
    for (int i = 0; i < max_new && ids.size() < max_len; ++i) {
      auto logits = d.Forward(d.Ids(ids), nullptr, static_cast<int64_t>(ids.size()) - 1);
      const int32_t next = static_cast<int32_t>(logits[0][0].argmax().item<int64_t>());
      if (next == d.tok->eos() || next == stop) break;
      ids.push_back(next);
      text += d.tok->Piece(next);
    }
    return text;
  }
}

}  // namespace

}  // namespace rapidin::model
