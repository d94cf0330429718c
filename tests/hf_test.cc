// Hugging Face loader + PEFT LoRA against Hugging Face itself: tests/fixtures/hf_tiny was written by
// scripts/make_hf_fixture.py (transformers 4.36.2, peft 0.7.1) with reference logits, losses and LoRA gradients.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <random>
#include <filesystem>
#include <fstream>
#include <tuple>
#include <chrono>
#include <nlohmann/json.hpp>

#include "model/engine.h"
#include "model/featurizer.h"
#include "model/training.h"
#include "tests/test_util.h"

namespace rapidin::model {
namespace {

const std::string kDir = RAPIDIN_SOURCE_DIR "/tests/fixtures/hf_tiny";

nlohmann::json Reference() {
  std::ifstream in(kDir + "/reference.json");
  return nlohmann::json::parse(in);
}

// "layers.0.attention.wq.lora_A.weight" -> "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
std::string HfName(const std::string& ours) {
  static const std::vector<std::pair<std::string, std::string>> m = {
      {"attention.wq", "self_attn.q_proj"}, {"attention.wk", "self_attn.k_proj"}, {"attention.wv", "self_attn.v_proj"},
      {"attention.wo", "self_attn.o_proj"}, {"feed_forward.w1", "mlp.gate_proj"}, {"feed_forward.w2", "mlp.down_proj"},
      {"feed_forward.w3", "mlp.up_proj"}};
  std::string s = ours;
  for (const auto& [a, b] : m) {
    const size_t p = s.find(a);
    if (p != std::string::npos) s.replace(p, a.size(), b);
  }
  return "base_model.model.model." + s;
}

using rapidin::testing::RelErr;

TEST(HuggingFace, LogitsLossAndLoraGradientsMatchTransformers) {
  EngineOptions o;
  o.model_path = kDir;  // sharded: model.safetensors.index.json + 3 shards
  o.adapter_path = kDir + "/adapter";
  auto e = GradientEngine::Load(o);
  ASSERT_TRUE(e.ok()) << e.status();
  ASSERT_EQ((*e)->params().size(), 2u * 3 * 2);  // 2 layers x (q, v, down) x (A, B)
  const auto ref = Reference();
  for (const auto& rec : ref["records"]) {
    TokenizedExample t;
    t.ids = rec["ids"].get<std::vector<int32_t>>();
    t.response_begin = rec["response_begin"].get<int32_t>();
    auto logits = (*e)->LogitsIds(t.ids);
    ASSERT_TRUE(logits.ok());
    const auto want_logits = rec["logits"].get<std::vector<double>>();
    ASSERT_EQ(logits->size(), want_logits.size());
    EXPECT_LT(RelErr(std::vector<double>(logits->begin(), logits->end()), want_logits), 1e-4);
    std::vector<double> g;
    auto info = (*e)->GradientIds(t, /*normalize=*/false, &g);
    ASSERT_TRUE(info.ok()) << info.status();
    const double want_loss = rec["loss"].get<double>();
    EXPECT_LT(std::fabs(info->loss - want_loss) / std::fabs(want_loss), 1e-4);
    for (const auto& p : (*e)->params()) {
      const auto want = rec["lora_grads"].at(HfName(p.name)).get<std::vector<double>>();
      ASSERT_EQ(static_cast<int64_t>(want.size()), p.numel) << p.name;
      std::vector<double> got(g.begin() + p.offset, g.begin() + p.offset + p.numel);
      EXPECT_LT(RelErr(got, want), 1e-4) << p.name;
    }
    // The batched per-sample path agrees with the loop for LoRA too.
    std::vector<std::vector<double>> gb;
    std::vector<GradInfo> ib;
    ASSERT_TRUE((*e)->GradientIdsBatch({t, t}, false, &gb, &ib).ok());
    EXPECT_LT(RelErr(gb[1], g), 1e-4);
  }
}

// Per-token gradients on the Hugging Face layout (rotate-half RoPE, GQA, untied head) with the fixture's PEFT
// adapter, in float64: the shared-forward method equals the one-backward-per-token reference, for the LoRA
// matrices and for every parameter.
TEST(HuggingFace, TokenGradientsSharedEqualsLoop) {
  for (const std::string pattern : {"", ".*"}) {
    EngineOptions o;
    o.model_path = kDir;
    o.adapter_path = kDir + "/adapter";
    o.use_double = true;
    o.param_pattern = pattern;
    auto e = GradientEngine::Load(o);
    ASSERT_TRUE(e.ok()) << e.status();
    const auto ids = Reference()["records"][0]["ids"].get<std::vector<int32_t>>();
    for (bool normalize : {false, true}) {
      TokenGradOptions loop, shared;
      loop.method = TokenGradMethod::kLoop;
      loop.normalize = shared.normalize = normalize;
      shared.chunk = 3;
      std::vector<std::vector<double>> want, got;
      ASSERT_TRUE((*e)->TokenGradientsIds(ids, 1, loop, &want).ok());
      ASSERT_TRUE((*e)->TokenGradientsIds(ids, 1, shared, &got).ok());
      ASSERT_EQ(got.size(), ids.size() - 1);
      for (size_t t = 0; t < want.size(); ++t) {
        EXPECT_LT(RelErr(got[t], want[t]), 1e-9) << "pattern '" << pattern << "' token " << t;
      }
    }
  }
}

TEST(HuggingFace, BaseModelAndClearErrors) {
  EngineOptions o;
  o.model_path = kDir;
  auto base = GradientEngine::Load(o);
  ASSERT_TRUE(base.ok()) << base.status();
  EXPECT_EQ((*base)->params().size(), 1u + 2 * 7 + 1);  // embed, 7 matrices per layer, lm_head
  o.adapter_path = kDir + "/adapter";
  auto with = GradientEngine::Load(o);
  ASSERT_TRUE(with.ok());
  EXPECT_NE((*base)->model_hash(), (*with)->model_hash());
  rapidin::testing::TempDir dir;
  o.model_path = dir.path();
  o.adapter_path = "";
  EXPECT_EQ(GradientEngine::Load(o).status().code(), absl::StatusCode::kNotFound);  // no config.json
  std::ofstream(dir.path("config.json")) << "{ not json";
  EXPECT_EQ(GradientEngine::Load(o).status().code(), absl::StatusCode::kDataLoss);
  std::ofstream(dir.path("config.json")) << R"({"hidden_size": 16, "intermediate_size": 24, "num_hidden_layers": 2,
      "num_attention_heads": 4, "vocab_size": 320})";
  EXPECT_EQ(GradientEngine::Load(o).status().code(), absl::StatusCode::kNotFound);  // no weights
  std::ofstream(dir.path("model.safetensors")) << "garbage";
  EXPECT_EQ(GradientEngine::Load(o).status().code(), absl::StatusCode::kDataLoss);
  o.model_path = kDir;
  o.adapter_path = dir.path("no_adapter");
  EXPECT_EQ(GradientEngine::Load(o).status().code(), absl::StatusCode::kNotFound);
  o.adapter_path = "";
  o.tokenizer_path = dir.path("config.json");  // not a tokenizer
  EXPECT_FALSE(GradientEngine::Load(o).ok());
  // Integer fields must fit an int (no silent wrap), the context must be one the rotary tables can hold; a whole
  // number written as a float is still that number.
  rapidin::testing::TempDir cp;
  for (const char* name : {"config.json", "model.safetensors.index.json", "model-00001-of-00003.safetensors",
                           "model-00002-of-00003.safetensors", "model-00003-of-00003.safetensors"}) {
    std::filesystem::copy_file(kDir + "/" + name, cp.path(name));
  }
  const nlohmann::json good = nlohmann::json::parse(std::ifstream(kDir + "/config.json"));
  o = EngineOptions();
  o.model_path = cp.path();
  for (const auto& [key, value, ok] : std::vector<std::tuple<std::string, nlohmann::json, bool>>{
           {"max_position_embeddings", 66666666666664, false}, {"max_position_embeddings", 1 << 23, false},
           {"max_position_embeddings", -64, false},            {"max_position_embeddings", 64.5, false},
           {"max_position_embeddings", 18446744073709551610u, false}, {"hidden_size", 4294967312, false},
           {"max_position_embeddings", 64.0, true},            {"max_position_embeddings", 1e30, false}}) {
    nlohmann::json c = good;
    c[key] = value;
    std::ofstream(cp.path("config.json")) << c.dump();
    const auto t0 = std::chrono::steady_clock::now();
    auto e = GradientEngine::Load(o);
    EXPECT_LT(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(), 5.0) << key << " " << value;
    if (ok) {
      EXPECT_TRUE(e.ok()) << key << " " << value << ": " << e.status();
      continue;
    }
    EXPECT_EQ(e.status().code(), absl::StatusCode::kDataLoss) << key << " " << value << ": " << e.status();
    EXPECT_NE(e.status().message().find(key), std::string::npos) << e.status();
  }
}

