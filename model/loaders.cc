// Loading an engine: llama2.c checkpoints, Hugging Face directories (safetensors), PEFT LoRA adapters, the
// preconditioner, random models (tests) and grown models (rapidin grow).
#include "model/engine.h"

#include <dlfcn.h>
#include <torch/torch.h>

#include <atomic>
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <mutex>
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
#include "absl/strings/str_join.h"
#include "model/internal/engine_impl.h"

namespace rapidin::model {
namespace {

absl::StatusOr<torch::Device> ResolveDevice(const std::string& name) {
  const TorchRuntime rt = GetTorchRuntime();
  if (name == "cpu") return torch::Device(torch::kCPU);
  if (name == "auto") return rt.cuda_devices > 0 ? torch::Device(torch::kCUDA, 0) : torch::Device(torch::kCPU);
  int index = 0;
  if (name != "cuda" && !(absl::StartsWith(name, "cuda:") && absl::SimpleAtoi(name.substr(5), &index) && index >= 0)) {
    return absl::InvalidArgumentError(
        absl::StrCat("unknown model device \"", name, "\": use cpu, cuda, cuda:N or auto"));
  }
  if (index >= rt.cuda_devices) {
    return absl::FailedPreconditionError(absl::StrCat(
        "model device ", name, " is not usable: LibTorch ", rt.version, " sees ", rt.cuda_devices, " CUDA device(s)",
        rt.cuda_devices == 0 ? " (a CPU-only build such as Debian's, or no GPU visible); use cpu or auto" : ""));
  }
  return torch::Device(torch::kCUDA, index);
}

absl::StatusOr<nlohmann::json> ReadJson(const std::string& path) {
  std::ifstream in(path);
  if (!in) return absl::NotFoundError(absl::StrCat("file not found: ", path));
  auto j = nlohmann::json::parse(in, nullptr, false);
  if (j.is_discarded() || !j.is_object()) return absl::DataLossError(absl::StrCat(path, ": malformed JSON"));
  return j;
}

// Reads every tensor of a .safetensors file as float32 (F32, F16 and BF16 are accepted).
absl::Status ReadSafetensors(const std::string& path, std::map<std::string, torch::Tensor>* out,
                             nlohmann::json* metadata = nullptr) {
  std::ifstream in(path, std::ios::binary | std::ios::ate);
  if (!in) return absl::NotFoundError(absl::StrCat("file not found: ", path));
  const int64_t size = in.tellg();
  in.seekg(0);
  uint64_t hlen = 0;
  if (size < 8 || !in.read(reinterpret_cast<char*>(&hlen), 8) || hlen > static_cast<uint64_t>(size - 8)) {
    return absl::DataLossError(absl::StrCat(path, ": not a safetensors file"));
  }
  std::string header(hlen, '\0');
  in.read(header.data(), hlen);
  auto h = nlohmann::json::parse(header, nullptr, false);
  if (h.is_discarded() || !h.is_object()) return absl::DataLossError(absl::StrCat(path, ": bad safetensors header"));
  std::string data(size - 8 - hlen, '\0');
  if (!in.read(data.data(), data.size())) return absl::DataLossError(absl::StrCat(path, ": truncated"));
  for (auto it = h.begin(); it != h.end(); ++it) {
    if (it.key() == "__metadata__") {
      if (metadata) *metadata = it.value();
      continue;
    }
    const auto& t = it.value();
    if (!t.is_object() || !t.contains("dtype") || !t.contains("shape") || !t.contains("data_offsets")) {
      return absl::DataLossError(absl::StrCat(path, ": bad entry for ", it.key()));
    }
    const std::string dt = t["dtype"].get<std::string>();
    torch::Dtype type;
    int64_t width;
    if (dt == "F32") type = torch::kFloat, width = 4;
    else if (dt == "F16") type = torch::kHalf, width = 2;
    else if (dt == "BF16") type = torch::kBFloat16, width = 2;
    else return absl::DataLossError(absl::StrCat(path, ": ", it.key(), " has unsupported dtype ", dt));
    std::vector<int64_t> shape = t["shape"].get<std::vector<int64_t>>();
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    const auto off = t["data_offsets"].get<std::vector<int64_t>>();
    if (off.size() == 2 && off[1] > static_cast<int64_t>(data.size()) && off[0] >= 0 && off[1] - off[0] == n * width) {
      return absl::DataLossError(absl::StrCat(path, ": truncated: ", it.key(), " ends at data byte ", off[1],
                                              " but the file holds ", data.size()));
    }
    if (off.size() != 2 || off[0] < 0 || off[1] > static_cast<int64_t>(data.size()) || off[1] - off[0] != n * width) {
      return absl::DataLossError(absl::StrCat(path, ": ", it.key(), " has inconsistent offsets"));
    }
    (*out)[it.key()] = torch::from_blob(data.data() + off[0], shape, type).to(torch::kFloat).clone();
  }
  return absl::OkStatus();
}

using Arch = EngineAccess::Impl::Arch;

// Reads a Hugging Face config.json into c and arch. Every key is either implemented, checked to have the one
// value that is implemented, or known not to change the function (bookkeeping, dropout, generation, caching);
// any other key, like an architecture not listed, is refused by name: a model is never approximated.
absl::Status ParseHfConfig(const nlohmann::json& j, ModelConfig* c, Arch* arch) {
  static const std::set<std::string> kInert = {
      "_name_or_path", "architectures", "model_type", "transformers_version", "torch_dtype", "use_cache",
      "initializer_range", "attention_dropout", "bos_token_id", "eos_token_id", "pad_token_id", "pretraining_tp",
      "embd_pdrop", "resid_pdrop", "cache_implementation", "auto_map", "output_attentions", "output_hidden_states",
      "return_dict", "id2label", "label2id", "tokenizer_class", "max_length", "use_return_dict"};
  std::string name;
  if (j.contains("architectures")) {
    const auto& a = j["architectures"];
    if (!a.is_array() || a.size() != 1 || !a[0].is_string()) {
      return absl::UnimplementedError(absl::StrCat("architectures ", a.dump(), " is not one architecture"));
    }
    name = a[0].get<std::string>();
  } else {
    static const std::map<std::string, std::string> kByType = {
        {"llama", "LlamaForCausalLM"}, {"mistral", "MistralForCausalLM"}, {"qwen2", "Qwen2ForCausalLM"},
        {"gemma", "GemmaForCausalLM"}, {"gemma2", "Gemma2ForCausalLM"},   {"phi3", "Phi3ForCausalLM"}};
    const std::string type = j.value("model_type", "llama");
    auto it = kByType.find(type);
    if (it == kByType.end()) return absl::UnimplementedError(absl::StrCat("model_type \"", type, "\" is not supported"));
    name = it->second;
  }
  static const std::set<std::string> kArchs = {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM",
                                               "GemmaForCausalLM", "Gemma2ForCausalLM", "Phi3ForCausalLM"};
  if (!kArchs.count(name)) {
    return absl::UnimplementedError(absl::StrCat("architecture \"", name, "\" is not supported (supported: ",
                                                 absl::StrJoin(kArchs, ", "), ")"));
  }
  arch->name = name;
  const bool gemma = name == "GemmaForCausalLM" || name == "Gemma2ForCausalLM";
  std::set<std::string> handled = {"hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                                   "num_key_value_heads", "vocab_size", "max_position_embeddings", "rms_norm_eps",
                                   "rope_theta", "tie_word_embeddings", "head_dim"};
  auto refuse = [&](const std::string& key) {
    return absl::UnimplementedError(
        absl::StrCat(key, " ", j[key].dump(), " is not supported for ", name));
  };
  auto present = [&](const char* key) { return j.contains(key) && !j[key].is_null(); };
  // An integer field as int: nlohmann's get<int> wraps a larger number silently (a mutated max_position_embeddings
  // of 66666666666664 became 184298152 positions, and rotary tables of gigabytes).
  auto int_of = [&](const char* key) {
    const nlohmann::json& v = j.at(key);
    bool fits = false;
    double x = 0;
    if (v.is_number_unsigned()) {
      fits = v.get<uint64_t>() <= uint64_t{INT32_MAX};
      x = fits ? static_cast<double>(v.get<uint64_t>()) : 0;
    } else if (v.is_number_integer()) {
      x = static_cast<double>(v.get<int64_t>());
      fits = x >= INT32_MIN && x <= INT32_MAX;
    } else if (v.is_number_float()) {  // 2048.0 is 2048
      x = v.get<double>();
      fits = x >= INT32_MIN && x <= INT32_MAX && x == std::floor(x);
    } else {
      (void)v.get<int>();  // throws type_error for what is not a number, as before
    }
    if (!fits) throw std::out_of_range(absl::StrCat(key, " ", v.dump(), " is not a 32-bit integer"));
    return static_cast<int>(x);
  };
  try {
    c->dim = int_of("hidden_size");
    c->hidden_dim = int_of("intermediate_size");
    c->n_layers = int_of("num_hidden_layers");
    c->n_heads = int_of("num_attention_heads");
    c->n_kv_heads = present("num_key_value_heads") ? int_of("num_key_value_heads") : c->n_heads;
    c->vocab_size = int_of("vocab_size");
    c->seq_len = present("max_position_embeddings") ? int_of("max_position_embeddings") : 2048;
    c->norm_eps = j.value("rms_norm_eps", 1e-6f);
    c->rope_theta = j.value("rope_theta", 10000.0f);
    // save_pretrained leaves out a value equal to the class default: Gemma ties by default, the others do not.
    c->tied_output = j.value("tie_word_embeddings", gemma);
    c->head_dim = present("head_dim") ? int_of("head_dim") : (gemma ? 256 : 0);
    // Projection biases: only Qwen2's q/k/v, which its class always has.
    arch->qkv_bias = name == "Qwen2ForCausalLM";
    for (const char* key : {"attention_bias", "mlp_bias"}) {
      handled.insert(key);
      if (j.contains(key) && j[key] != false) return refuse(key);
    }
    if (gemma) {
      // GemmaMLP ignores hidden_act; hidden_activation (default gelu_pytorch_tanh) picks the activation.
      handled.insert({"hidden_act", "hidden_activation"});
      const std::string act = present("hidden_activation") ? j["hidden_activation"].get<std::string>()
                                                           : "gelu_pytorch_tanh";
      if (act == "gelu_pytorch_tanh") arch->act = Arch::Act::kGeluTanh;
      else if (act == "gelu") arch->act = Arch::Act::kGelu;
      else return refuse("hidden_activation");
      arch->norm_offset = true;
      arch->emb_normalizer = true;
    } else {
      handled.insert("hidden_act");
      if (j.contains("hidden_act") && j["hidden_act"] != "silu") return refuse("hidden_act");
    }
    if (name == "Gemma2ForCausalLM") {
      handled.insert({"query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping", "sliding_window"});
      arch->sandwich = true;
      arch->query_scale = 1.0 / std::sqrt(j.value("query_pre_attn_scalar", 224.0));
      if (present("attn_logit_softcapping")) arch->attn_softcap = j["attn_logit_softcapping"].get<double>();
      if (present("final_logit_softcapping")) arch->final_softcap = j["final_logit_softcapping"].get<double>();
      arch->window = present("sliding_window") ? j["sliding_window"].get<int>() : 4096;
      arch->window_even_layers = true;
    }
    if (name == "MistralForCausalLM") {
      handled.insert("sliding_window");
      if (present("sliding_window")) arch->window = j["sliding_window"].get<int>();
    }
    if (name == "Qwen2ForCausalLM") {
      // transformers applies Qwen2's window only under flash attention, and only with use_sliding_window.
      handled.insert({"sliding_window", "max_window_layers", "use_sliding_window"});
      if (j.value("use_sliding_window", false)) return refuse("use_sliding_window");
    }
    if (name == "Phi3ForCausalLM") {
      // transformers' eager and SDPA paths ignore Phi3's window, flash attention applies it: the context is kept
      // within the window, where they agree.
      handled.insert({"sliding_window", "original_max_position_embeddings"});
      arch->fused = true;
      if (present("sliding_window")) c->seq_len = std::min(c->seq_len, int_of("sliding_window"));
    }
    if (name == "LlamaForCausalLM") {
      handled.insert("rope_scaling");
      if (present("rope_scaling")) {
        const auto& rs = j["rope_scaling"];
        const std::string type = rs.value("rope_type", rs.value("type", ""));
        if (type == "llama3") {
          arch->rope_factor = rs.at("factor").get<double>();
          arch->rope_low = rs.at("low_freq_factor").get<double>();
          arch->rope_high = rs.at("high_freq_factor").get<double>();
          arch->rope_original = rs.at("original_max_position_embeddings").get<double>();
          if (!(arch->rope_factor > 0) || !(arch->rope_high > arch->rope_low) || !(arch->rope_original > 0)) {
            return absl::DataLossError(absl::StrCat("implausible rope_scaling ", rs.dump()));
          }
        } else if (type == "linear") {
          arch->rope_linear = rs.at("factor").get<double>();
          if (!(arch->rope_linear > 0)) return absl::DataLossError(absl::StrCat("implausible rope_scaling ", rs.dump()));
        } else {
          return refuse("rope_scaling");
        }
      }
    }
    if (name != "LlamaForCausalLM" && present("rope_scaling")) return refuse("rope_scaling");
    handled.insert("rope_scaling");  // null
  } catch (const std::exception& e) {
    return absl::DataLossError(e.what());
  }
  for (auto it = j.begin(); it != j.end(); ++it) {
    if (!handled.count(it.key()) && !kInert.count(it.key())) {
      return absl::UnimplementedError(absl::StrCat("field \"", it.key(), "\" (", it.value().dump(),
                                                   ") is not implemented for ", name));
    }
  }
  return absl::OkStatus();
}


}  // namespace


// Attaches a PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors).
absl::Status GradientEngine::Impl::LoadAdapter(const std::string& path) {
  namespace fs = std::filesystem;
  const fs::path ad(path);
  auto aj = ReadJson((ad / "adapter_config.json").string());
  if (!aj.ok()) return aj.status();
  int r = 0;
  double alpha = 0;
  std::set<std::string> targets;
  try {
    if (aj->value("peft_type", "LORA") != "LORA") return absl::InvalidArgumentError("adapter is not a LoRA adapter");
    r = aj->at("r").get<int>();
    alpha = aj->at("lora_alpha").get<double>();
    if (aj->value("fan_in_fan_out", false)) return absl::UnimplementedError("fan_in_fan_out LoRA is not supported");
    const auto& tm = aj->at("target_modules");
    if (tm.is_string()) targets.insert(tm.get<std::string>());
    else for (const auto& m : tm) targets.insert(m.get<std::string>());
    lora_scale = aj->value("use_rslora", false) ? alpha / std::sqrt(static_cast<double>(r)) : alpha / r;
    lora_alpha = alpha;
    lora_rank = r;
    lora_targets.assign(targets.begin(), targets.end());
  } catch (const std::exception& e) {
    return absl::DataLossError(absl::StrCat((ad / "adapter_config.json").string(), ": ", e.what()));
  }
  if (r <= 0) return absl::DataLossError("adapter_config.json: r must be positive");
  std::map<std::string, torch::Tensor> at;
  absl::Status st = ReadSafetensors((ad / "adapter_model.safetensors").string(), &at);
  if (!st.ok()) return st;
  int found = 0;
  for (int l = 0; l < cfg.n_layers; ++l) {
    for (const auto& [hf, ours] : HfModules(arch.fused)) {
      const std::string shortname = hf.substr(hf.find('.') + 1);
      if (!targets.count(shortname)) continue;
      const std::string base = absl::StrCat("base_model.model.model.layers.", l, ".", hf);
      const std::string p = absl::StrCat("layers.", l, ".", ours);
      const auto& weight = W(p + ".weight");
      auto a = at.find(base + ".lora_A.weight"), b = at.find(base + ".lora_B.weight");
      if (a == at.end() || b == at.end()) return absl::DataLossError(absl::StrCat("adapter lacks ", base, " A/B"));
      if (a->second.sizes().vec() != std::vector<int64_t>{r, weight.size(1)} ||
          b->second.sizes().vec() != std::vector<int64_t>{weight.size(0), r}) {
        return absl::DataLossError(absl::StrCat(base, ": LoRA shapes do not match the base weight and r"));
      }
      Add(p + ".lora_A.weight", a->second);
      Add(p + ".lora_B.weight", b->second);
      lora[p + ".weight"] = {p + ".lora_A.weight", p + ".lora_B.weight"};
      ++found;
    }
  }
  if (found == 0) {
    return absl::DataLossError(absl::StrCat("the adapter's target_modules match no ", arch.name, " module"));
  }
  return absl::OkStatus();
}

absl::Status GradientEngine::Impl::Init(const EngineOptions& o) {
  UseLargeBufferCache();
  options = o;
  if (o.grad_path != "direct" && o.grad_path != "autograd") {
    return absl::InvalidArgumentError(absl::StrCat("grad_path \"", o.grad_path, "\": expected direct or autograd"));
  }
  dtype = o.use_double ? torch::kDouble : torch::kFloat;
  auto dev = ResolveDevice(o.device);
  if (!dev.ok()) return dev.status();
  device = *dev;
  // Float32 matrix products in full precision on the GPU too (no TF32), so that devices agree up to rounding.
  if (device.is_cuda()) at::globalContext().setFloat32MatmulPrecision("highest");
  return absl::OkStatus();
}

// The chat template: options.chat_template (a file or a built-in name), else the tokenizer_config.json next to
// the tokenizer. A missing or unrecognised template is not an error here: chat records are refused later with
// chat_status's reason.
static absl::Status LoadChatTemplate(const EngineOptions& options, const Tokenizer& tok, std::optional<ChatTemplate>* chat,
                              absl::Status* why) {
  namespace fs = std::filesystem;
  nlohmann::json cfg;
  const fs::path cfg_path = fs::path(options.tokenizer_path).parent_path() / "tokenizer_config.json";
  if (std::ifstream in(cfg_path); in) {
    cfg = nlohmann::json::parse(in, nullptr, false);
    if (cfg.is_discarded() || !cfg.is_object()) return absl::DataLossError(absl::StrCat(cfg_path.string(), ": malformed JSON"));
  }
  // BOS and EOS as text, for the templates that write them: tokenizer_config.json's, else the tokenizer's pieces.
  auto text = [&](const char* key, int32_t id) -> std::string {
    if (cfg.is_object() && cfg.contains(key)) {
      const auto& v = cfg[key];
      if (v.is_string()) return v.get<std::string>();
      if (v.is_object() && v.contains("content") && v["content"].is_string()) return v["content"].get<std::string>();
    }
    return id >= 0 ? tok.Piece(id) : "";
  };
  const std::string bos = text("bos_token", tok.bos()), eos = text("eos_token", tok.eos());
  absl::StatusOr<ChatTemplate> t = absl::FailedPreconditionError("");
  if (!options.chat_template.empty()) {
    t = fs::exists(options.chat_template) ? ChatTemplate::FromFile(options.chat_template, bos, eos)
                                          : ChatTemplate::Named(options.chat_template, bos, eos);
    if (!t.ok()) return t.status();  // asked for explicitly: an error now
  } else if (cfg.is_object() && cfg.contains("chat_template")) {
    std::string jinja;
    const auto& ct = cfg["chat_template"];
    if (ct.is_string()) {
      jinja = ct.get<std::string>();
    } else if (ct.is_array()) {  // named templates: the "default" one
      for (const auto& e : ct) {
        if (e.is_object() && e.value("name", "") == "default" && e.contains("template")) jinja = e["template"].get<std::string>();
      }
    }
    t = ChatTemplate::Recognize(jinja, bos, eos);
  } else {
    t = absl::FailedPreconditionError(absl::StrCat("chat records need a chat template: ", cfg_path.string(),
                                                   " has no chat_template; pass --template FILE or a family name"));
  }
  if (t.ok()) {
    *chat = std::move(*t);
  } else {
    *why = t.status();
  }
  return absl::OkStatus();
}

absl::Status GradientEngine::Impl::Complete() {
  if (!options.tokenizer_path.empty()) {
    auto t = Tokenizer::Load(options.tokenizer_path, cfg.vocab_size);
    if (!t.ok()) return t.status();
    tok = std::move(*t);
    if (absl::Status st = LoadChatTemplate(options, *tok, &chat, &chat_status); !st.ok()) return st;
  } else if (!options.chat_template.empty()) {
    return absl::InvalidArgumentError("a chat template needs a tokenizer");
  }
  absl::Status st = Finish();
  if (st.ok()) st = LoadPreconditioner();
  return st;
}

absl::Status GradientEngine::Impl::LoadPreconditioner() {
  precond.clear();
  precond_desc = "none";
  if (options.preconditioner_path.empty()) return absl::OkStatus();
  std::map<std::string, torch::Tensor> v;
  nlohmann::json meta;
  const std::string& path = options.preconditioner_path;
  if (absl::Status st = ReadSafetensors(path, &v, &meta); !st.ok()) return st;
  double eps = 1e-8;
  if (meta.is_object() && meta.contains("eps")) {
    const auto& e = meta["eps"];
    eps = e.is_string() ? std::strtod(e.get<std::string>().c_str(), nullptr) : e.get<double>();
  }
  if (!(eps > 0) || !std::isfinite(eps)) return absl::DataLossError(absl::StrCat(path, ": bad eps in its metadata"));
  uint64_t h = kernels::kFnv1aOffset;
  for (const auto& info : infos) {
    auto it = v.find(info.name);
    if (it == v.end()) {
      return absl::InvalidArgumentError(absl::StrCat(path, ": no second moments for parameter ", info.name,
                                                     " (written for another model or parameter selection?)"));
    }
    if (it->second.numel() != info.numel) {
      return absl::InvalidArgumentError(absl::StrFormat("%s: %s has %d values, the parameter %d", path, info.name,
                                                        it->second.numel(), info.numel));
    }
    auto c = it->second.contiguous();
    if ((~torch::isfinite(c)).any().item<bool>() || (c < 0).any().item<bool>()) {
      return absl::DataLossError(absl::StrCat(path, ": ", info.name, " has negative or non-finite second moments"));
    }
    h = Fnv1a(h, info.name.data(), info.name.size());
    h = Fnv1a(h, c.data_ptr<float>(), c.numel() * sizeof(float));
    precond.push_back((1.0 / (c.to(torch::kDouble).sqrt() + eps)).reshape({-1}).to(device));
  }
  h = Fnv1a(h, &eps, sizeof eps);
  precond_hash = h;
  precond_desc = absl::StrFormat("adam-v/%016x,eps=%g", h, eps);
  Rehash();
  return absl::OkStatus();
}

GradientEngine::GradientEngine(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
GradientEngine::~GradientEngine() = default;

absl::StatusOr<std::unique_ptr<GradientEngine>> GradientEngine::Load(const EngineOptions& options) {
  return Guarded([&]() -> absl::StatusOr<std::unique_ptr<GradientEngine>> {
    if (options.max_length < 4) return absl::InvalidArgumentError("max_length must be at least 4");
    if (std::filesystem::is_directory(options.model_path)) return LoadHf(options);
    std::ifstream in(options.model_path, std::ios::binary | std::ios::ate);
    if (!in) return absl::NotFoundError(absl::StrCat("model file not found: ", options.model_path));
    const int64_t size = in.tellg();
    in.seekg(0);
    int32_t hdr[7];
    if (size < 28 || !in.read(reinterpret_cast<char*>(hdr), sizeof hdr)) {
      return absl::DataLossError(absl::StrCat(options.model_path, ": too short for a llama2.c checkpoint"));
    }
    auto impl = std::make_unique<Impl>();
    if (absl::Status init = impl->Init(options); !init.ok()) return init;
    ModelConfig& c = impl->cfg;
    c.dim = hdr[0];
    c.hidden_dim = hdr[1];
    c.n_layers = hdr[2];
    c.n_heads = hdr[3];
    c.n_kv_heads = hdr[4];
    c.tied_output = hdr[5] > 0;
    c.vocab_size = hdr[5] == INT32_MIN ? 0 : std::abs(hdr[5]);  // -INT32_MIN overflows; 0 is refused below
    c.seq_len = hdr[6];
    if (c.dim <= 0 || c.hidden_dim <= 0 || c.n_layers <= 0 || c.n_heads <= 0 || c.n_kv_heads <= 0 ||
        c.vocab_size <= 0 || c.seq_len <= 0 || c.dim % c.n_heads != 0 || c.n_heads % c.n_kv_heads != 0 ||
        (c.dim / c.n_heads) % 2 != 0 || c.dim > 65536 || c.n_layers > 1024 || c.vocab_size > 10000000) {
      return absl::DataLossError(absl::StrCat(options.model_path, ": implausible llama2.c header"));
    }
    const int64_t D = c.dim, F = c.hidden_dim, L = c.n_layers, V = c.vocab_size, hd = D / c.n_heads;
    const int64_t KVD = hd * c.n_kv_heads;
    const int64_t floats = V * D + L * D + L * D * D + 2 * L * KVD * D + L * D * D + L * D + 3 * L * F * D + D +
                           c.seq_len * hd + (c.tied_output ? 0 : V * D);
    if (size != 28 + floats * 4) {
      return absl::DataLossError(absl::StrFormat("%s: %d bytes, but the header implies %d", options.model_path, size,
                                                 28 + floats * 4));
    }
    std::vector<float> buf(floats);
    if (!in.read(reinterpret_cast<char*>(buf.data()), floats * 4)) {
      return absl::DataLossError(absl::StrCat(options.model_path, ": read failed"));
    }
    int64_t off = 0;
    auto take = [&](std::vector<int64_t> shape) {
      int64_t n = 1;
      for (auto s : shape) n *= s;
      auto t = torch::from_blob(buf.data() + off, shape, torch::kFloat).clone();
      off += n;
      return t;
    };
    auto emb = take({V, D});
    auto rms_att = take({L, D});
    auto wq = take({L, D, D});
    auto wk = take({L, KVD, D});
    auto wv = take({L, KVD, D});
    auto wo = take({L, D, D});
    auto rms_ffn = take({L, D});
    auto w1 = take({L, F, D});
    auto w2 = take({L, D, F});
    auto w3 = take({L, F, D});
    auto rms_final = take({D});
    off += c.seq_len * hd;  // freq_cis_real / imag: recomputed
    impl->Add("tok_embeddings.weight", emb);
    for (int l = 0; l < L; ++l) {
      const std::string p = absl::StrCat("layers.", l, ".");
      impl->Add(p + "attention_norm.weight", rms_att[l]);
      impl->Add(p + "attention.wq.weight", wq[l]);
      impl->Add(p + "attention.wk.weight", wk[l]);
      impl->Add(p + "attention.wv.weight", wv[l]);
      impl->Add(p + "attention.wo.weight", wo[l]);
      impl->Add(p + "ffn_norm.weight", rms_ffn[l]);
      impl->Add(p + "feed_forward.w1.weight", w1[l]);
      impl->Add(p + "feed_forward.w2.weight", w2[l]);
      impl->Add(p + "feed_forward.w3.weight", w3[l]);
    }
    impl->Add("norm.weight", rms_final);
    if (!c.tied_output) impl->Add("output.weight", take({V, D}));
    impl->llama2c = true;
    if (!options.adapter_path.empty()) {
      absl::Status st = impl->LoadAdapter(options.adapter_path);
      if (!st.ok()) return st;
    }
    if (absl::Status st = impl->Complete(); !st.ok()) return st;
    return std::unique_ptr<GradientEngine>(new GradientEngine(std::move(impl)));
  });
}


absl::StatusOr<std::unique_ptr<GradientEngine>> GradientEngine::LoadHf(const EngineOptions& options) {
  namespace fs = std::filesystem;
  const fs::path dir(options.model_path);
  auto cj = ReadJson((dir / "config.json").string());
  if (!cj.ok()) return cj.status();
  auto impl = std::make_unique<Impl>();
  if (absl::Status init = impl->Init(options); !init.ok()) return init;
  impl->rope_half = true;
  ModelConfig& c = impl->cfg;
  if (absl::Status st = ParseHfConfig(*cj, &c, &impl->arch); !st.ok()) {
    return absl::Status(st.code(), absl::StrCat((dir / "config.json").string(), ": ", st.message()));
  }
  impl->hf_config = cj->dump(2);
  if (c.dim <= 0 || c.n_heads <= 0 || c.n_kv_heads <= 0 || c.HeadDim() <= 0 || c.HeadDim() % 2 != 0 ||
      c.n_heads % c.n_kv_heads != 0 || c.n_layers <= 0 || c.vocab_size <= 0 || c.hidden_dim <= 0) {
    return absl::DataLossError("config.json: implausible model dimensions");
  }
  // The rotary tables are built for every position at load: a context beyond 4M positions is refused rather than
  // allocated (the largest released configs hold about 1M).
  constexpr int kMaxPositions = 1 << 22;
  if (c.seq_len <= 0 || c.seq_len > kMaxPositions) {
    return absl::DataLossError(absl::StrCat("config.json: max_position_embeddings ", c.seq_len,
                                            " is outside [1, ", kMaxPositions, "]"));
  }
  // Weights: one file, or an index naming the shards.
  std::map<std::string, torch::Tensor> t;
  std::vector<std::string> files;
  if (fs::exists(dir / "model.safetensors.index.json")) {
    auto idx = ReadJson((dir / "model.safetensors.index.json").string());
    if (!idx.ok()) return idx.status();
    if (!idx->contains("weight_map") || !(*idx)["weight_map"].is_object()) {
      return absl::DataLossError("model.safetensors.index.json has no weight_map");
    }
    std::set<std::string> shards;
    for (auto it = (*idx)["weight_map"].begin(); it != (*idx)["weight_map"].end(); ++it) {
      shards.insert(it.value().get<std::string>());
    }
    files.assign(shards.begin(), shards.end());
  } else if (fs::exists(dir / "model.safetensors")) {
    files.push_back("model.safetensors");
  } else {
    return absl::NotFoundError(absl::StrCat("no model.safetensors or model.safetensors.index.json in ", dir.string()));
  }
  for (const auto& f : files) {
    absl::Status st = ReadSafetensors((dir / f).string(), &t);
    if (!st.ok()) return st;
  }
  const int64_t D = c.dim, F = c.hidden_dim, hd = c.HeadDim(), QD = hd * c.n_heads, KVD = hd * c.n_kv_heads,
                V = c.vocab_size;
  const auto& arch = impl->arch;
  std::set<std::string> taken;
  auto take = [&](const std::string& hf, std::vector<int64_t> shape, const std::string& ours) -> absl::Status {
    taken.insert(hf);
    auto it = t.find(hf);
    if (it == t.end()) return absl::DataLossError(absl::StrCat("weights lack ", hf));
    if (it->second.sizes().vec() != shape) {
      return absl::DataLossError(absl::StrCat(hf, " has shape ", c10::str(it->second.sizes()), ", expected ",
                                              c10::str(c10::IntArrayRef(shape))));
    }
    impl->Add(ours, it->second);
    impl->hf_names[ours] = hf;
    return absl::OkStatus();
  };
  absl::Status st = take("model.embed_tokens.weight", {V, D}, "tok_embeddings.weight");
  const std::map<std::string, std::vector<int64_t>> shapes = {
      {"attention.wq", {QD, D}},       {"attention.wk", {KVD, D}},       {"attention.wv", {KVD, D}},
      {"attention.wo", {D, QD}},       {"feed_forward.w1", {F, D}},      {"feed_forward.w2", {D, F}},
      {"feed_forward.w3", {F, D}},     {"attention.wqkv", {QD + 2 * KVD, D}}, {"feed_forward.w13", {2 * F, D}}};
  for (int l = 0; l < c.n_layers && st.ok(); ++l) {
    const std::string hp = absl::StrCat("model.layers.", l, "."), p = absl::StrCat("layers.", l, ".");
    st = take(hp + "input_layernorm.weight", {D}, p + "attention_norm.weight");
    for (const auto& [hf, ours] : HfModules(arch.fused)) {
      if (st.ok()) st = take(hp + hf + ".weight", shapes.at(ours), p + ours + ".weight");
      if (st.ok() && arch.qkv_bias && (ours == "attention.wq" || ours == "attention.wk" || ours == "attention.wv")) {
        st = take(hp + hf + ".bias", {shapes.at(ours)[0]}, p + ours + ".bias");
      }
    }
    if (arch.sandwich) {  // Gemma2: post_attention_layernorm is on the attention output, pre_feedforward the MLP's in
      if (st.ok()) st = take(hp + "post_attention_layernorm.weight", {D}, p + "attention_post_norm.weight");
      if (st.ok()) st = take(hp + "pre_feedforward_layernorm.weight", {D}, p + "ffn_norm.weight");
      if (st.ok()) st = take(hp + "post_feedforward_layernorm.weight", {D}, p + "ffn_post_norm.weight");
    } else if (st.ok()) {
      st = take(hp + "post_attention_layernorm.weight", {D}, p + "ffn_norm.weight");
    }
  }
  if (st.ok()) st = take("model.norm.weight", {D}, "norm.weight");
  if (st.ok() && !c.tied_output) st = take("lm_head.weight", {V, D}, "output.weight");
  if (!st.ok()) return st;
  // A weight the forward would not use (biases, extra norms, another model's layers) means the checkpoint is not
  // what the config says: refused by name. RoPE's inv_freq buffers, which old exports include, are derived.
  std::vector<std::string> unused;
  for (const auto& [name, tensor] : t) {
    if (!taken.count(name) && !absl::EndsWith(name, "rotary_emb.inv_freq")) unused.push_back(name);
  }
  if (!unused.empty()) {
    const size_t n = unused.size();
    if (n > 3) unused.resize(3);
    return absl::UnimplementedError(absl::StrCat("weights hold ", n, " tensors a ", arch.name, " does not use: ",
                                                 absl::StrJoin(unused, ", "), n > 3 ? ", ..." : ""));
  }

  if (!options.adapter_path.empty()) {
    st = impl->LoadAdapter(options.adapter_path);
    if (!st.ok()) return st;
  }
  st = impl->Complete();
  if (!st.ok()) return st;
  return std::unique_ptr<GradientEngine>(new GradientEngine(std::move(impl)));
}

absl::StatusOr<std::unique_ptr<GradientEngine>> GradientEngine::Random(const ModelConfig& c, uint64_t seed,
                                                                       const EngineOptions& options) {
  return Guarded([&]() -> absl::StatusOr<std::unique_ptr<GradientEngine>> {
    auto impl = std::make_unique<Impl>();
    if (absl::Status init = impl->Init(options); !init.ok()) return init;
    impl->cfg = c;
    impl->llama2c = true;  // same layout (interleaved RoPE pairs), so SaveLlama2c can write it
    std::mt19937_64 rng(seed);
    std::normal_distribution<double> g(0.0, 1.0);
    auto rnd = [&](std::vector<int64_t> shape, double scale, double mean) {
      auto t = torch::empty(shape, torch::kDouble);
      auto* p = t.data_ptr<double>();
      for (int64_t i = 0; i < t.numel(); ++i) p[i] = mean + scale * g(rng);
      return t;
    };
    const int64_t D = c.dim, F = c.hidden_dim, hd = D / c.n_heads, KVD = hd * c.n_kv_heads;
    impl->Add("tok_embeddings.weight", rnd({c.vocab_size, D}, 0.5, 0));
    for (int l = 0; l < c.n_layers; ++l) {
      const std::string p = absl::StrCat("layers.", l, ".");
      impl->Add(p + "attention_norm.weight", rnd({D}, 0.1, 1));
      impl->Add(p + "attention.wq.weight", rnd({D, D}, 0.3, 0));
      impl->Add(p + "attention.wk.weight", rnd({KVD, D}, 0.3, 0));
      impl->Add(p + "attention.wv.weight", rnd({KVD, D}, 0.3, 0));
      impl->Add(p + "attention.wo.weight", rnd({D, D}, 0.3, 0));
      impl->Add(p + "ffn_norm.weight", rnd({D}, 0.1, 1));
      impl->Add(p + "feed_forward.w1.weight", rnd({F, D}, 0.3, 0));
      impl->Add(p + "feed_forward.w2.weight", rnd({D, F}, 0.3, 0));
      impl->Add(p + "feed_forward.w3.weight", rnd({F, D}, 0.3, 0));
    }
    impl->Add("norm.weight", rnd({D}, 0.1, 1));
    if (!c.tied_output) impl->Add("output.weight", rnd({c.vocab_size, D}, 0.5, 0));
    absl::Status st = impl->Finish();
    if (st.ok()) st = impl->LoadPreconditioner();
    if (!st.ok()) return st;
    return std::unique_ptr<GradientEngine>(new GradientEngine(std::move(impl)));
  });
}

absl::StatusOr<std::unique_ptr<GradientEngine>> GradientEngine::Grow(const GradientEngine& base,
                                                                     const ModelConfig& t, uint64_t seed,
                                                                     double init_std, const EngineOptions& options) {
  return Guarded([&]() -> absl::StatusOr<std::unique_ptr<GradientEngine>> {
    const Impl& b = *base.impl_;
    const ModelConfig& c = b.cfg;
    if (!b.arch.Plain() || c.HeadDim() * c.n_heads != c.dim || b.arch.rope_factor > 0 || b.arch.rope_linear > 0) {
      return absl::UnimplementedError(absl::StrCat("grow: only the Llama architecture can grow, not ", b.arch.name));
    }
    if (t.dim <= 0 || t.n_heads <= 0 || t.n_kv_heads <= 0 || t.dim % t.n_heads != 0 ||
        t.n_heads % t.n_kv_heads != 0) {
      return absl::InvalidArgumentError("grow: dim must be a multiple of heads, heads of kv heads");
    }
    if (t.dim / t.n_heads != c.dim / c.n_heads || t.n_heads / t.n_kv_heads != c.n_heads / c.n_kv_heads) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "grow: the head size (%d) and the query heads per kv head (%d) must stay as in the base model",
          c.dim / c.n_heads, c.n_heads / c.n_kv_heads));
    }
    if (t.dim < c.dim || t.hidden_dim < c.hidden_dim || t.n_layers < c.n_layers || t.n_heads < c.n_heads) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "grow: the target (dim %d, hidden %d, layers %d) is smaller than the base (dim %d, hidden %d, layers %d)",
          t.dim, t.hidden_dim, t.n_layers, c.dim, c.hidden_dim, c.n_layers));
    }
    if (t.vocab_size != c.vocab_size || t.seq_len != c.seq_len || t.tied_output != c.tied_output) {
      return absl::InvalidArgumentError("grow: vocab_size, seq_len and tied_output must stay as in the base model");
    }
    if (!(init_std >= 0)) return absl::InvalidArgumentError("grow: init_std must be >= 0");
    auto impl = std::make_unique<Impl>();
    if (absl::Status init = impl->Init(options); !init.ok()) return init;
    impl->cfg = t;
    impl->cfg.norm_eps = c.norm_eps;
    impl->cfg.rope_theta = c.rope_theta;
    impl->llama2c = b.llama2c;
    impl->rope_half = b.rope_half;
    impl->arch = b.arch;  // Llama, with its RoPE scaling
    std::mt19937_64 rng(seed);
    std::normal_distribution<double> g(0.0, init_std);
    // shape filled with N(0, init_std^2) (random) or zeros, then the base tensor (if any) copied into its corner.
    auto make = [&](const std::vector<int64_t>& shape, bool random, const torch::Tensor& old) {
      auto n = torch::zeros(shape, torch::kDouble);
      if (random) {
        auto* p = n.data_ptr<double>();
        for (int64_t i = 0; i < n.numel(); ++i) p[i] = g(rng);
      }
      if (old.defined()) {
        auto o = old.to(torch::kDouble);
        if (o.dim() == 1) {
          n.narrow(0, 0, o.size(0)).copy_(o);
        } else {
          n.narrow(0, 0, o.size(0)).narrow(1, 0, o.size(1)).copy_(o);
        }
      }
      return n;
    };
    const double s = std::sqrt(static_cast<double>(c.dim) / t.dim);
    auto norm = [&](const std::string& name) {  // RMSNorm weight: new entries 1, everything scaled by s
      torch::Tensor old = name.empty() ? torch::Tensor() : b.Merged(name, torch::kDouble);
      auto n = torch::ones({t.dim}, torch::kDouble);
      if (old.defined()) n.narrow(0, 0, c.dim).copy_(old.to(torch::kDouble));
      return n * s;
    };
    const int64_t D = t.dim, F = t.hidden_dim, KVD = (t.dim / t.n_heads) * t.n_kv_heads, V = t.vocab_size;
    impl->Add("tok_embeddings.weight", make({V, D}, false, b.Merged("tok_embeddings.weight", torch::kDouble)));
    for (int l = 0; l < t.n_layers; ++l) {
      const bool old = l < c.n_layers;
      const std::string p = absl::StrCat("layers.", l, ".");
      auto o = [&](const char* k) { return old ? b.Merged(p + k + ".weight", torch::kDouble) : torch::Tensor(); };
      impl->Add(p + "attention_norm.weight", norm(old ? p + "attention_norm.weight" : ""));
      impl->Add(p + "attention.wq.weight", make({D, D}, true, o("attention.wq")));
      impl->Add(p + "attention.wk.weight", make({KVD, D}, true, o("attention.wk")));
      impl->Add(p + "attention.wv.weight", make({KVD, D}, true, o("attention.wv")));
      impl->Add(p + "attention.wo.weight", make({D, D}, false, o("attention.wo")));
      impl->Add(p + "ffn_norm.weight", norm(old ? p + "ffn_norm.weight" : ""));
      impl->Add(p + "feed_forward.w1.weight", make({F, D}, true, o("feed_forward.w1")));
      impl->Add(p + "feed_forward.w2.weight", make({D, F}, false, o("feed_forward.w2")));
      impl->Add(p + "feed_forward.w3.weight", make({F, D}, true, o("feed_forward.w3")));
    }
    impl->Add("norm.weight", norm("norm.weight"));
    if (!t.tied_output) impl->Add("output.weight", make({V, D}, false, b.Merged("output.weight", torch::kDouble)));
    if (absl::Status st = impl->Complete(); !st.ok()) return st;
    return std::unique_ptr<GradientEngine>(new GradientEngine(std::move(impl)));
  });
}


}  // namespace rapidin::model
