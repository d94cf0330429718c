// The architectures next to Llama against transformers itself: tests/fixtures/arch/<name> was written by
// scripts/make_hf_arch_fixtures.py (transformers 4.44.2, peft 0.12.0) with reference logits, losses, LoRA
// gradients and every base weight's gradient. Float32 must agree to 1e-4 (relative to the largest value).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <functional>
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>
#include <string>
#include <vector>

#include "model/engine.h"
#include "model/training.h"
#include "tests/test_util.h"
#include "tests/tiny_model.h"

namespace rapidin::model {
namespace {

const std::string kRoot = RAPIDIN_SOURCE_DIR "/tests/fixtures/arch/";

nlohmann::json Reference(const std::string& name) {
  std::ifstream in(kRoot + name + "/reference.json");
  return nlohmann::json::parse(in);
}

void Replace(std::string* s, const std::string& a, const std::string& b) {
  const size_t p = s->find(a);
  if (p != std::string::npos) s->replace(p, a.size(), b);
}

// Our parameter name -> transformers' (gemma2: the Gemma2 decoder layer's norm names).
std::string HfName(std::string s, bool gemma2) {
  const std::vector<std::pair<std::string, std::string>> m = {
      {"attention.wqkv", "self_attn.qkv_proj"}, {"feed_forward.w13", "mlp.gate_up_proj"},
      {"attention.wq", "self_attn.q_proj"},     {"attention.wk", "self_attn.k_proj"},
      {"attention.wv", "self_attn.v_proj"},     {"attention.wo", "self_attn.o_proj"},
      {"feed_forward.w1", "mlp.gate_proj"},     {"feed_forward.w2", "mlp.down_proj"},
      {"feed_forward.w3", "mlp.up_proj"},       {"attention_norm", "input_layernorm"},
      {"attention_post_norm", "post_attention_layernorm"},
      {"ffn_post_norm", "post_feedforward_layernorm"},
      {"ffn_norm", gemma2 ? "pre_feedforward_layernorm" : "post_attention_layernorm"}};
  if (s == "tok_embeddings.weight") return "model.embed_tokens.weight";
  if (s == "output.weight") return "lm_head.weight";
  if (s == "norm.weight") return "model.norm.weight";
  for (const auto& [a, b] : m) {
    if (s.find(a + ".") != std::string::npos) {
      Replace(&s, a + ".", b + ".");
      break;
    }
  }
  return "model." + s;
}

using rapidin::testing::RelErr;

class Arch : public ::testing::TestWithParam<std::string> {};

TEST_P(Arch, LogitsLossAndLoraGradientsMatchTransformers) {
  const std::string name = GetParam();
  const auto ref = Reference(name);
  EngineOptions o;
  o.model_path = kRoot + name;
  o.adapter_path = kRoot + name + "/adapter";
  auto e = GradientEngine::Load(o);
  ASSERT_TRUE(e.ok()) << e.status();
  const size_t targets = ref["lora_targets"].size();
  ASSERT_EQ((*e)->params().size(), 2u * targets * 2);  // 2 layers x targets x (A, B)
  for (const auto& rec : ref["records"]) {
    TokenizedExample t;
    t.ids = rec["ids"].get<std::vector<int32_t>>();
    t.response_begin = rec["response_begin"].get<int32_t>();
    auto logits = (*e)->LogitsIds(t.ids);
    ASSERT_TRUE(logits.ok()) << logits.status();
    const auto want_logits = rec["logits"].get<std::vector<double>>();
    ASSERT_EQ(logits->size(), want_logits.size());
    EXPECT_LT(RelErr(std::vector<double>(logits->begin(), logits->end()), want_logits), 1e-4) << t.ids.size();
    std::vector<double> g;
    auto info = (*e)->GradientIds(t, /*normalize=*/false, &g);
    ASSERT_TRUE(info.ok()) << info.status();
    const double want_loss = rec["loss"].get<double>();
    EXPECT_LT(std::fabs(info->loss - want_loss) / std::fabs(want_loss), 1e-4);
    for (const auto& p : (*e)->params()) {
      const std::string hf = "base_model.model." + HfName(p.name, name == "gemma2");
      ASSERT_TRUE(rec["lora_grads"].contains(hf)) << hf;
      const auto want = rec["lora_grads"][hf].get<std::vector<double>>();
      ASSERT_EQ(static_cast<int64_t>(want.size()), p.numel) << p.name;
      std::vector<double> got(g.begin() + p.offset, g.begin() + p.offset + p.numel);
      EXPECT_LT(RelErr(got, want), 1e-4) << p.name;
    }
    // The batched per-sample path (padding, captured linears) agrees with the loop.
    std::vector<std::vector<double>> gb;
    std::vector<GradInfo> ib;
    ASSERT_TRUE((*e)->GradientIdsBatch({t, t}, false, &gb, &ib).ok());
    EXPECT_LT(RelErr(gb[1], g), 1e-4);
  }
}

// Every base weight (norms and Qwen2's biases included) against transformers' autograd.
TEST_P(Arch, EveryBaseWeightGradientMatchesTransformers) {
  const std::string name = GetParam();
  const auto ref = Reference(name);
  EngineOptions o;
  o.model_path = kRoot + name;
  o.param_pattern = ".*";
  auto e = GradientEngine::Load(o);
  ASSERT_TRUE(e.ok()) << e.status();
  const auto& rec = ref["records"][0];
  TokenizedExample t;
  t.ids = rec["ids"].get<std::vector<int32_t>>();
  t.response_begin = rec["response_begin"].get<int32_t>();
  std::vector<double> g;
  ASSERT_TRUE((*e)->GradientIds(t, false, &g).ok());
  const auto& base = ref["base_grads"];
  ASSERT_EQ((*e)->params().size(), base.size());  // every transformers parameter, none extra
  for (const auto& p : (*e)->params()) {
    const std::string hf = HfName(p.name, name == "gemma2");
    ASSERT_TRUE(base.contains(hf)) << p.name << " -> " << hf;
    const auto want = base[hf].get<std::vector<double>>();
    ASSERT_EQ(static_cast<int64_t>(want.size()), p.numel) << p.name;
    EXPECT_LT(RelErr(std::vector<double>(g.begin() + p.offset, g.begin() + p.offset + p.numel), want), 1e-4)
        << p.name;
  }
}

// Per-token gradients: the default method (batched copies for these architectures) equals the
// one-backward-per-token reference in float64.
// (Qwen2 takes the hand-written backward unless a bias is selected; the others the batched copies.) Selections:
// the LoRA matrices, every weight matrix, every parameter.
TEST_P(Arch, TokenGradientsEqualTheLoop) {
  const std::string name = GetParam();
  for (const std::string sel : {"lora", "", ".*"}) {
    EngineOptions o;
    o.model_path = kRoot + name;
    if (sel == "lora") o.adapter_path = kRoot + name + "/adapter";
    else o.param_pattern = sel;
    o.use_double = true;
    auto e = GradientEngine::Load(o);
    ASSERT_TRUE(e.ok()) << e.status();
    const auto ids = Reference(name)["records"][0]["ids"].get<std::vector<int32_t>>();
    TokenGradOptions loop, fast;
    loop.method = TokenGradMethod::kLoop;
    fast.chunk = 4;
    std::vector<std::vector<double>> want, got;
    ASSERT_TRUE((*e)->TokenGradientsIds(ids, 1, loop, &want).ok());
    ASSERT_TRUE((*e)->TokenGradientsIds(ids, 1, fast, &got).ok());
    ASSERT_EQ(got.size(), want.size());
    for (size_t t = 0; t < want.size(); ++t) EXPECT_LT(RelErr(got[t], want[t]), 1e-9) << sel << " token " << t;
  }
}

// SaveHf writes the architecture back (its config as read, the adapter merged): reloaded, the logits are the
// adapted model's.
TEST_P(Arch, SaveHfRoundTrips) {
  const std::string name = GetParam();
  EngineOptions o;
  o.model_path = kRoot + name;
  o.adapter_path = kRoot + name + "/adapter";
  auto e = GradientEngine::Load(o);
  ASSERT_TRUE(e.ok()) << e.status();
  rapidin::testing::TempDir dir;
  ASSERT_TRUE(SaveHf(**e, dir.path()).ok());
  EngineOptions r;
  r.model_path = dir.path();
  auto back = GradientEngine::Load(r);
  ASSERT_TRUE(back.ok()) << back.status();
  const auto ids = Reference(name)["records"][1]["ids"].get<std::vector<int32_t>>();
  auto a = (*e)->LogitsIds(ids), b = (*back)->LogitsIds(ids);
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_LT(RelErr(std::vector<double>(b->begin(), b->end()), std::vector<double>(a->begin(), a->end())), 1e-5);
}

// Hugging Face rotary pairs (i, i + hd/2) through the direct float32 pass (llama3: head dimension 8, the AVX-512
// rotation for the 4 query heads, the portable one for the single KV head), per-token scores against the float64
// autograd engine's, to 1e-4 of the largest, on fresh random ids and u; with the AVX-512 kernels off too.
TEST(HuggingFaceArch, Float32DirectTokenScoresMatchFloat64) {
  SCOPED_TRACE(rapidin::testing::FuzzReplay());
  rapidin::testing::Avx512Switch avx;
  std::mt19937 rng(static_cast<uint32_t>(rapidin::testing::FuzzSeed() + 61));
  EngineOptions o;
  o.model_path = kRoot + "llama3";
  o.use_double = true;
  o.grad_path = "autograd";
  auto ref = GradientEngine::Load(o);
  o.use_double = false;
  o.grad_path = "direct";
  auto f32 = GradientEngine::Load(o);
  ASSERT_TRUE(ref.ok() && f32.ok()) << ref.status() << f32.status();
  ASSERT_EQ((*f32)->grad_path(), "direct");
  std::vector<int32_t> ids;
  for (int i = 0; i < 40; ++i) ids.push_back(static_cast<int32_t>(rng() % (*ref)->config().vocab_size));
  std::normal_distribution<double> g;
  std::vector<double> u((*ref)->grad_dim());
  for (auto& v : u) v = g(rng);
  TokenGradOptions to;
  to.chunk = 8;
  std::vector<double> want;
  ASSERT_TRUE((*ref)->TokenScores(ids, 2, to, u, &want).ok());
  double big = 0;
  for (double w : want) big = std::max(big, std::fabs(w));
  ASSERT_GT(big, 1e-6);
  for (bool avx512 : {true, false}) {
    avx.Set(avx512);
    std::vector<double> got;
    ASSERT_TRUE((*f32)->TokenScores(ids, 2, to, u, &got).ok());
    ASSERT_EQ(got.size(), want.size());
    for (size_t t = 0; t < want.size(); ++t) EXPECT_NEAR(got[t], want[t], 1e-4 * big) << "avx512 " << avx512 << " token " << t + 2;
  }
}

INSTANTIATE_TEST_SUITE_P(HuggingFace, Arch,
                         ::testing::Values("qwen2", "qwen2_untied", "mistral", "llama3", "gemma", "gemma2", "phi3"));

// Copies a fixture's model files (config.json, model.safetensors) into dir and applies `edit` to its config.
void CopyWithConfig(const std::string& name, const std::string& dir, const std::function<void(nlohmann::json*)>& edit) {
  namespace fs = std::filesystem;
  fs::copy_file(kRoot + name + "/model.safetensors", dir + "/model.safetensors", fs::copy_options::overwrite_existing);
  std::ifstream in(kRoot + name + "/config.json");
  auto j = nlohmann::json::parse(in);
  edit(&j);
  std::ofstream(dir + "/config.json") << j.dump();
}

absl::Status LoadDir(const std::string& dir) {
  EngineOptions o;
  o.model_path = dir;
  return GradientEngine::Load(o).status();
}

TEST(HuggingFaceArch, UnknownArchitecturesFieldsAndDamagedFilesAreRefusedByName) {
  rapidin::testing::TempDir dir;
  CopyWithConfig("qwen2", dir.path(), [](nlohmann::json* j) { (*j)["architectures"] = {"FalconForCausalLM"}; });
  absl::Status st = LoadDir(dir.path());
  EXPECT_EQ(st.code(), absl::StatusCode::kUnimplemented);
  EXPECT_NE(st.message().find("FalconForCausalLM"), std::string::npos) << st;
  // A field this loader does not implement, never ignored.
  CopyWithConfig("mistral", dir.path(), [](nlohmann::json* j) { (*j)["partial_rotary_factor"] = 0.5; });
  st = LoadDir(dir.path());
  EXPECT_EQ(st.code(), absl::StatusCode::kUnimplemented);
  EXPECT_NE(st.message().find("partial_rotary_factor"), std::string::npos) << st;
  // Options that change the function and are not implemented for the architecture.
  CopyWithConfig("qwen2", dir.path(), [](nlohmann::json* j) { (*j)["use_sliding_window"] = true; });
  st = LoadDir(dir.path());
  EXPECT_NE(st.message().find("use_sliding_window"), std::string::npos) << st;
  CopyWithConfig("phi3", dir.path(), [](nlohmann::json* j) {
    (*j)["rope_scaling"] = {{"type", "longrope"}, {"short_factor", {1.0}}, {"long_factor", {1.0}}};
  });
  st = LoadDir(dir.path());
  EXPECT_EQ(st.code(), absl::StatusCode::kUnimplemented);
  EXPECT_NE(st.message().find("rope_scaling"), std::string::npos) << st;
  CopyWithConfig("llama3", dir.path(), [](nlohmann::json* j) { (*j)["rope_scaling"]["rope_type"] = "yarn"; });
  st = LoadDir(dir.path());
  EXPECT_NE(st.message().find("rope_scaling"), std::string::npos) << st;
  CopyWithConfig("gemma", dir.path(), [](nlohmann::json* j) { (*j)["hidden_activation"] = "relu"; });
  st = LoadDir(dir.path());
  EXPECT_NE(st.message().find("hidden_activation"), std::string::npos) << st;
  // Qwen2 without its biases: the weights do not match the architecture.
  CopyWithConfig("mistral", dir.path(), [](nlohmann::json* j) {
    (*j)["architectures"] = {"Qwen2ForCausalLM"};
    j->erase("sliding_window");
    j->erase("head_dim");
  });
  st = LoadDir(dir.path());
  EXPECT_EQ(st.code(), absl::StatusCode::kDataLoss);
  EXPECT_NE(st.message().find("bias"), std::string::npos) << st;
  // A truncated safetensors file.
  CopyWithConfig("gemma2", dir.path(), [](nlohmann::json*) {});
  std::filesystem::resize_file(dir.path("model.safetensors"), std::filesystem::file_size(dir.path("model.safetensors")) - 100);
  st = LoadDir(dir.path());
  EXPECT_EQ(st.code(), absl::StatusCode::kDataLoss);
  EXPECT_NE(st.message().find("truncated"), std::string::npos) << st;
}

// The chat demo's model (tests/fixtures/qwen2_chat): a Qwen2 with a byte-level tokenizer.json and a ChatML
// chat_template. Chats tokenize to transformers' apply_chat_template ids; the loss covers the assistant turns.
class ChatRecords : public ::testing::Test {
 protected:
  static std::string Dir() { return RAPIDIN_SOURCE_DIR "/tests/fixtures/qwen2_chat"; }
  static nlohmann::json Ref() {
    std::ifstream in(Dir() + "/reference.json");
    return nlohmann::json::parse(in);
  }
  static EngineOptions Options() {
    EngineOptions o;
    o.model_path = Dir();
    o.tokenizer_path = Dir() + "/tokenizer.json";
    return o;
  }
  static Example Chat(const nlohmann::json& msgs) {
    Example ex;
    ex.format = RecordFormat::kChat;
    for (const auto& m : msgs) ex.messages.push_back({m["role"].get<std::string>(), m["content"].get<std::string>()});
    return ex;
  }
};

TEST_F(ChatRecords, IdsLogitsAndLossMaskMatchTransformers) {
  auto e = GradientEngine::Load(Options());
  ASSERT_TRUE(e.ok()) << e.status();
  EXPECT_EQ((*e)->chat_template(), "chatml");
  EXPECT_EQ((*e)->tokenizer()->bos(), -1);  // Qwen2: no BOS
  const auto ref = Ref();  // not Ref()["chats"] in the loop header: the temporary would die before the body
  for (const auto& c : ref["chats"]) {
    const Example ex = Chat(c["messages"]);
    auto t = (*e)->Tokenize(ex);
    ASSERT_TRUE(t.ok()) << t.status();
    EXPECT_EQ(t->ids, c["ids"].get<std::vector<int32_t>>());
    auto logits = (*e)->LogitsIds(t->ids);
    ASSERT_TRUE(logits.ok());
    const auto want = c["logits_last"].get<std::vector<double>>();
    std::vector<double> last(logits->end() - want.size(), logits->end());
    EXPECT_LT(RelErr(last, want), 1e-4);
    // The trained tokens spell the assistant turns, each with its <|im_end|>; every message token's place gives
    // back its bytes.
    std::string trained, want_trained;
    for (size_t i = t->response_begin; i < t->ids.size(); ++i) {
      const bool on = t->loss_weights.empty() || t->loss_weights[i - t->response_begin] > 0;
      if (on) trained += (*e)->tokenizer()->Piece(t->ids[i]);
    }
    for (const auto& m : ex.messages) {
      if (m.role == "assistant") want_trained += m.content + "<|im_end|>";
    }
    EXPECT_EQ(trained, want_trained);
    int placed = 0;
    for (size_t i = 0; i < t->ids.size(); ++i) {
      const TokenPlace& pl = t->places[i];
      if (pl.field.rfind("messages[", 0) != 0) continue;
      const int m = std::stoi(pl.field.substr(9));
      EXPECT_EQ(ex.messages[m].content.substr(pl.span.begin, pl.span.end - pl.span.begin),
                (*e)->tokenizer()->Piece(t->ids[i]));
      ++placed;
    }
    EXPECT_GT(placed, 5);
    // A query explains the last assistant turn only.
    Example q = ex;
    q.last_turn_only = true;
    auto tq = (*e)->Tokenize(q);
    ASSERT_TRUE(tq.ok());
    std::string qtrained;
    for (size_t i = tq->response_begin; i < tq->ids.size(); ++i) {
      if (tq->loss_weights.empty() || tq->loss_weights[i - tq->response_begin] > 0) {
        qtrained += (*e)->tokenizer()->Piece(tq->ids[i]);
      }
    }
    EXPECT_EQ(qtrained, ex.messages.back().content + "<|im_end|>");
    // Gradients: the batched path equals the loop on a record with a loss mask.
    std::vector<double> g;
    ASSERT_TRUE((*e)->GradientIds(*t, false, &g).ok());
    std::vector<std::vector<double>> gb;
    std::vector<GradInfo> ib;
    ASSERT_TRUE((*e)->GradientIdsBatch({*t, *tq}, false, &gb, &ib).ok());
    EXPECT_LT(RelErr(gb[0], g), 1e-4);
  }
}

TEST_F(ChatRecords, TextRecordsTrainOnEveryToken) {
  auto e = GradientEngine::Load(Options());
  ASSERT_TRUE(e.ok()) << e.status();
  Example ex;
  ex.format = RecordFormat::kText;
  ex.text = "The store is written in batches. Caf\u00e9!";
  auto t = (*e)->Tokenize(ex);
  ASSERT_TRUE(t.ok()) << t.status();
  EXPECT_EQ(t->response_begin, 1);
  EXPECT_TRUE(t->loss_weights.empty());
  std::string all;
  for (size_t i = 0; i < t->ids.size(); ++i) {
    if (t->places[i].field == "text" && t->places[i].span.end > t->places[i].span.begin) {
      EXPECT_EQ(ex.text.substr(t->places[i].span.begin, t->places[i].span.end - t->places[i].span.begin),
                (*e)->tokenizer()->Piece(t->ids[i]));
      all += (*e)->tokenizer()->Piece(t->ids[i]);
    }
  }
  EXPECT_EQ(all, ex.text);
  EXPECT_EQ(t->ids.back(), (*e)->tokenizer()->eos());
  ex.text = "";
  EXPECT_EQ((*e)->Tokenize(ex).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST_F(ChatRecords, BadChatsAndMissingTemplatesGetClearErrors) {
  auto e = GradientEngine::Load(Options());
  ASSERT_TRUE(e.ok()) << e.status();
  Example ex;
  ex.format = RecordFormat::kChat;
  ex.messages = {{"user", "hello"}};
  auto t = (*e)->Tokenize(ex);
  EXPECT_EQ(t.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(t.status().message().find("assistant turn"), std::string::npos) << t.status();
  ex.messages = {{"user", "hello"}, {"robot", "beep"}, {"assistant", "hi"}};
  t = (*e)->Tokenize(ex);
  EXPECT_NE(t.status().message().find("robot"), std::string::npos) << t.status();
  // A tokenizer_config.json without a chat_template, or with one no family matches.
  rapidin::testing::TempDir dir;
  namespace fs = std::filesystem;
  for (const char* f : {"config.json", "model.safetensors", "tokenizer.json"}) fs::copy_file(Dir() + "/" + f, dir.path(f));
  std::ofstream(dir.path("tokenizer_config.json")) << R"({"eos_token": "<|im_end|>"})";
  EngineOptions o = Options();
  o.model_path = dir.path();
  o.tokenizer_path = dir.path("tokenizer.json");
  auto bare = GradientEngine::Load(o);
  ASSERT_TRUE(bare.ok()) << bare.status();  // Alpaca and text records need no template
  ex.messages = {{"user", "hello"}, {"assistant", "hi"}};
  t = (*bare)->Tokenize(ex);
  EXPECT_EQ(t.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(t.status().message().find("--template"), std::string::npos) << t.status();
  std::ofstream(dir.path("tokenizer_config.json"))
      << R"({"eos_token": "<|im_end|>", "chat_template": "{% for m in messages %}<<{{ m.role }}>> {{ m.content }}{% endfor %}"})";
  auto odd = GradientEngine::Load(o);
  ASSERT_TRUE(odd.ok()) << odd.status();
  t = (*odd)->Tokenize(ex);
  EXPECT_EQ(t.status().code(), absl::StatusCode::kUnimplemented);
  EXPECT_NE(t.status().message().find("not recognised"), std::string::npos) << t.status();
  // --template names a family: the built-in ChatML has no default system message, the recognised Qwen2
  // template inserts one, so the named template's tokens are the recognised one's after that system turn.
  o.chat_template = "chatml";
  auto named = GradientEngine::Load(o);
  ASSERT_TRUE(named.ok()) << named.status();
  auto t1 = (*named)->Tokenize(ex);
  auto t2 = (*e)->Tokenize(ex);
  ASSERT_TRUE(t1.ok() && t2.ok());
  ASSERT_LT(t1->ids.size(), t2->ids.size());
  EXPECT_TRUE(std::equal(t1->ids.begin(), t1->ids.end(), t2->ids.end() - t1->ids.size()));
  EXPECT_NE((*named)->model_hash(), (*e)->model_hash());  // another template: another projection state
  o.chat_template = "no-such-family";
  EXPECT_EQ(GradientEngine::Load(o).status().code(), absl::StatusCode::kNotFound);
}

}  // namespace
}  // namespace rapidin::model
