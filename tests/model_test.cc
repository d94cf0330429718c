// model/: tokenizer, the stories260K sanity check, gradients against finite differences in double precision,
// layer-wise normalisation, the Alpaca template, and clear errors for bad files.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <mutex>
#include <random>
#include <sstream>
#include <tuple>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_replace.h"
#include "model/engine.h"
#include "kernels/rapidgrad.h"
#include "model/featurizer.h"
#include "model/testing.h"
#include "model/training.h"
#include "tests/test_util.h"
#include "tests/tiny_model.h"

namespace rapidin::model {
namespace {

using rapidin::testing::TinyModel;

using rapidin::testing::SharedData;
using rapidin::testing::MaxAbs;
std::string ModelPath() { return SharedData() + "/models/stories260K.bin"; }
std::string TokPath() { return SharedData() + "/models/tok512.bin"; }
bool HaveData() { return std::ifstream(ModelPath()).good() && std::ifstream(TokPath()).good(); }
#define REQUIRE_SHARED_DATA()                                                                            \
  if (!HaveData()) GTEST_SKIP() << "shared data not found at " << SharedData()                           \
                                << " (set RAPIDIN_SHARED_DATA to the folder with models/stories260K.bin)"

std::unique_ptr<GradientEngine> Stories(bool use_double = false) {
  EngineOptions o;
  o.model_path = ModelPath();
  o.tokenizer_path = TokPath();
  o.use_double = use_double;
  auto e = GradientEngine::Load(o);
  EXPECT_TRUE(e.ok()) << e.status();
  return e.ok() ? std::move(*e) : nullptr;
}

TEST(Tokenizer, SpansMapBackToText) {
  REQUIRE_SHARED_DATA();
  auto tok = Tokenizer::Load(TokPath(), 512);
  ASSERT_TRUE(tok.ok()) << tok.status();
  for (std::string text : {"Once upon a time, there was a little girl.", "Howdy! caf\xc3\xa9 \xe2\x9c\x93 42\n\tx"}) {
    const Encoding e = (*tok)->Encode(text, true);
    ASSERT_EQ(e.ids.size(), e.spans.size());
    std::string joined;
    int32_t prev_end = 0;
    for (size_t i = 0; i < e.ids.size(); ++i) {
      joined += (*tok)->Piece(e.ids[i]);
      if (i == 0) {  // the dummy-prefix space merges into the first token: its span starts at 0
        EXPECT_EQ(e.spans[0].begin, 0);
        prev_end = e.spans[0].end;
        continue;
      }
      EXPECT_EQ(e.spans[i].begin, prev_end);
      EXPECT_EQ(text.substr(e.spans[i].begin, e.spans[i].end - e.spans[i].begin), (*tok)->Piece(e.ids[i]));
      prev_end = e.spans[i].end;
    }
    EXPECT_EQ(joined, " " + text);
    EXPECT_EQ(prev_end, static_cast<int32_t>(text.size()));
  }
}

// llama2.c's tokenizer file: max piece length, then per piece its score, length and bytes.
struct Llama2cVocab {
  std::vector<std::string> pieces;
  std::vector<float> scores;
};

Llama2cVocab ReadLlama2cVocab(const std::string& path, int n) {
  Llama2cVocab v;
  std::ifstream in(path, std::ios::binary);
  int32_t max_len = 0;
  in.read(reinterpret_cast<char*>(&max_len), 4);
  for (int i = 0; i < n; ++i) {
    float score = 0;
    int32_t len = 0;
    in.read(reinterpret_cast<char*>(&score), 4);
    in.read(reinterpret_cast<char*>(&len), 4);
    std::string piece(len, '\0');
    in.read(piece.data(), len);
    v.pieces.push_back(piece);
    v.scores.push_back(score);
  }
  return v;
}

void WriteLlama2cVocab(const std::string& path, const Llama2cVocab& v) {
  std::ofstream out(path, std::ios::binary);
  int32_t max_len = 1;
  for (const auto& p : v.pieces) max_len = std::max<int32_t>(max_len, static_cast<int32_t>(p.size()));
  out.write(reinterpret_cast<const char*>(&max_len), 4);
  for (size_t i = 0; i < v.pieces.size(); ++i) {
    const int32_t len = static_cast<int32_t>(v.pieces[i].size());
    out.write(reinterpret_cast<const char*>(&v.scores[i]), 4);
    out.write(reinterpret_cast<const char*>(&len), 4);
    out.write(v.pieces[i].data(), len);
  }
}

// llama2.c's run.c encoder as written there, slow and obvious (every pair rescanned after each merge), with the
// byte spans the tokenizer reports: the reference for Llama2cTokenizer::Encode.
Encoding ReferenceLlama2cEncode(const Llama2cVocab& v, const std::string& text, bool dummy_prefix) {
  std::map<std::string, int32_t> lookup;
  for (size_t i = 0; i < v.pieces.size(); ++i) lookup.emplace(v.pieces[i], static_cast<int32_t>(i));
  Encoding e;
  if (dummy_prefix && !text.empty() && lookup.count(" ")) {
    e.ids.push_back(lookup.at(" "));
    e.spans.push_back({0, 0});
  }
  for (size_t i = 0; i < text.size();) {
    size_t n = 1;
    const unsigned char c = text[i];
    if (c >= 0xF0) n = 4;
    else if (c >= 0xE0) n = 3;
    else if (c >= 0xC0) n = 2;
    if (i + n > text.size()) n = 1;
    for (size_t j = 1; j < n; ++j) {
      if ((static_cast<unsigned char>(text[i + j]) & 0xC0) != 0x80) n = 1;
    }
    auto it = lookup.find(text.substr(i, n));
    if (it != lookup.end()) {
      e.ids.push_back(it->second);
      e.spans.push_back({static_cast<int32_t>(i), static_cast<int32_t>(i + n)});
    } else {
      for (size_t j = 0; j < n; ++j) {
        e.ids.push_back(static_cast<unsigned char>(text[i + j]) + 3);
        e.spans.push_back({static_cast<int32_t>(i + j), static_cast<int32_t>(i + j + 1)});
      }
    }
    i += n;
  }
  for (;;) {
    float best = -1e10f;
    int best_id = -1;
    size_t best_i = 0;
    for (size_t i = 0; i + 1 < e.ids.size(); ++i) {
      auto it = lookup.find(v.pieces[e.ids[i]] + v.pieces[e.ids[i + 1]]);
      if (it != lookup.end() && v.scores[it->second] > best) {
        best = v.scores[it->second];
        best_id = it->second;
        best_i = i;
      }
    }
    if (best_id < 0) break;
    e.ids[best_i] = best_id;
    e.spans[best_i].end = e.spans[best_i + 1].end;
    if (e.spans[best_i].begin == e.spans[best_i].end && e.spans[best_i + 1].begin < e.spans[best_i].begin) {
      e.spans[best_i].begin = e.spans[best_i + 1].begin;
    }
    e.ids.erase(e.ids.begin() + best_i + 1);
    e.spans.erase(e.spans.begin() + best_i + 1);
  }
  return e;
}

void ExpectSameEncoding(const Encoding& got, const Encoding& want, const std::string& text) {
  ASSERT_EQ(got.ids, want.ids) << "text: " << text;
  ASSERT_EQ(got.spans.size(), want.spans.size());
  for (size_t i = 0; i < got.spans.size(); ++i) {
    EXPECT_EQ(got.spans[i].begin, want.spans[i].begin) << i << " of " << text;
    EXPECT_EQ(got.spans[i].end, want.spans[i].end) << i << " of " << text;
  }
}

// The heap-ordered merges choose what run.c's rescans choose: on a made vocabulary with many equal scores (the
// leftmost-pair rule decides), a duplicated piece, an empty piece, a pair scored below -1e10 (never merged),
// multi-byte characters, bytes outside the vocabulary, and fresh random texts.
TEST(Tokenizer, Llama2cMergesEqualTheQuadraticReference) {
  Llama2cVocab v;
  v.pieces = {"<unk>", "<s>", "</s>"};
  for (int b = 0; b < 256; ++b) {
    char hex[8];
    std::snprintf(hex, sizeof(hex), "<0x%02X>", b);
    v.pieces.push_back(hex);
  }
  v.scores.assign(v.pieces.size(), 0.0f);
  const uint32_t seed = std::random_device{}();
  SCOPED_TRACE(absl::StrCat("seed ", seed));
  std::mt19937 rng(seed);
  const std::vector<std::string> alphabet = {"a", "b", "c", " ", "\xc3\xa9", "\n"};
  std::vector<std::string> words = alphabet;
  for (int i = 0; i < 60; ++i) {  // merged pieces: concatenations of earlier ones
    words.push_back(words[rng() % words.size()] + words[rng() % words.size()]);
  }
  words.push_back("ab");  // a duplicate: lookups give its first id
  words.push_back("");    // an empty piece
  for (const auto& w : words) {
    v.pieces.push_back(w);
    v.scores.push_back(-static_cast<float>(rng() % 4));  // few distinct scores: many ties
  }
  v.pieces.push_back("ba");
  v.scores.push_back(-2e10f);  // never merges
  rapidin::testing::TempDir dir;
  WriteLlama2cVocab(dir.path("tok.bin"), v);
  auto tok = Tokenizer::Load(dir.path("tok.bin"), static_cast<int32_t>(v.pieces.size()));
  ASSERT_TRUE(tok.ok()) << tok.status();
  const std::vector<std::string> extra = {"z", "\xe2\x9c\x93", "\xff"};  // not in the vocabulary: bytes
  for (int trial = 0; trial < 3000; ++trial) {
    std::string text;
    const int len = static_cast<int>(rng() % 120);
    for (int i = 0; i < len; ++i) {
      text += rng() % 10 == 0 ? extra[rng() % extra.size()] : alphabet[rng() % alphabet.size()];
    }
    const bool prefix = rng() % 2 == 0;
    ExpectSameEncoding((*tok)->Encode(text, prefix), ReferenceLlama2cEncode(v, text, prefix), text);
    if (::testing::Test::HasFatalFailure()) return;
  }
}

// The same on the shared tokenizer and real records.
TEST(Tokenizer, Llama2cMergesEqualTheQuadraticReferenceOnAlpaca) {
  REQUIRE_SHARED_DATA();
  auto tok = Tokenizer::Load(TokPath(), 512);
  ASSERT_TRUE(tok.ok()) << tok.status();
  const Llama2cVocab v = ReadLlama2cVocab(TokPath(), 512);
  std::ifstream in(SharedData() + "/instructions/alpaca_5000.json");
  std::stringstream ss;
  ss << in.rdbuf();
  const std::string all = ss.str();
  ASSERT_GT(all.size(), 100000u);
  std::mt19937 rng(static_cast<uint32_t>(std::random_device{}()));
  for (int trial = 0; trial < 300; ++trial) {  // windows of the file: its text, quotes and escapes included
    const size_t at = rng() % (all.size() - 2000);
    const std::string text = all.substr(at, 1 + rng() % 1500);
    ExpectSameEncoding((*tok)->Encode(text, true), ReferenceLlama2cEncode(v, text, true), text);
    if (::testing::Test::HasFatalFailure()) return;
  }
}

TEST(Engine, StoriesNllMatchesPublishedValue) {
  REQUIRE_SHARED_DATA();
  auto e = Stories();
  ASSERT_NE(e, nullptr);
  EXPECT_EQ(e->config().dim, 64);
  EXPECT_EQ(e->config().n_kv_heads, 4);
  std::ifstream in(SharedData() + "/instructions/tinystories_sample.txt");
  std::stringstream ss;
  ss << in.rdbuf();
  const std::string all = ss.str();
  double nll = 0;
  int64_t count = 0;
  size_t pos = 0;
  while (pos < all.size()) {
    size_t end = all.find("<|endoftext|>", pos);
    if (end == std::string::npos) end = all.size();
    std::string story = all.substr(pos, end - pos);
    story.erase(0, story.find_first_not_of(" \n\r\t"));
    story.erase(story.find_last_not_of(" \n\r\t") + 1);
    pos = end + 13;
    if (story.empty()) continue;
    int64_t n = 0;
    auto r = e->MeanNll(story, &n);
    ASSERT_TRUE(r.ok()) << r.status();
    nll += *r * n;
    count += n;
  }
  ASSERT_GT(count, 500);
  EXPECT_NEAR(nll / count, 1.28, 0.05) << "mean NLL over " << count << " tokens";
}

TEST(Engine, MissingAndMalformedFilesAreClearErrors) {
  rapidin::testing::TempDir dir;
  EngineOptions o;
  o.model_path = dir.path("nope.bin");
  EXPECT_EQ(GradientEngine::Load(o).status().code(), absl::StatusCode::kNotFound);
  std::ofstream(dir.path("short.bin")) << "abc";
  o.model_path = dir.path("short.bin");
  EXPECT_EQ(GradientEngine::Load(o).status().code(), absl::StatusCode::kDataLoss);
  if (!HaveData()) return;
  std::ifstream src(ModelPath(), std::ios::binary);
  std::string bytes((std::istreambuf_iterator<char>(src)), std::istreambuf_iterator<char>());
  std::ofstream(dir.path("cut.bin"), std::ios::binary) << bytes.substr(0, bytes.size() - 100);
  o.model_path = dir.path("cut.bin");
  auto st = GradientEngine::Load(o).status();
  EXPECT_EQ(st.code(), absl::StatusCode::kDataLoss);
  EXPECT_NE(st.message().find("header implies"), std::string::npos) << st;
  o.model_path = ModelPath();
  o.tokenizer_path = dir.path("cut.bin");  // not a tokenizer
  EXPECT_FALSE(GradientEngine::Load(o).ok());
  o.tokenizer_path = TokPath();
  o.param_pattern = "no_such_param";
  EXPECT_EQ(GradientEngine::Load(o).status().code(), absl::StatusCode::kInvalidArgument);
  o.param_pattern = "([";
  EXPECT_EQ(GradientEngine::Load(o).status().code(), absl::StatusCode::kInvalidArgument);
}

// Response-loss gradient against central finite differences, all in float64, on random weights and tokens.
TEST(Engine, GradientMatchesFiniteDifferences) {
  SCOPED_TRACE(rapidin::testing::FuzzReplay());
  for (bool tied : {true, false}) {
    EngineOptions o;
    o.use_double = true;
    o.param_pattern = ".";  // every parameter, norms included
    auto e = GradientEngine::Random(TinyModel(tied), static_cast<uint32_t>(rapidin::testing::FuzzSeed() + 1), o);
    ASSERT_TRUE(e.ok()) << e.status();
    std::mt19937 rng(static_cast<uint32_t>(rapidin::testing::FuzzSeed() + 2));
    TokenizedExample t;
    for (int i = 0; i < 12; ++i) t.ids.push_back(static_cast<int32_t>(rng() % 11));
    t.response_begin = 5;
    std::vector<double> g;
    ASSERT_TRUE((*e)->GradientIds(t, false, &g).ok());
    ASSERT_EQ(static_cast<int64_t>(g.size()), (*e)->grad_dim());
    double max_rel = 0;
    int checked = 0, rel_checked = 0;
    for (size_t p = 0; p < (*e)->params().size(); ++p) {
      const auto& info = (*e)->params()[p];
      for (int s = 0; s < 3; ++s) {
        const int64_t i = rng() % info.numel;
        const double h = 1e-5;
        ASSERT_TRUE(model::testing::Perturb(e->get(), p, i, h).ok());
        const double up = *(*e)->LossIds(t);
        ASSERT_TRUE(model::testing::Perturb(e->get(), p, i, -2 * h).ok());
        const double down = *(*e)->LossIds(t);
        ASSERT_TRUE(model::testing::Perturb(e->get(), p, i, h).ok());
        const double fd = (up - down) / (2 * h);
        const double an = g[info.offset + i];
        EXPECT_NEAR(an, fd, 1e-7 + 1e-6 * std::fabs(fd)) << info.name << "[" << i << "]";
        // Central differences in float64 are off by ~1e-11..1e-10 absolute (h^2 truncation, eps / h rounding),
        // so the relative check needs |fd| well above that (|fd| > 1e-6 failed for seeds 1060, 1113, 1137).
        if (std::fabs(fd) > 1e-3) max_rel = std::max(max_rel, std::fabs(an - fd) / std::fabs(fd)), ++rel_checked;
        ++checked;
      }
    }
    EXPECT_GT(checked, 50);
    EXPECT_GT(rel_checked, 10);
    EXPECT_LT(max_rel, 1e-6);
  }
}

// Prompt tokens must not influence the loss except through context: changing a response token changes the
// loss, and the gradient is exactly zero for the embedding rows of tokens that appear nowhere.
TEST(Engine, LayerwiseNormalisation) {
  EngineOptions o;
  o.use_double = true;
  auto e = GradientEngine::Random(TinyModel(true), 7, o);
  ASSERT_TRUE(e.ok());
  TokenizedExample t;
  t.ids = {1, 3, 4, 5, 6, 7, 8, 2};
  t.response_begin = 4;
  std::vector<double> raw, norm;
  ASSERT_TRUE((*e)->GradientIds(t, false, &raw).ok());
  ASSERT_TRUE((*e)->GradientIds(t, true, &norm).ok());
  for (const auto& p : (*e)->params()) {
    EXPECT_EQ(p.name.find("norm"), std::string::npos) << "default selection is weight matrices only";
    double n = 0, rn = 0;
    for (int64_t i = 0; i < p.numel; ++i) {
      n += norm[p.offset + i] * norm[p.offset + i];
      rn += raw[p.offset + i] * raw[p.offset + i];
    }
    EXPECT_NEAR(n, 1.0, 1e-12) << p.name;
    for (int64_t i = 0; i < p.numel; ++i) EXPECT_NEAR(norm[p.offset + i], raw[p.offset + i] / std::sqrt(rn), 1e-12);
  }
}

// One padded forward/backward for a batch gives each record's own gradient (per-sample trick), in double.
TEST(Engine, BatchedGradientsEqualPerRecordLoop) {
  SCOPED_TRACE(rapidin::testing::FuzzReplay());
  for (bool tied : {true, false}) {
    EngineOptions o;
    o.use_double = true;
    o.grad_path = "autograd";  // the padded batch against autograd's per-record loop
    auto e = GradientEngine::Random(TinyModel(tied), static_cast<uint32_t>(rapidin::testing::FuzzSeed() + 3), o);
    ASSERT_TRUE(e.ok());
    std::mt19937 rng(static_cast<uint32_t>(rapidin::testing::FuzzSeed() + 4));
    std::vector<TokenizedExample> batch;
    for (int len : {6, 13, 9, 16}) {
      TokenizedExample t;
      for (int i = 0; i < len; ++i) t.ids.push_back(static_cast<int32_t>(rng() % 11));
      t.response_begin = 1 + static_cast<int32_t>(rng() % (len - 1));
      batch.push_back(t);
    }
    for (bool normalize : {false, true}) {
      std::vector<std::vector<double>> got;
      std::vector<GradInfo> infos;
      ASSERT_TRUE((*e)->GradientIdsBatch(batch, normalize, &got, &infos).ok());
      for (size_t b = 0; b < batch.size(); ++b) {
        std::vector<double> want;
        auto info = (*e)->GradientIds(batch[b], normalize, &want);
        ASSERT_TRUE(info.ok());
        EXPECT_NEAR(infos[b].loss, info->loss, 1e-12);
        ASSERT_EQ(got[b].size(), want.size());
        double max_err = 0, max_abs = 0;
        for (size_t i = 0; i < want.size(); ++i) {
          max_err = std::max(max_err, std::fabs(got[b][i] - want[i]));
          max_abs = std::max(max_abs, std::fabs(want[i]));
        }
        EXPECT_LT(max_err, 1e-12 * std::max(1.0, max_abs)) << "record " << b << " tied=" << tied;
      }
    }
  }
}

// Random records (loss weights on some) for the direct-pass comparisons.
std::vector<TokenizedExample> RandomRecords(std::mt19937* rng, const ModelConfig& c, const std::vector<int>& lens) {
  std::vector<TokenizedExample> out;
  for (int len : lens) {
    TokenizedExample t;
    for (int i = 0; i < len; ++i) t.ids.push_back(static_cast<int32_t>((*rng)() % c.vocab_size));
    // Two equal first tokens give equal values at both positions of a 3-token record, so its query and key
    // gradients are exactly zero and the comparison one of rounding noise (seen once in ~30 runs).
    if (len >= 2 && t.ids[1] == t.ids[0]) t.ids[1] = (t.ids[0] + 1) % c.vocab_size;
    t.response_begin = 1 + static_cast<int32_t>((*rng)() % (len - 1));
    if ((*rng)() % 2) {
      for (int i = t.response_begin; i < len; ++i) t.loss_weights.push_back(((*rng)() % 5) * 0.5 + 0.25);
    }
    out.push_back(t);
  }
  return out;
}

// max |a - b| / max |b| over a parameter block.
double BlockError(const std::vector<double>& a, const std::vector<double>& b, const ParamInfo& p) {
  double err = 0, mag = 0;
  for (int64_t i = p.offset; i < p.offset + p.numel; ++i) {
    err = std::max(err, std::fabs(a[i] - b[i]));
    mag = std::max(mag, std::fabs(b[i]));
  }
  return mag > 0 ? err / mag : err;
}

// The hand-written CPU pass (grad_path "direct", model/internal/llama_grad.h) against LibTorch autograd in
// float64, on fresh random weights and records: tied and untied output, grouped KV heads, head dimensions 2
// (the generic attention) and 8 (the chunked one), records longer than a 16-key chunk, loss weights, raw and
// layer-wise normalised. In float64 the two agree to rounding; the float32 direct pass to float rounding.
TEST(Engine, DirectPassEqualsAutograd) {
  SCOPED_TRACE(rapidin::testing::FuzzReplay());
  const ModelConfig big = rapidin::testing::GqaModel(160);  // 4 query heads per KV head, head dimension 8
  std::vector<std::pair<ModelConfig, std::vector<int>>> cases = {
      {TinyModel(true), {6, 13, 2, 16}}, {TinyModel(false), {9, 16}}, {big, {150, 70, 17, 3}}};
  for (size_t ci = 0; ci < cases.size(); ++ci) {
    const auto& [cfg, lens] = cases[ci];
    const uint32_t seed = static_cast<uint32_t>(rapidin::testing::FuzzSeed() + 11 + ci);
    auto engines = rapidin::testing::RandomDirectEngines(cfg, seed);
    ASSERT_TRUE(engines.ok()) << engines.status();
    const GradientEngine *ref = engines->ref.get(), *direct = engines->direct.get();
    const GradientEngine* direct32 = engines->direct32.get();
    EXPECT_EQ(direct->grad_path(), "direct");
    EXPECT_EQ(direct32->grad_path(), "direct");
    EXPECT_EQ(ref->grad_path(), "autograd");
    std::mt19937 rng(seed);
    for (const TokenizedExample& t : RandomRecords(&rng, cfg, lens)) {
      for (bool normalize : {false, true}) {
        std::vector<double> got, got32, want;
        auto gi = direct->GradientIds(t, normalize, &got);
        auto gi32 = direct32->GradientIds(t, normalize, &got32);
        auto wi = ref->GradientIds(t, normalize, &want);
        ASSERT_TRUE(gi.ok() && wi.ok() && gi32.ok()) << gi.status() << wi.status() << gi32.status();
        EXPECT_NEAR(gi->loss, wi->loss, 1e-12 * std::max(1.0, wi->loss));
        EXPECT_NEAR(gi32->loss, wi->loss, 1e-5 * std::max(1.0, wi->loss));
        ASSERT_EQ(got.size(), want.size());
        double mag = 0;
        for (double x : want) mag = std::max(mag, std::fabs(x));
        ASSERT_GT(mag, 0);
        for (const ParamInfo& p : ref->params()) {
          EXPECT_LT(BlockError(got, want, p), 1e-10)
              << p.name << " case " << ci << " len " << t.ids.size() << " normalize " << normalize;
          EXPECT_LT(BlockError(got32, want, p), 1e-4)
              << "float32 " << p.name << " case " << ci << " len " << t.ids.size() << " normalize " << normalize;
        }
      }
    }
  }
}

// The same in float32 on the real model and records: within float rounding of autograd in float64.
TEST(Engine, DirectPassFloat32MatchesFloat64OnStories) {
  REQUIRE_SHARED_DATA();
  auto fast = Stories(false);
  EngineOptions o;
  o.model_path = ModelPath();
  o.tokenizer_path = TokPath();
  o.use_double = true;
  o.grad_path = "autograd";
  auto ref = GradientEngine::Load(o);
  ASSERT_TRUE(ref.ok() && fast != nullptr);
  EXPECT_EQ(fast->grad_path(), "direct");
  const std::vector<Example> exs = {
      {"Write a story about a cat.", "", "Once upon a time, there was a cat named Tom. He liked to play in the sun."},
      {"Say hello.", "", "Hello there!"},
      {"Continue.", "Lily went to the park", std::string(400, 'a') + " and she was happy."}};
  for (const Example& ex : exs) {
    auto t = fast->Tokenize(ex);
    ASSERT_TRUE(t.ok());
    std::vector<double> got, want;
    auto gi = fast->GradientIds(*t, true, &got);
    auto wi = (*ref)->GradientIds(*t, true, &want);
    ASSERT_TRUE(gi.ok() && wi.ok());
    EXPECT_NEAR(gi->loss, wi->loss, 1e-5 * wi->loss);
    for (const ParamInfo& p : (*ref)->params()) {
      double dd = 0, ww = 0;  // relative L2 error of the unit-norm block
      for (int64_t i = p.offset; i < p.offset + p.numel; ++i) {
        dd += (got[i] - want[i]) * (got[i] - want[i]);
        ww += want[i] * want[i];
      }
      EXPECT_LT(std::sqrt(dd / ww), 1e-4) << p.name << " tokens " << t->ids.size();
    }
  }
}

// Where the direct pass does not apply, the engine says so and takes autograd; bad options and records are refused.
TEST(Engine, DirectPassFallbackAndRefusals) {
  EngineOptions o;
  o.use_double = true;
  o.param_pattern = "norm";  // RMSNorm weights are vectors: not the direct pass's
  auto e = GradientEngine::Random(TinyModel(true), 5, o);
  ASSERT_TRUE(e.ok()) << e.status();
  EXPECT_EQ((*e)->grad_path(), "autograd");
  o.param_pattern = "";
  o.grad_path = "fast";
  EXPECT_EQ(GradientEngine::Random(TinyModel(true), 5, o).status().code(), absl::StatusCode::kInvalidArgument);
  o.grad_path = "direct";
  auto d = GradientEngine::Random(TinyModel(true), 5, o);
  ASSERT_TRUE(d.ok());
  TokenizedExample t;
  t.ids.assign(TinyModel(true).seq_len + 1, 3);  // longer than the context
  t.response_begin = 2;
  std::vector<double> g;
  EXPECT_EQ((*d)->GradientIds(t, true, &g).status().code(), absl::StatusCode::kInvalidArgument);
  t.ids.resize(4);
  t.ids[2] = 11;  // out of the vocabulary
  EXPECT_EQ((*d)->GradientIds(t, true, &g).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(Engine, AlpacaTemplateShiftAndTruncation) {
  REQUIRE_SHARED_DATA();
  auto e = Stories();
  ASSERT_NE(e, nullptr);
  Example ex{"Say hello.", "", "Hello there!"};
  auto t = e->Tokenize(ex);
  ASSERT_TRUE(t.ok());
  EXPECT_EQ(t->ids.front(), e->tokenizer()->bos());
  EXPECT_EQ(t->ids.back(), e->tokenizer()->eos());
  EXPECT_FALSE(t->truncated);
  const Encoding prompt = e->tokenizer()->Encode(AlpacaPrompt("Say hello.", ""), true);
  EXPECT_EQ(t->response_begin, 1 + static_cast<int>(prompt.ids.size()));
  std::string resp;
  for (size_t i = t->response_begin; i + 1 < t->ids.size(); ++i) resp += e->tokenizer()->Piece(t->ids[i]);
  EXPECT_EQ(resp, "Hello there!");
  EXPECT_NE(AlpacaPrompt("a", "b").find("### Input:\nb"), std::string::npos);
  EXPECT_EQ(AlpacaPrompt("a", "").find("### Input:"), std::string::npos);
  // The loss with response_begin = 1 is the plain next-token NLL of the same ids (the shift is the same).
  TokenizedExample all = *t;
  all.response_begin = 1;
  int64_t n = 0;
  const std::string text = AlpacaPrompt("Say hello.", "") + "Hello there!";
  std::vector<int32_t> ids = {e->tokenizer()->bos()};
  auto enc = e->tokenizer()->Encode(text, true);
  ids.insert(ids.end(), enc.ids.begin(), enc.ids.end());
  all.ids = ids;
  EXPECT_NEAR(*e->LossIds(all), *e->MeanNll(text, &n), 1e-5);
  // Truncation.
  EngineOptions o;
  o.model_path = ModelPath();
  o.tokenizer_path = TokPath();
  o.max_length = static_cast<int>(t->response_begin) + 2;
  auto short_e = GradientEngine::Load(o);
  ASSERT_TRUE(short_e.ok());
  auto tt = (*short_e)->Tokenize(ex);
  ASSERT_TRUE(tt.ok());
  EXPECT_TRUE(tt->truncated);
  EXPECT_EQ(static_cast<int>(tt->ids.size()), o.max_length);
  o.max_length = 10;
  auto tiny = GradientEngine::Load(o);
  EXPECT_EQ((*tiny)->Tokenize(ex).status().code(), absl::StatusCode::kInvalidArgument);
  // Model hash depends on max_length (it changes the tokens a record becomes).
  EXPECT_NE((*tiny)->model_hash(), e->model_hash());
}

// The record-token view's scores equal each token's sketch against q (the definition) on the real model, with
// and without the layer-wise norm, for a fresh random q; a q of the wrong size is refused.
TEST(Featurizer, TokenScoresAreTokenSketchesAgainstQ) {
  REQUIRE_SHARED_DATA();
  SCOPED_TRACE(rapidin::testing::FuzzReplay());
  std::mt19937 rng(static_cast<uint32_t>(rapidin::testing::FuzzSeed() + 19));
  for (bool layer_norm : {true, false}) {
    FeaturizerOptions o;
    o.engine.model_path = ModelPath();
    o.engine.tokenizer_path = TokPath();
    o.k = 512;
    o.seed = 5;
    o.layer_norm = layer_norm;
    auto f = Featurizer::Create(o);
    ASSERT_TRUE(f.ok()) << f.status();
    auto t = (*f)->engine().Tokenize({"Tell a story.", "", "Once upon a time there was a cat who liked fish.", {}});
    ASSERT_TRUE(t.ok());
    std::normal_distribution<float> g;
    std::vector<float> q((*f)->dim());
    for (auto& v : q) v = g(rng);
    std::vector<std::vector<float>> sk;
    std::vector<double> got;
    ASSERT_TRUE((*f)->TokenSketches(t->ids, 1, &sk).ok());
    ASSERT_TRUE((*f)->TokenScores(t->ids, 1, q, &got).ok());
    ASSERT_EQ(got.size(), sk.size());
    for (size_t s = 0; s < sk.size(); ++s) {
      double want = 0, scale = 0;
      for (size_t i = 0; i < q.size(); ++i) want += static_cast<double>(sk[s][i]) * q[i], scale += std::fabs(sk[s][i] * q[i]);
      ASSERT_GT(scale, 0);
      EXPECT_NEAR(got[s], want, 1e-5 * scale) << "token " << s;  // the sketch sums in float32
    }
    EXPECT_EQ((*f)->TokenScores(t->ids, 1, std::vector<float>(3), &got).code(), absl::StatusCode::kInvalidArgument);
  }
}

TEST(Featurizer, CompressIsSketchOfNormalisedGradient) {
  REQUIRE_SHARED_DATA();
  FeaturizerOptions o;
  o.engine.model_path = ModelPath();
  o.engine.tokenizer_path = TokPath();
  o.k = 1024;
  o.seed = 3;
  auto f = Featurizer::Create(o);
  ASSERT_TRUE(f.ok()) << f.status();
  // Every weight matrix: embedding 512x64 + 5 layers of wq, wo (64x64), wk, wv (32x64), w1, w2, w3 (172x64).
  EXPECT_EQ((*f)->engine().grad_dim(), 512 * 64 + 5 * (2 * 64 * 64 + 2 * 32 * 64 + 3 * 172 * 64));
  Example ex{"Tell a story.", "", "Once upon a time there was a cat."};
  std::vector<float> c, g;
  ASSERT_TRUE((*f)->Compress(ex, &c).ok());
  ASSERT_TRUE((*f)->engine().Gradient(ex, true, &g).ok());
  EXPECT_EQ(c, (*f)->sketch().Apply(g));
  EXPECT_NE((*f)->projection_state().find("rapidgrad/v1 d=259328 k=1024 lambda=4 seed=3"), std::string::npos);
  EXPECT_EQ(DescribeStateDifference((*f)->projection_state(), (*f)->projection_state()), "");
  o.seed = 4;
  auto other = Featurizer::Create(o);
  const std::string diff = DescribeStateDifference((*f)->projection_state(), (*other)->projection_state());
  EXPECT_NE(diff.find("seed: store 3, model 4"), std::string::npos) << diff;

  // Without the layer-wise norm: the sketch of the raw gradient, the state says so, and it reads back.
  o.seed = 3;
  o.layer_norm = false;
  auto raw = Featurizer::Create(o);
  ASSERT_TRUE(raw.ok()) << raw.status();
  std::vector<float> rc, rg;
  ASSERT_TRUE((*raw)->Compress(ex, &rc).ok());
  ASSERT_TRUE((*raw)->engine().Gradient(ex, false, &rg).ok());
  EXPECT_EQ(rc, (*raw)->sketch().Apply(rg));
  EXPECT_NE(rc, c);  // a record's gradient norm is kept, so this is not the normalised sketch
  EXPECT_NE((*raw)->projection_state().find("score=dot precondition=none normalize=none"), std::string::npos)
      << (*raw)->projection_state();
  EXPECT_NE(DescribeStateDifference((*f)->projection_state(), (*raw)->projection_state()), "");
  auto back = OptionsFromState((*raw)->projection_state(), o.engine);
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_FALSE(back->layer_norm);
  auto normalised = OptionsFromState((*f)->projection_state(), o.engine);
  ASSERT_TRUE(normalised.ok());
  EXPECT_TRUE(normalised->layer_norm);
  EXPECT_EQ(OptionsFromState(absl::StrReplaceAll((*raw)->projection_state(), {{"normalize=none", "normalize=half"}}),
                             o.engine).status().code(),
            absl::StatusCode::kDataLoss);
}

// Non-finite numbers in a checkpoint are refused at load, naming the weight. Finite weights that overflow in the
// forward pass (a final norm gain of 1e38) give a FAILED_PRECONDITION for the example, for records, batches and
// tokens alike, instead of NaN vectors for the store or NaN scores.
TEST(Featurizer, NonFiniteWeightsAndOverflowsAreErrors) {
  REQUIRE_SHARED_DATA();
  rapidin::testing::TempDir dir;
  std::ifstream src(ModelPath(), std::ios::binary);
  const std::string good((std::istreambuf_iterator<char>(src)), std::istreambuf_iterator<char>());
  int32_t h[7];
  std::memcpy(h, good.data(), sizeof h);
  const int64_t D = h[0], F = h[1], L = h[2], V = std::abs(h[5]), KVD = D / h[3] * h[4];
  const int64_t wq = V * D + L * D;                                                // first float of wq
  const int64_t rms_final = wq + 2 * L * D * D + 2 * L * KVD * D + L * D + 3 * L * F * D;
  auto with = [&](int64_t first, int64_t count, float value) {
    std::string b = good;
    for (int64_t i = first; i < first + count; ++i) std::memcpy(&b[28 + 4 * i], &value, 4);
    std::ofstream(dir.path("m.bin"), std::ios::binary | std::ios::trunc) << b;
    return dir.path("m.bin");
  };
  EngineOptions eo;
  eo.tokenizer_path = TokPath();
  eo.model_path = with(wq + 7, 1, NAN);
  auto st = GradientEngine::Load(eo).status();
  EXPECT_EQ(st.code(), absl::StatusCode::kDataLoss) << st;
  EXPECT_NE(st.message().find("layers.0.attention.wq.weight has 1 non-finite"), std::string::npos) << st;
  eo.model_path = with(rms_final, 1, -INFINITY);
  st = GradientEngine::Load(eo).status();
  EXPECT_NE(st.message().find("norm.weight has 1 non-finite"), std::string::npos) << st;

  FeaturizerOptions o;
  o.engine = eo;
  o.engine.model_path = with(rms_final, D, 1e38f);
  o.k = 256;
  auto f = Featurizer::Create(o);
  ASSERT_TRUE(f.ok()) << f.status();
  const Example ex{"Tell a story.", "", "Once upon a time there was a cat."};
  std::vector<float> c;
  auto one = (*f)->Compress(ex, &c);
  EXPECT_EQ(one.status().code(), absl::StatusCode::kFailedPrecondition) << one.status();
  EXPECT_NE(one.status().message().find("not finite"), std::string::npos) << one.status();
  std::vector<std::vector<float>> outs;
  std::vector<absl::StatusOr<GradInfo>> infos;
  (*f)->CompressBatch({ex, ex}, &outs, &infos);
  for (const auto& i : infos) EXPECT_EQ(i.status().code(), absl::StatusCode::kFailedPrecondition) << i.status();
  auto t = (*f)->engine().Tokenize(ex);
  ASSERT_TRUE(t.ok());
  std::vector<std::vector<float>> tokens;
  const absl::Status ts = (*f)->TokenSketches(t->ids, t->ids.size() - 3, &tokens);
  EXPECT_EQ(ts.code(), absl::StatusCode::kFailedPrecondition) << ts;
  std::vector<double> scores;
  const absl::Status tsc = (*f)->TokenScores(t->ids, t->ids.size() - 3, std::vector<float>((*f)->dim(), 1.0f), &scores);
  EXPECT_EQ(tsc.code(), absl::StatusCode::kFailedPrecondition) << tsc;
  EXPECT_NE(tsc.message().find("not finite"), std::string::npos) << tsc;
}

}  // namespace
}  // namespace rapidin::model

namespace rapidin::model {
namespace {

// Gradients computed on several threads at once equal the serial ones exactly (a BLAS that is not thread-safe,
// such as Debian's serial OpenBLAS, fails this).
TEST(Engine, ConcurrentGradientsEqualSerial) {
  REQUIRE_SHARED_DATA();
  SetComputeThreads(1);
  auto e = Stories();
  ASSERT_NE(e, nullptr);
  auto t = e->Tokenize({"Give a greeting.", "", "Howdy! Nice to meet you.", {}});
  ASSERT_TRUE(t.ok());
  for (auto method : {TokenGradMethod::kLoop, TokenGradMethod::kShared}) {
    std::vector<std::vector<double>> serial, parallel;
    TokenGradOptions one, two;
    one.method = two.method = method;
    one.chunk = two.chunk = 4;
    two.threads = 2;
    ASSERT_TRUE(e->TokenGradientsIds(t->ids, 1, one, &serial).ok());
    for (int rep = 0; rep < 2; ++rep) {
      ASSERT_TRUE(e->TokenGradientsIds(t->ids, 1, two, &parallel).ok());
      ASSERT_EQ(parallel, serial) << "method " << static_cast<int>(method) << " repetition " << rep;
    }
  }
}

// On the real model in float32: the shared-forward per-token gradients equal the reference loop to fp32
// tolerance (layer-wise normalised, every weight matrix).
TEST(Engine, SharedTokenGradientsMatchLoopInFloat32) {
  REQUIRE_SHARED_DATA();
  auto e = Stories();
  ASSERT_NE(e, nullptr);
  auto t = e->Tokenize({"Give a greeting.", "", "Howdy! Nice to meet you.", {}});
  ASSERT_TRUE(t.ok());
  TokenGradOptions loop, shared;
  loop.method = TokenGradMethod::kLoop;
  shared.chunk = 8;
  shared.threads = 2;
  std::vector<std::vector<double>> want, got;
  ASSERT_TRUE(e->TokenGradientsIds(t->ids, t->response_begin - 3, loop, &want).ok());
  ASSERT_TRUE(e->TokenGradientsIds(t->ids, t->response_begin - 3, shared, &got).ok());
  ASSERT_EQ(got.size(), want.size());
  for (size_t i = 0; i < want.size(); ++i) {
    double diff = 0, big = 0;
    for (size_t j = 0; j < want[i].size(); ++j) {
      diff = std::max(diff, std::fabs(got[i][j] - want[i][j]));
      big = std::max(big, std::fabs(want[i][j]));
    }
    EXPECT_LT(diff, 1e-4 * big) << "token " << i;
  }
}

// Hotwords restrict the generation's loss to the tokens overlapping them.
TEST(Engine, HotwordsRestrictTheLoss) {
  REQUIRE_SHARED_DATA();
  auto e = Stories();
  ASSERT_NE(e, nullptr);
  Example ex{"Tell a story.", "", "Once upon a time there was a cat.", {}};
  ex.hotwords = {ex.output};  // every output token, but not EOS (its span is empty at the end)
  auto t = e->Tokenize(ex);
  ASSERT_TRUE(t.ok()) << t.status();
  ASSERT_EQ(t->loss_weights.size(), t->response_spans.size());
  EXPECT_EQ(t->loss_weights.back(), 0.0);
  TokenizedExample no_eos = *t;
  no_eos.ids.pop_back();
  no_eos.loss_weights.clear();
  EXPECT_NEAR(*e->LossIds(*t), *e->LossIds(no_eos), 1e-5);
  // A single hotword marks only the tokens that overlap it; the batched path honours the weights too.
  ex.hotwords = {"cat"};
  auto h = e->Tokenize(ex);
  ASSERT_TRUE(h.ok());
  int marked = 0;
  for (size_t i = 0; i < h->loss_weights.size(); ++i) {
    if (h->loss_weights[i] > 0) {
      ++marked;
      const Span sp = h->response_spans[i];
      EXPECT_NE(ex.output.substr(sp.begin, sp.end - sp.begin).find_first_of("cat"), std::string::npos);
    }
  }
  EXPECT_GE(marked, 1);
  EXPECT_LE(marked, 3);
  std::vector<double> loop;
  ASSERT_TRUE(e->GradientIds(*h, false, &loop).ok());
  std::vector<std::vector<double>> batch;
  std::vector<GradInfo> infos;
  ASSERT_TRUE(e->GradientIdsBatch({*h, *t}, false, &batch, &infos).ok());
  double err = 0, mag = 0;
  for (size_t i = 0; i < loop.size(); ++i) {
    err = std::max(err, std::fabs(batch[0][i] - loop[i]));
    mag = std::max(mag, std::fabs(loop[i]));
  }
  EXPECT_LT(err, 1e-4 * mag);
  ex.hotwords = {"dog"};
  EXPECT_EQ(e->Tokenize(ex).status().code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace rapidin::model

namespace rapidin::model {
namespace {

absl::StatusOr<std::unique_ptr<GradientEngine>> TinyOn(const std::string& device, bool tied = true,
                                                       const std::string& pattern = "") {
  EngineOptions o;
  o.device = device;
  o.param_pattern = pattern;
  return GradientEngine::Random(TinyModel(tied), 3, o);
}

TEST(EngineDevice, NamesAreResolvedOrRefusedWithTheReason) {
  const TorchRuntime rt = GetTorchRuntime();
  EXPECT_FALSE(rt.version.empty());
  auto cpu = TinyOn("cpu");
  ASSERT_TRUE(cpu.ok()) << cpu.status();
  EXPECT_EQ((*cpu)->device(), "cpu");
  EXPECT_EQ((*cpu)->cuda_device(), -1);
  auto automatic = TinyOn("auto");
  ASSERT_TRUE(automatic.ok()) << automatic.status();
  EXPECT_EQ((*automatic)->device(), rt.cuda_devices > 0 ? "cuda:0" : "cpu");
  EXPECT_EQ((*automatic)->cuda_device(), rt.cuda_devices > 0 ? 0 : -1);
  for (const char* bad : {"gpu", "cuda:", "cuda:-1", "cuda:x", "CPU", ""}) {
    EXPECT_EQ(TinyOn(bad).status().code(), absl::StatusCode::kInvalidArgument) << '"' << bad << '"';
  }
  const auto beyond = TinyOn(absl::StrCat("cuda:", rt.cuda_devices)).status();
  EXPECT_EQ(beyond.code(), absl::StatusCode::kFailedPrecondition) << beyond;
  EXPECT_NE(std::string(beyond.message()).find(rt.version), std::string::npos) << beyond;
  if (rt.cuda_devices == 0) {
    const auto cuda = TinyOn("cuda").status();
    EXPECT_EQ(cuda.code(), absl::StatusCode::kFailedPrecondition) << cuda;
    EXPECT_NE(std::string(cuda.message()).find("CPU-only"), std::string::npos) << cuda;
  } else {
    auto cuda = TinyOn("cuda");
    ASSERT_TRUE(cuda.ok()) << cuda.status();
    EXPECT_EQ((*cuda)->device(), "cuda:0");
  }
}

// The device-buffer form of the batched gradients (what the GPU sketch reads) holds GradientIdsBatch's values
// rounded to float32, for the padded batch, the one-record path and the per-record fallback (norms selected).
TEST(Engine, GradientRowsAreTheBatchedGradientsInFloat32) {
  SCOPED_TRACE(rapidin::testing::FuzzReplay());
  std::mt19937 rng(static_cast<uint32_t>(rapidin::testing::FuzzSeed() + 8));
  for (const std::string pattern : {"", ".*"}) {
    SCOPED_TRACE(pattern);
    EngineOptions o;
    o.param_pattern = pattern;
    auto e = GradientEngine::Random(TinyModel(false), rng(), o);
    ASSERT_TRUE(e.ok());
    std::vector<TokenizedExample> batch(3);
    for (size_t r = 0; r < batch.size(); ++r) {
      for (int i = 0; i < 6 + 3 * static_cast<int>(r); ++i) batch[r].ids.push_back(static_cast<int32_t>(rng() % 11));
      batch[r].response_begin = 2 + static_cast<int>(r);
    }
    batch[1].loss_weights.assign(batch[1].ids.size() - batch[1].response_begin, 1.0);
    batch[1].loss_weights[0] = 0.0;
    for (size_t n : {size_t{1}, batch.size()}) {
      const std::vector<TokenizedExample> part(batch.begin(), batch.begin() + n);
      std::vector<std::vector<double>> ref;
      std::vector<GradInfo> ref_infos, infos;
      ASSERT_TRUE((*e)->GradientIdsBatch(part, true, &ref, &ref_infos).ok());
      int calls = 0;
      std::vector<float> got;
      const absl::Status st = (*e)->GradientRowsBatch(
          part, true,
          [&](const float* rows, int64_t b) {
            ++calls;
            got.assign(rows, rows + b * (*e)->grad_dim());
            return absl::OkStatus();
          },
          &infos);
      ASSERT_TRUE(st.ok()) << st;
      EXPECT_EQ(calls, 1);
      ASSERT_EQ(got.size(), n * (*e)->grad_dim());
      for (size_t r = 0; r < n; ++r) {
        ASSERT_GT(MaxAbs(ref[r]), 1e-3);
        for (int64_t i = 0; i < (*e)->grad_dim(); ++i) {
          ASSERT_EQ(got[r * (*e)->grad_dim() + i], static_cast<float>(ref[r][i])) << "record " << r << " i " << i;
        }
      }
      for (size_t r = 0; r < n; ++r) EXPECT_EQ(infos[r].loss, ref_infos[r].loss);
    }
    // The consumer's error comes back; an empty batch is refused.
    std::vector<GradInfo> infos;
    EXPECT_EQ((*e)->GradientRowsBatch(batch, true, [](const float*, int64_t) { return absl::DataLossError("x"); },
                                      &infos).code(),
              absl::StatusCode::kDataLoss);
    EXPECT_EQ((*e)->GradientRowsBatch({}, true, [](const float*, int64_t) { return absl::OkStatus(); }, &infos).code(),
              absl::StatusCode::kInvalidArgument);
  }
}

// The same for per-token gradients, chunk by chunk, for every method, from several threads.
TEST(TokenGradients, RowsAreThePerTokenGradientsInFloat32) {
  SCOPED_TRACE(rapidin::testing::FuzzReplay());
  std::mt19937 rng(static_cast<uint32_t>(rapidin::testing::FuzzSeed() + 9));
  EngineOptions o;
  auto e = GradientEngine::Random(TinyModel(true), rng(), o);
  ASSERT_TRUE(e.ok());
  std::vector<int32_t> ids;
  for (int i = 0; i < 15; ++i) ids.push_back(static_cast<int32_t>(rng() % 11));
  if (ids[1] == ids[0]) ids[1] = (ids[0] + 1) % 11;
  const int from = 3, dim = static_cast<int>((*e)->grad_dim());
  for (const auto& [method, chunk, threads] : std::vector<std::tuple<TokenGradMethod, int, int>>{
           {TokenGradMethod::kShared, 4, 2}, {TokenGradMethod::kCopies, 3, 1}, {TokenGradMethod::kLoop, 1, 2}}) {
    SCOPED_TRACE(static_cast<int>(method));
    TokenGradOptions to;
    to.method = method;
    to.chunk = chunk;
    to.threads = threads;
    std::vector<std::vector<double>> ref;
    ASSERT_TRUE((*e)->TokenGradientsIds(ids, from, to, &ref).ok());
    std::mutex mu;
    std::vector<std::vector<float>> got(ref.size());
    std::vector<int> seen(ref.size(), 0);
    const absl::Status st = (*e)->TokenGradientRows(ids, from, to, [&](const float* rows, int first, int n) {
      std::lock_guard<std::mutex> l(mu);
      for (int i = 0; i < n; ++i) {
        got[first + i].assign(rows + static_cast<int64_t>(i) * dim, rows + static_cast<int64_t>(i + 1) * dim);
        ++seen[first + i];
      }
      return absl::OkStatus();
    });
    ASSERT_TRUE(st.ok()) << st;
    for (size_t t = 0; t < ref.size(); ++t) {
      ASSERT_EQ(seen[t], 1) << "token " << t;
      ASSERT_GT(MaxAbs(ref[t]), 1e-3);
      for (int i = 0; i < dim; ++i) ASSERT_EQ(got[t][i], static_cast<float>(ref[t][i])) << "token " << t << " i " << i;
    }
    EXPECT_EQ((*e)->TokenGradientRows(ids, from, to, [](const float*, int, int) { return absl::DataLossError("x"); })
                  .code(),
              absl::StatusCode::kDataLoss);
    EXPECT_EQ((*e)->TokenGradientRows(ids, 0, to, [](const float*, int, int) { return absl::OkStatus(); }).code(),
              absl::StatusCode::kInvalidArgument);
  }
}

// The Adam second moments of one step of a TinyModel(true) engine (seed) on ids, the loss from token 5, saved to
// path: a preconditioner for that model's engines.
void SaveTinyPreconditioner(uint32_t seed, const std::vector<int32_t>& ids, const std::string& path) {
  EngineOptions o;
  auto trainer = GradientEngine::Random(TinyModel(true), seed, o);
  ASSERT_TRUE(trainer.ok());
  TokenizedExample t;
  t.ids = ids;
  t.response_begin = 5;
  AdamWOptions adam;
  adam.eps = 1e-6;
  const auto st = TrainStep(trainer->get(), {t}, adam);
  ASSERT_TRUE(st.ok()) << st.status();
  ASSERT_TRUE(SaveOptimizerState(**trainer, path, adam).ok());
}

// TokenScores: each token's <N(grad l_s), u> without its vector, against the per-token gradients (float64, the
// same blocks) times u: every method, float32 and float64 engines, raw and normalised, with and without a
// preconditioner, on fresh random weights, tokens and u; a u of the wrong size is refused.
TEST(TokenGradients, ScoresAreTheGradientsAgainstU) {
  SCOPED_TRACE(rapidin::testing::FuzzReplay());
  const uint32_t seed = static_cast<uint32_t>(rapidin::testing::FuzzSeed() + 17);
  std::mt19937 rng(seed);
  std::vector<int32_t> ids;
  for (int i = 0; i < 15; ++i) ids.push_back(static_cast<int32_t>(rng() % 11));  // TinyModel: 16 positions
  if (ids[1] == ids[0]) ids[1] = (ids[0] + 1) % 11;
  rapidin::testing::TempDir dir;
  ASSERT_NO_FATAL_FAILURE(SaveTinyPreconditioner(seed, ids, dir.path("v.safetensors")));
  // float32 / float64 x preconditioner, an untied head, and LibTorch's shared method in float32 (grad_path
  // "autograd": its blocks reduced whole, after the chunk)
  for (int variant = 0; variant < 6; ++variant) {
    const bool dbl = variant < 4 && variant % 2 == 1, pre = variant == 2 || variant == 3 || variant == 5;
    const bool tied = variant != 4, autograd = variant == 5;
    EngineOptions o;
    o.use_double = dbl;
    if (pre) o.preconditioner_path = dir.path("v.safetensors");
    if (autograd) o.grad_path = "autograd";
    auto e = GradientEngine::Random(TinyModel(tied), seed, o);
    ASSERT_TRUE(e.ok()) << e.status();
    std::normal_distribution<double> g;
    std::vector<double> u((*e)->grad_dim());
    for (auto& v : u) v = g(rng);
    for (const auto& [method, chunk, threads] : std::vector<std::tuple<TokenGradMethod, int, int>>{
             {TokenGradMethod::kShared, 4, 2}, {TokenGradMethod::kCopies, 3, 1}, {TokenGradMethod::kLoop, 1, 2}}) {
      for (bool normalize : {true, false}) {
        SCOPED_TRACE(::testing::Message() << "double " << dbl << " precondition " << pre << " tied " << tied
                                          << " autograd " << autograd << " method "
                                          << static_cast<int>(method) << " normalize " << normalize);
        TokenGradOptions to;
        to.method = method;
        to.chunk = chunk;
        to.threads = threads;
        to.normalize = normalize;
        const int from = 2;
        std::vector<std::vector<double>> ref;
        ASSERT_TRUE((*e)->TokenGradientsIds(ids, from, to, &ref).ok());
        std::vector<double> got;
        const absl::Status st = (*e)->TokenScores(ids, from, to, u, &got);
        ASSERT_TRUE(st.ok()) << st;
        ASSERT_EQ(got.size(), ref.size());
        for (size_t t = 0; t < ref.size(); ++t) {
          double want = 0, scale = 0;
          for (size_t i = 0; i < u.size(); ++i) want += ref[t][i] * u[i], scale += std::fabs(ref[t][i] * u[i]);
          ASSERT_GT(scale, 1e-3);
          EXPECT_NEAR(got[t], want, 1e-12 * scale) << "token " << t;
        }
      }
    }
    std::vector<double> got;
    EXPECT_EQ((*e)->TokenScores(ids, 2, TokenGradOptions(), std::vector<double>(5), &got).code(),
              absl::StatusCode::kInvalidArgument);
    EXPECT_EQ((*e)->TokenScores(ids, 0, TokenGradOptions(), u, &got).code(), absl::StatusCode::kInvalidArgument);
  }
}

// The same with a preconditioner (Adam second moments): the direct pass's float32 rows apply it as the double
// path does.
TEST(TokenGradients, PreconditionedRowsAreThePerTokenGradients) {
  SCOPED_TRACE(rapidin::testing::FuzzReplay());
  const uint32_t seed = static_cast<uint32_t>(rapidin::testing::FuzzSeed() + 13);
  std::mt19937 rng(seed);
  std::vector<int32_t> ids;
  for (int i = 0; i < 15; ++i) ids.push_back(static_cast<int32_t>(rng() % 11));
  if (ids[1] == ids[0]) ids[1] = (ids[0] + 1) % 11;
  rapidin::testing::TempDir dir;
  ASSERT_NO_FATAL_FAILURE(SaveTinyPreconditioner(seed, ids, dir.path("v.safetensors")));
  EngineOptions o;
  o.preconditioner_path = dir.path("v.safetensors");
  auto e = GradientEngine::Random(TinyModel(true), seed, o);
  ASSERT_TRUE(e.ok()) << e.status();
  ASSERT_EQ((*e)->grad_path(), "direct");
  const int from = 3, dim = static_cast<int>((*e)->grad_dim());
  TokenGradOptions to;
  to.chunk = 4;
  std::vector<std::vector<double>> ref;
  ASSERT_TRUE((*e)->TokenGradientsIds(ids, from, to, &ref).ok());
  std::vector<std::vector<float>> got(ref.size());
  ASSERT_TRUE((*e)->TokenGradientRows(ids, from, to, [&](const float* rows, int first, int n) {
                      for (int i = 0; i < n; ++i) {
                        got[first + i].assign(rows + static_cast<int64_t>(i) * dim,
                                              rows + static_cast<int64_t>(i + 1) * dim);
                      }
                      return absl::OkStatus();
                    }).ok());
  for (size_t k = 0; k < ref.size(); ++k) {
    ASSERT_GT(MaxAbs(ref[k]), 1e-3);
    for (int i = 0; i < dim; ++i) ASSERT_EQ(got[k][i], static_cast<float>(ref[k][i])) << "token " << k << " i " << i;
  }
}

// Records are checked before they reach LibTorch, which would throw on them or read past a vector's end.
TEST(Engine, MalformedTokenizedRecordsAreRefused) {
  EngineOptions o;
  o.use_double = true;
  auto e = GradientEngine::Random(TinyModel(true), 9, o);
  ASSERT_TRUE(e.ok());
  TokenizedExample good;
  good.ids = {1, 4, 2, 7, 3};
  good.response_begin = 2;
  std::vector<TokenizedExample> bad(6, good);
  bad[0].response_begin = 0;
  bad[1].response_begin = 5;
  bad[2].ids[3] = 11;                     // outside the vocabulary
  bad[3].loss_weights = {1.0, 1.0};       // 3 response tokens
  bad[4].loss_weights = {1.0, -1.0, 1.0};
  bad[5].loss_weights = {0.0, 0.0, 0.0};
  for (size_t i = 0; i < bad.size(); ++i) {
    SCOPED_TRACE(i);
    std::vector<double> g;
    std::vector<std::vector<double>> gs;
    std::vector<GradInfo> infos;
    EXPECT_EQ((*e)->GradientIds(bad[i], true, &g).status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_EQ((*e)->GradientIdsBatch({good, bad[i]}, true, &gs, &infos).code(), absl::StatusCode::kInvalidArgument);
    EXPECT_EQ((*e)->LossIds(bad[i]).status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_EQ(model::TrainStep(e->get(), {good, bad[i]}, AdamWOptions{}).status().code(),
              absl::StatusCode::kInvalidArgument);
  }
  std::vector<double> g;
  EXPECT_TRUE((*e)->GradientIds(good, true, &g).ok());
}

// A grown model starts out as the base's function (in float64, with norm_eps = 0 exactly up to rounding), and its
// new weights are reachable by training: gradients flow into the new heads' and units' writers and the new
// embedding columns. Targets that cannot hold the base are refused.
TEST(Engine, GrowKeepsTheBaseFunctionAndTrainsTheNewWeights) {
  SCOPED_TRACE(rapidin::testing::FuzzReplay());
  for (bool tied : {true, false}) {
    EngineOptions o;
    o.use_double = true;
    ModelConfig c = TinyModel(tied);
    c.norm_eps = 0;
    auto base = GradientEngine::Random(c, static_cast<uint32_t>(rapidin::testing::FuzzSeed() + 40), o);
    ASSERT_TRUE(base.ok()) << base.status();
    ModelConfig t = c;
    t.dim = 2 * c.dim;
    t.n_heads = 2 * c.n_heads;
    t.n_kv_heads = 2 * c.n_kv_heads;
    t.hidden_dim = c.hidden_dim + 5;
    t.n_layers = c.n_layers + 1;
    auto grown = GradientEngine::Grow(**base, t, rapidin::testing::FuzzSeed() + 41, 0.3, o);
    ASSERT_TRUE(grown.ok()) << grown.status();
    EXPECT_EQ((*grown)->config().dim, t.dim);
    EXPECT_EQ((*grown)->config().n_layers, t.n_layers);
    std::mt19937 rng(static_cast<uint32_t>(rapidin::testing::FuzzSeed() + 42));
    for (int r = 0; r < 4; ++r) {
      TokenizedExample x;
      for (int i = 0; i < 12; ++i) x.ids.push_back(static_cast<int32_t>(rng() % c.vocab_size));
      x.response_begin = 4;
      const double lb = *(*base)->LossIds(x), lg = *(*grown)->LossIds(x);
      EXPECT_NEAR(lg, lb, 1e-10 * (1 + std::fabs(lb)));
    }
    // Training reaches the new dimensions: the new rows of layer 0's wo and the new embedding columns have
    // non-zero gradients (reading weights of later layers are random).
    TokenizedExample x;
    for (int i = 0; i < 12; ++i) x.ids.push_back(static_cast<int32_t>(rng() % c.vocab_size));
    x.response_begin = 4;
    std::vector<double> g;
    ASSERT_TRUE((*grown)->GradientIds(x, false, &g).ok());
    auto block_norm = [&](const std::string& name, int64_t row0, int64_t col0) {
      for (const auto& p : (*grown)->params()) {
        if (p.name != name) continue;
        const int64_t cols = t.dim;  // both are [rows, dim]
        double s = 0;
        for (int64_t i = 0; i < p.numel; ++i) {
          if (i / cols >= row0 && i % cols >= col0) s += g[p.offset + i] * g[p.offset + i];
        }
        return std::sqrt(s);
      }
      ADD_FAILURE() << "no parameter " << name;
      return 0.0;
    };
    EXPECT_GT(block_norm("layers.0.attention.wo.weight", c.dim, 0), 1e-8);
    EXPECT_GT(block_norm("tok_embeddings.weight", 0, c.dim), 1e-8);
    // Refusals: another head size, a smaller model, another vocabulary.
    ModelConfig bad = t;
    bad.n_heads = t.n_heads / 2;
    bad.n_kv_heads = t.n_kv_heads / 2;
    EXPECT_EQ(GradientEngine::Grow(**base, bad, 1, 0.1, o).status().code(), absl::StatusCode::kInvalidArgument);
    bad = t;
    bad.n_layers = 1;
    EXPECT_EQ(GradientEngine::Grow(**base, bad, 1, 0.1, o).status().code(), absl::StatusCode::kInvalidArgument);
    bad = t;
    bad.vocab_size = c.vocab_size + 1;
    EXPECT_EQ(GradientEngine::Grow(**base, bad, 1, 0.1, o).status().code(), absl::StatusCode::kInvalidArgument);
  }
}

}  // namespace
}  // namespace rapidin::model