// What the loader does not implement is refused by name, never approximated by the Llama forward: another
// architecture, a Llama option that changes the function, a weight the forward would not use, a truncated file.
TEST(HuggingFace, UnsupportedArchitecturesOptionsAndWeightsAreRefusedByName) {
  namespace fs = std::filesystem;
  rapidin::testing::TempDir dir;
  const std::string copy = dir.path("model");
  fs::copy(kDir, copy, fs::copy_options::recursive);
  EngineOptions o;
  o.model_path = copy;
  ASSERT_TRUE(GradientEngine::Load(o).ok());  // the copy loads as it is
  nlohmann::json base;
  std::ifstream(kDir + "/config.json") >> base;
  auto refused_with = [&](const nlohmann::json& cfg, const std::string& words) {
    std::ofstream(copy + "/config.json") << cfg.dump();
    const absl::Status st = GradientEngine::Load(o).status();
    EXPECT_EQ(st.code(), absl::StatusCode::kUnimplemented) << st;
    EXPECT_NE(st.message().find(words), std::string::npos) << st;
  };
  nlohmann::json c = base;
  c["architectures"] = {"FalconForCausalLM"};
  refused_with(c, "FalconForCausalLM");
  c = base;
  c.erase("architectures");
  c["model_type"] = "falcon";
  refused_with(c, "falcon");
  c = base;
  c["attention_bias"] = true;
  refused_with(c, "attention_bias");
  c = base;
  c["hidden_act"] = "gelu_pytorch_tanh";
  refused_with(c, "gelu_pytorch_tanh");
  c = base;
  c["rope_scaling"] = {{"rope_type", "dynamic"}, {"factor", 8.0}};
  refused_with(c, "dynamic");
  c = base;
  c["partial_rotary_factor"] = 0.5;  // a field the loader does not know
  refused_with(c, "partial_rotary_factor");
  std::ofstream(copy + "/config.json") << base.dump();

  // A q_proj bias in an extra shard (as a Qwen2 checkpoint has): named, not ignored.
  const std::string name = "model.layers.0.self_attn.q_proj.bias";
  const std::string header = nlohmann::json{{name, {{"dtype", "F32"}, {"shape", {16}}, {"data_offsets", {0, 64}}}}}.dump();
  {
    std::ofstream f(copy + "/extra.safetensors", std::ios::binary);
    const uint64_t n = header.size();
    f.write(reinterpret_cast<const char*>(&n), 8);
    f << header << std::string(64, '\0');
  }
  nlohmann::json index;
  std::ifstream(kDir + "/model.safetensors.index.json") >> index;
  index["weight_map"][name] = "extra.safetensors";
  std::ofstream(copy + "/model.safetensors.index.json") << index.dump();
  absl::Status st = GradientEngine::Load(o).status();
  EXPECT_EQ(st.code(), absl::StatusCode::kUnimplemented) << st;
  EXPECT_NE(st.message().find(name), std::string::npos) << st;

  // A truncated shard: DATA_LOSS naming the file.
  fs::copy_file(kDir + "/model.safetensors.index.json", copy + "/model.safetensors.index.json",
                fs::copy_options::overwrite_existing);
  const std::string shard = copy + "/model-00002-of-00003.safetensors";
  fs::resize_file(shard, fs::file_size(shard) - 100);
  st = GradientEngine::Load(o).status();
  EXPECT_EQ(st.code(), absl::StatusCode::kDataLoss) << st;
  EXPECT_NE(st.message().find("model-00002-of-00003.safetensors"), std::string::npos) << st;
}

