// LibTorch lives in this file, model/token_grads.cc and model/internal/engine_impl.h.
#include "model/engine.h"

#include <dlfcn.h>
#include <torch/torch.h>

#include <atomic>
#include <cmath>
#include <cstdint>
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
#include "model/internal/engine_impl.h"

namespace rapidin::model {

void SetComputeThreads(int threads) {
  at::set_num_threads(threads < 1 ? 1 : threads);
  // OpenBLAS's own pool would oversubscribe the cores that rapidin's threads already use.
  using SetFn = void (*)(int);
  if (auto fn = reinterpret_cast<SetFn>(dlsym(RTLD_DEFAULT, "openblas_set_num_threads"))) fn(1);
}

thread_local const Leaves* tls_leaves = nullptr;

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
    if (off.size() != 2 || off[0] < 0 || off[1] > static_cast<int64_t>(data.size()) || off[1] - off[0] != n * width) {
      return absl::DataLossError(absl::StrCat(path, ": ", it.key(), " has inconsistent offsets"));
    }
    (*out)[it.key()] = torch::from_blob(data.data() + off[0], shape, type).to(torch::kFloat).clone();
  }
  return absl::OkStatus();
}

// Hugging Face Llama module path (inside a layer) -> our name.
const std::vector<std::pair<std::string, std::string>>& HfModules() {
  static const std::vector<std::pair<std::string, std::string>> k = {
      {"self_attn.q_proj", "attention.wq"}, {"self_attn.k_proj", "attention.wk"},
      {"self_attn.v_proj", "attention.wv"}, {"self_attn.o_proj", "attention.wo"},
      {"mlp.gate_proj", "feed_forward.w1"}, {"mlp.down_proj", "feed_forward.w2"},
      {"mlp.up_proj", "feed_forward.w3"}};
  return k;
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
    for (const auto& [hf, ours] : HfModules()) {
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
  if (found == 0) return absl::DataLossError("the adapter's target_modules match no Llama module");
  return absl::OkStatus();
}

absl::Status GradientEngine::Impl::Init(const EngineOptions& o) {
  options = o;
  dtype = o.use_double ? torch::kDouble : torch::kFloat;
  auto dev = ResolveDevice(o.device);
  if (!dev.ok()) return dev.status();
  device = *dev;
  // Float32 matrix products in full precision on the GPU too (no TF32), so that devices agree up to rounding.
  if (device.is_cuda()) at::globalContext().setFloat32MatmulPrecision("highest");
  return absl::OkStatus();
}

absl::Status GradientEngine::Impl::Complete() {
  if (!options.tokenizer_path.empty()) {
    auto t = Tokenizer::Load(options.tokenizer_path, cfg.vocab_size);
    if (!t.ok()) return t.status();
    tok = std::move(*t);
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
  uint64_t h = 1469598103934665603ull;
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
    h = Fnv(h, info.name.data(), info.name.size());
    h = Fnv(h, c.data_ptr<float>(), c.numel() * sizeof(float));
    precond.push_back((1.0 / (c.to(torch::kDouble).sqrt() + eps)).reshape({-1}).to(device));
  }
  h = Fnv(h, &eps, sizeof eps);
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
  try {
    const auto& j = *cj;
    c.dim = j.at("hidden_size").get<int>();
    c.hidden_dim = j.at("intermediate_size").get<int>();
    c.n_layers = j.at("num_hidden_layers").get<int>();
    c.n_heads = j.at("num_attention_heads").get<int>();
    c.n_kv_heads = j.value("num_key_value_heads", c.n_heads);
    c.vocab_size = j.at("vocab_size").get<int>();
    c.seq_len = j.value("max_position_embeddings", 2048);
    c.norm_eps = j.value("rms_norm_eps", 1e-6f);
    c.rope_theta = j.value("rope_theta", 10000.0f);
    c.tied_output = j.value("tie_word_embeddings", false);
    if (j.contains("rope_scaling") && !j["rope_scaling"].is_null()) {
      return absl::UnimplementedError("config.json: rope_scaling is not supported");
    }
  } catch (const std::exception& e) {
    return absl::DataLossError(absl::StrCat((dir / "config.json").string(), ": ", e.what()));
  }
  if (c.dim <= 0 || c.n_heads <= 0 || c.n_kv_heads <= 0 || c.dim % c.n_heads != 0 || c.n_heads % c.n_kv_heads != 0 ||
      c.n_layers <= 0 || c.vocab_size <= 0 || c.hidden_dim <= 0) {
    return absl::DataLossError("config.json: implausible model dimensions");
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
  const int64_t D = c.dim, F = c.hidden_dim, hd = D / c.n_heads, KVD = hd * c.n_kv_heads, V = c.vocab_size;
  auto take = [&](const std::string& hf, std::vector<int64_t> shape, const std::string& ours) -> absl::Status {
    auto it = t.find(hf);
    if (it == t.end()) return absl::DataLossError(absl::StrCat("weights lack ", hf));
    if (it->second.sizes().vec() != shape) {
      return absl::DataLossError(absl::StrCat(hf, " has shape ", c10::str(it->second.sizes()), ", expected ",
                                              c10::str(c10::IntArrayRef(shape))));
    }
    impl->Add(ours, it->second);
    return absl::OkStatus();
  };
  absl::Status st = take("model.embed_tokens.weight", {V, D}, "tok_embeddings.weight");
  const std::map<std::string, std::vector<int64_t>> shapes = {
      {"attention.wq", {D, D}}, {"attention.wk", {KVD, D}}, {"attention.wv", {KVD, D}}, {"attention.wo", {D, D}},
      {"feed_forward.w1", {F, D}}, {"feed_forward.w2", {D, F}}, {"feed_forward.w3", {F, D}}};
  for (int l = 0; l < c.n_layers && st.ok(); ++l) {
    const std::string hp = absl::StrCat("model.layers.", l, "."), p = absl::StrCat("layers.", l, ".");
    st = take(hp + "input_layernorm.weight", {D}, p + "attention_norm.weight");
    for (const auto& [hf, ours] : HfModules()) {
      if (st.ok()) st = take(hp + hf + ".weight", shapes.at(ours), p + ours + ".weight");
    }
    if (st.ok()) st = take(hp + "post_attention_layernorm.weight", {D}, p + "ffn_norm.weight");
  }
  if (st.ok()) st = take("model.norm.weight", {D}, "norm.weight");
  if (st.ok() && !c.tied_output) st = take("lm_head.weight", {V, D}, "output.weight");
  if (!st.ok()) return st;

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

const ModelConfig& GradientEngine::config() const { return impl_->cfg; }
std::string GradientEngine::device() const { return impl_->device.str(); }
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
  std::lock_guard<std::mutex> l(impl_->hash_mu);
  if (impl_->hash_stale) {
    impl_->Rehash();
    impl_->hash_stale = false;
  }
  return impl_->hash;
}
const Tokenizer* GradientEngine::tokenizer() const { return impl_->tok.get(); }

absl::StatusOr<TokenizedExample> GradientEngine::Tokenize(const Example& ex) const {
  if (!impl_->tok) return absl::FailedPreconditionError("no tokenizer loaded");
  const Encoding p = impl_->tok->Encode(AlpacaPrompt(ex.instruction, ex.input), /*dummy_prefix=*/true);
  const Encoding r = impl_->tok->Encode(ex.output, /*dummy_prefix=*/false);
  TokenizedExample t;
  t.ids.push_back(impl_->tok->bos());
  t.ids.insert(t.ids.end(), p.ids.begin(), p.ids.end());
  t.response_begin = static_cast<int32_t>(t.ids.size());
  t.ids.insert(t.ids.end(), r.ids.begin(), r.ids.end());
  t.ids.push_back(impl_->tok->eos());
  t.response_spans = r.spans;
  t.prompt_spans = p.spans;
  const int32_t len = static_cast<int32_t>(ex.output.size());
  t.response_spans.push_back({len, len});
  const int max_len = std::min(impl_->options.max_length, impl_->cfg.seq_len);
  if (static_cast<int>(t.ids.size()) > max_len) {
    if (t.response_begin >= max_len) {
      return absl::InvalidArgumentError(absl::StrCat("the prompt alone is ", t.response_begin,
                                                     " tokens; max_length is ", max_len));
    }
    t.ids.resize(max_len);
    t.response_spans.resize(max_len - t.response_begin);
    t.truncated = true;
  }
  if (!ex.hotwords.empty()) {
    t.loss_weights.assign(t.response_spans.size(), 0.0);
    for (const std::string& hw : ex.hotwords) {
      if (hw.empty()) return absl::InvalidArgumentError("empty hotword");
      bool found = false;
      for (size_t pos = ex.output.find(hw); pos != std::string::npos; pos = ex.output.find(hw, pos + 1)) {
        found = true;
        const int32_t b = static_cast<int32_t>(pos), e = static_cast<int32_t>(pos + hw.size());
        for (size_t i = 0; i < t.response_spans.size(); ++i) {
          const Span sp = t.response_spans[i];
          if (sp.begin < e && sp.end > b) t.loss_weights[i] = 1.0;
        }
      }
      if (!found) return absl::InvalidArgumentError(absl::StrCat("hotword \"", hw, "\" does not occur in the generation"));
    }
    double sum = 0;
    for (double w : t.loss_weights) sum += w;
    if (sum == 0) return absl::InvalidArgumentError("the hotwords fall outside the tokens kept after truncation");
  }
  return t;
}

absl::StatusOr<double> GradientEngine::MeanNll(const std::string& text, int64_t* tokens) const {
  return Guarded([&]() -> absl::StatusOr<double> {
    if (!impl_->tok) return absl::FailedPreconditionError("no tokenizer loaded");
    torch::NoGradGuard no_grad;
    Encoding e = impl_->tok->Encode(text, true);
    std::vector<int32_t> ids = {impl_->tok->bos()};
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
    const torch::Tensor rows = impl_->Rows(per, static_cast<int64_t>(batch.size()), normalize);
    FillInfos(batch, losses, infos);
    impl_->SyncDevice();
    return consume(rows.data_ptr<float>(), static_cast<int64_t>(batch.size()));
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

absl::Status GradientEngine::Perturb(int p, int64_t i, double delta) {
  return Guarded([&]() -> absl::Status {
    if (p < 0 || p >= static_cast<int>(impl_->selected.size()) || i < 0 || i >= impl_->infos[p].numel) {
      return absl::OutOfRangeError("no such parameter element");
    }
    torch::NoGradGuard no_grad;
    auto flat = impl_->selected[p].view({-1});
    flat[i] += delta;
    return absl::OkStatus();
  });
}


absl::Status GradientEngine::AddLora(const LoraConfig& lc) {
  return Guarded([&]() -> absl::Status {
    Impl& d = *impl_;
    if (!d.lora.empty()) return absl::FailedPreconditionError("a LoRA adapter is already attached");
    if (lc.rank < 1 || !(lc.alpha > 0) || lc.target_modules.empty()) {
      return absl::InvalidArgumentError("LoRA needs rank >= 1, alpha > 0 and at least one target module");
    }
    std::set<std::string> targets(lc.target_modules.begin(), lc.target_modules.end());
    std::set<std::string> known;
    for (const auto& [hf, ours] : HfModules()) known.insert(hf.substr(hf.find('.') + 1));
    for (const auto& t : targets) {
      if (!known.count(t)) return absl::InvalidArgumentError(absl::StrCat("unknown LoRA target module \"", t, "\""));
    }
    std::mt19937_64 rng(lc.seed);
    for (int l = 0; l < d.cfg.n_layers; ++l) {
      for (const auto& [hf, ours] : HfModules()) {
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

absl::StatusOr<double> GradientEngine::TrainStep(const std::vector<TokenizedExample>& batch,
                                                 const AdamWOptions& o) {
  return Guarded([&]() -> absl::StatusOr<double> {
    Impl& d = *impl_;
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
    std::lock_guard<std::mutex> l(d.hash_mu);
    d.hash_stale = true;
    return value;
  });
}

namespace {

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
  const std::string tmp = path + ".tmp";
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    out.write(reinterpret_cast<const char*>(&n), 8);
    out << h << data;
    if (!out.flush()) return absl::UnavailableError(absl::StrCat("cannot write ", tmp));
  }
  std::error_code ec;
  std::filesystem::rename(tmp, path, ec);  // a killed writer leaves the old file whole
  if (ec) return absl::UnavailableError(absl::StrCat("cannot rename ", tmp, ": ", ec.message()));
  return absl::OkStatus();
}

}  // namespace

absl::Status GradientEngine::SaveAdapter(const std::string& dir, const std::string& base_model) const {
  return Guarded([&]() -> absl::Status {
    const Impl& d = *impl_;
    if (d.lora.empty()) return absl::FailedPreconditionError("no LoRA adapter is attached");
    std::error_code ec;
    std::filesystem::create_directories(dir, ec);
    if (ec) return absl::UnavailableError(absl::StrCat("cannot create ", dir, ": ", ec.message()));
    std::vector<std::pair<std::string, torch::Tensor>> ts;
    for (int l = 0; l < d.cfg.n_layers; ++l) {
      for (const auto& [hf, ours] : HfModules()) {
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

absl::Status GradientEngine::SaveOptimizerState(const std::string& path, const AdamWOptions& o) const {
  return Guarded([&]() -> absl::Status {
    const Impl& d = *impl_;
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

absl::Status GradientEngine::SaveHf(const std::string& dir) const {
  return Guarded([&]() -> absl::Status {
    const Impl& d = *impl_;
    const ModelConfig& c = d.cfg;
    torch::NoGradGuard no_grad;
    std::error_code ec;
    std::filesystem::create_directories(dir, ec);
    if (ec) return absl::UnavailableError(absl::StrCat("cannot create ", dir, ": ", ec.message()));
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
    const std::string tmp = (std::filesystem::path(dir) / "config.json.tmp").string();
    {
      std::ofstream out(tmp, std::ios::trunc);
      out << cfg.dump(2) << "\n";
      if (!out.flush()) return absl::UnavailableError(absl::StrCat("cannot write ", tmp));
    }
    std::filesystem::rename(tmp, std::filesystem::path(dir) / "config.json", ec);
    if (ec) return absl::UnavailableError(absl::StrCat("cannot rename ", tmp, ": ", ec.message()));
    return absl::OkStatus();
  });
}

absl::Status GradientEngine::SaveLlama2c(const std::string& path) const {
  return Guarded([&]() -> absl::Status {
    const Impl& d = *impl_;
    if (!d.llama2c) return absl::UnimplementedError("SaveLlama2c: the base model was not a llama2.c checkpoint");
    const ModelConfig& c = d.cfg;
    torch::NoGradGuard no_grad;
    const std::string tmp = path + ".tmp";
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    const int32_t hdr[7] = {c.dim, c.hidden_dim, c.n_layers, c.n_heads, c.n_kv_heads,
                            c.tied_output ? c.vocab_size : -c.vocab_size, c.seq_len};
    out.write(reinterpret_cast<const char*>(hdr), sizeof hdr);
    auto put = [&](const torch::Tensor& t) {
      auto f = t.to(torch::kCPU, torch::kFloat).contiguous();
      out.write(reinterpret_cast<const char*>(f.data_ptr<float>()), f.numel() * sizeof(float));
    };
    put(d.Merged("tok_embeddings.weight"));
    for (const char* k : {"attention_norm", "attention.wq", "attention.wk", "attention.wv", "attention.wo", "ffn_norm",
                          "feed_forward.w1", "feed_forward.w2", "feed_forward.w3"}) {
      for (int l = 0; l < c.n_layers; ++l) put(d.Merged(absl::StrCat("layers.", l, ".", k, ".weight")));
    }
    put(d.Merged("norm.weight"));
    put(d.cos);  // freq_cis_real / imag, as llama2.c writes them
    put(d.sin);
    if (!c.tied_output) put(d.Merged("output.weight"));
    if (!out.flush()) return absl::UnavailableError(absl::StrCat("cannot write ", tmp));
    out.close();
    std::error_code ec;
    std::filesystem::rename(tmp, path, ec);
    if (ec) return absl::UnavailableError(absl::StrCat("cannot rename ", tmp, ": ", ec.message()));
    return absl::OkStatus();
  });
}

absl::StatusOr<std::string> GradientEngine::Generate(const std::string& instruction, const std::string& input,
                                                     int max_new) const {
  return Guarded([&]() -> absl::StatusOr<std::string> {
    const Impl& d = *impl_;
    if (!d.tok) return absl::FailedPreconditionError("no tokenizer loaded");
    const Encoding p = d.tok->Encode(AlpacaPrompt(instruction, input), /*dummy_prefix=*/true);
    std::vector<int32_t> ids = {d.tok->bos()};
    ids.insert(ids.end(), p.ids.begin(), p.ids.end());
    const size_t max_len = static_cast<size_t>(std::min(d.options.max_length, d.cfg.seq_len));
    if (ids.size() >= max_len) return absl::InvalidArgumentError("the prompt fills max_length");
    torch::NoGradGuard no_grad;
    std::string text;
    for (int i = 0; i < max_new && ids.size() < max_len; ++i) {
      auto logits = d.Forward(d.Ids(ids), nullptr, static_cast<int64_t>(ids.size()) - 1);
      const int32_t next = static_cast<int32_t>(logits[0][0].argmax().item<int64_t>());
      if (next == d.tok->eos()) break;
      ids.push_back(next);
      text += d.tok->Piece(next);
    }
    return text;
  });
}

std::vector<double> GradientEngine::SelectedValues() const {
  std::vector<double> out;
  out.reserve(impl_->dim);
  for (const auto& t : impl_->selected) {
    auto c = t.detach().to(torch::kCPU, torch::kDouble).contiguous();
    out.insert(out.end(), c.data_ptr<double>(), c.data_ptr<double>() + c.numel());
  }
  return out;
}

}  // namespace rapidin::model