// A Hugging Face directory brings its tokenizer.model: a featurizer needs no --tokenizer for it, and one without any
// tokenizer is refused when it is made (not record by record).
TEST(HuggingFace, FeaturizerFindsTheDirectorysTokenizer) {
  FeaturizerOptions fo;
  fo.engine.model_path = kDir;
  fo.k = 64;
  auto f = Featurizer::Create(fo);
  ASSERT_TRUE(f.ok()) << f.status();
  ASSERT_NE((*f)->engine().tokenizer(), nullptr);
  std::vector<float> v;
  auto info = (*f)->Compress({"Hi.", "", "Hello there.", {}}, &v);
  // The fixture's context (64 tokens) is shorter than the Alpaca prompt: refused by length, not for a tokenizer.
  EXPECT_EQ(info.status().code(), absl::StatusCode::kInvalidArgument) << info.status();
  EXPECT_NE(info.status().message().find("max_length"), std::string::npos) << info.status();

  rapidin::testing::TempDir dir;
  for (const char* name : {"config.json", "model.safetensors.index.json", "model-00001-of-00003.safetensors",
                           "model-00002-of-00003.safetensors", "model-00003-of-00003.safetensors"}) {
    std::filesystem::copy_file(kDir + "/" + name, dir.path(name));
  }
  fo.engine.model_path = dir.path();
  auto none = Featurizer::Create(fo);
  EXPECT_EQ(none.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(none.status().message().find("no tokenizer"), std::string::npos) << none.status();
}

// The SentencePiece BPE tokenizer gives the ids and byte offsets that the sentencepiece Python package gave.
TEST(HuggingFace, SentencePieceMatchesReference) {
  auto tok = Tokenizer::Load(kDir + "/tokenizer.model", 320);
  ASSERT_TRUE(tok.ok()) << tok.status();
  EXPECT_EQ((*tok)->bos(), 1);
  EXPECT_EQ((*tok)->eos(), 2);
  auto same = [&](const nlohmann::json& r) {  // r: text, ids, begin, end as the package gave them
    const std::string text = r["text"].get<std::string>();
    const Encoding e = (*tok)->Encode(text, true);
    ASSERT_EQ(e.ids, r["ids"].get<std::vector<int32_t>>()) << text;
    const auto b = r["begin"].get<std::vector<int32_t>>(), en = r["end"].get<std::vector<int32_t>>();
    ASSERT_EQ(e.spans.size(), b.size()) << text;
    for (size_t i = 0; i < b.size(); ++i) {
      EXPECT_EQ(e.spans[i].begin, b[i]) << text << " piece " << i;
      EXPECT_EQ(e.spans[i].end, en[i]) << text << " piece " << i;
    }
  };
  const nlohmann::json ref = Reference();  // a range-for over Reference()["tokenizer"] would dangle
  for (const auto& r : ref["tokenizer"]) same(r);
  // Varied texts (scripts/make_sentencepiece_reference.py): repeated and leading spaces, tabs, newlines, control and
  // zero-width characters (rewritten by the model's nmt_nfkc map), characters outside the vocabulary, long texts
  // with hundreds of merges.
  std::ifstream in(kDir + "/sentencepiece_texts.json");
  const nlohmann::json many = nlohmann::json::parse(in);
  ASSERT_GE(many.size(), 100u);
  for (const auto& r : many) same(r);
  // Byte strings: malformed UTF-8 (each bad byte becomes U+FFFD), NUL bytes, whitespace only, the empty string.
  std::ifstream bin(kDir + "/sentencepiece_bytes.json");
  const nlohmann::json bytes = nlohmann::json::parse(bin);
  ASSERT_GE(bytes.size(), 10u);
  for (nlohmann::json r : bytes) {
    const std::string hex = r["hex"].get<std::string>();
    std::string text;
    for (size_t i = 0; i + 1 < hex.size(); i += 2) text.push_back(static_cast<char>(std::stoi(hex.substr(i, 2), nullptr, 16)));
    r["text"] = text;  // nlohmann keeps the bytes as they are
    SCOPED_TRACE(hex);
    same(r);
  }
  EXPECT_EQ(Tokenizer::Load(kDir + "/tokenizer.model", 321).status().code(), absl::StatusCode::kInvalidArgument);
  // The whole HF directory with its tokenizer. Its 64-position context cannot hold the Alpaca prompt: a clear error.
  EngineOptions o;
  o.model_path = kDir;
  o.adapter_path = kDir + "/adapter";
  o.tokenizer_path = kDir + "/tokenizer.model";
  auto e = GradientEngine::Load(o);
  ASSERT_TRUE(e.ok()) << e.status();
  std::vector<float> g;
  auto info = (*e)->Gradient({"Give three tips for staying healthy.", "", "Eat well."}, true, &g);
  EXPECT_EQ(info.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(info.status().message().find("the prompt alone is"), std::string::npos) << info.status();
}

}  // namespace
}  // namespace rapidin::model

namespace rapidin::model {
namespace {

// SaveHf (rapidin export-hf): a llama2.c-layout model, with a LoRA adapter merged in, written as a Hugging Face
// directory, reads back through the Hugging Face loader (rotate-half RoPE, renamed tensors) with the same logits,
// on random weights and tokens, tied and untied; exporting the re-loaded model again changes nothing.
TEST(HuggingFaceExport, RoundTripGivesEqualLogits) {
  SCOPED_TRACE(rapidin::testing::FuzzReplay());
  for (bool tied : {true, false}) {
    ModelConfig c;
    c.dim = 16;
    c.hidden_dim = 24;
    c.n_layers = 2;
    c.n_heads = 4;
    c.n_kv_heads = 2;
    c.vocab_size = 13;
    c.seq_len = 20;
    c.tied_output = tied;
    EngineOptions o;
    const uint32_t seed = static_cast<uint32_t>(rapidin::testing::FuzzSeed() + 51);
    auto e = GradientEngine::Random(c, seed, o);
    ASSERT_TRUE(e.ok());
    LoraConfig lc;
    lc.rank = 2;
    ASSERT_TRUE(model::AddLora(e->get(), lc).ok());
    // Move the adapter off B = 0 so that the merge matters.
    std::mt19937 rng(seed);
    std::vector<TokenizedExample> batch(3);
    for (auto& t : batch) {
      for (int i = 0; i < 12; ++i) t.ids.push_back(static_cast<int32_t>(rng() % 13));
      t.response_begin = 4;
    }
    AdamWOptions adam;
    adam.lr = 1e-2;
    for (int s = 0; s < 5; ++s) ASSERT_TRUE(model::TrainStep(e->get(), batch, adam).ok());
    rapidin::testing::TempDir dir;
    ASSERT_TRUE(model::SaveHf(**e, dir.path("hf")).ok());
    EngineOptions ho;
    ho.model_path = dir.path("hf");
    auto h = GradientEngine::Load(ho);
    ASSERT_TRUE(h.ok()) << h.status();
    EXPECT_EQ((*h)->config().tied_output, tied);
    const auto& ids = batch[0].ids;
    auto a = (*e)->LogitsIds(ids), b = (*h)->LogitsIds(ids);
    ASSERT_TRUE(a.ok() && b.ok());
    ASSERT_EQ(a->size(), b->size());
    double max_abs = 0, scale = 0;
    for (size_t i = 0; i < a->size(); ++i) {
      max_abs = std::max(max_abs, std::fabs(static_cast<double>((*a)[i]) - (*b)[i]));
      scale = std::max(scale, std::fabs(static_cast<double>((*a)[i])));
    }
    EXPECT_GT(scale, 0.1);
    EXPECT_LT(max_abs, 1e-4 * scale) << (tied ? "tied" : "untied");
    ASSERT_TRUE(model::SaveHf(**h, dir.path("hf2")).ok());
    ho.model_path = dir.path("hf2");
    auto h2 = GradientEngine::Load(ho);
    ASSERT_TRUE(h2.ok());
    EXPECT_EQ(*(*h2)->LogitsIds(ids), *b);
  }
}

}  // namespace
}  // namespace rapidin::model
