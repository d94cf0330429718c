// Hugging Face tokenizer.json (byte-level BPE) and SentencePiece NFKC against the libraries themselves:
// tests/fixtures/tokenizers was written by scripts/make_tokenizer_fixtures.py with `tokenizers` 0.21 and
// `sentencepiece`. Ids must be equal; spans too, compared in characters as `tokenizers` reports them.
#include <gtest/gtest.h>

#include <fstream>
#include <random>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "model/tokenizer.h"
#include "sentencepiece/model_min.pb.h"
#include "tests/test_util.h"

namespace rapidin::model {
namespace {

const std::string kRoot = RAPIDIN_SOURCE_DIR "/tests/fixtures/tokenizers/";

nlohmann::json ReadJson(const std::string& path) {
  std::ifstream in(path);
  return nlohmann::json::parse(in);
}

// Byte span -> character span: the character holding the first byte, and one past the character holding the
// last byte (an empty span stays empty at its start), as tokenizers converts its byte offsets.
std::pair<int, int> CharSpan(const std::string& text, Span sp) {
  auto holder = [&](int32_t b) {
    if (b >= static_cast<int32_t>(text.size())) {
      int n = 0;
      for (unsigned char c : text) n += (c & 0xC0) != 0x80;
      return n;
    }
    int n = -1;
    for (int32_t i = 0; i <= b; ++i) n += (static_cast<unsigned char>(text[i]) & 0xC0) != 0x80;
    return n;
  };
  const int b = holder(sp.begin);
  return {b, sp.end > sp.begin ? holder(sp.end - 1) + 1 : b};
}

class TokenizerJson : public ::testing::TestWithParam<std::string> {};

TEST_P(TokenizerJson, IdsAndOffsetsEqualTokenizers) {
  const std::string dir = kRoot + GetParam();
  auto tok = Tokenizer::Load(dir + "/tokenizer.json", 100000);
  ASSERT_TRUE(tok.ok()) << tok.status();
  const auto ref = ReadJson(dir + "/reference.json");
  int texts = 0;
  for (const auto& c : ref["corpus"]) {
    const std::string text = c["text"].get<std::string>();
    const auto want = c["ids"].get<std::vector<int32_t>>();
    const auto offsets = c["char_offsets"].get<std::vector<std::pair<int, int>>>();
    Encoding e = (*tok)->Encode(text, false);
    std::vector<int32_t> ids;
    std::vector<std::pair<int, int>> spans;
    if ((*tok)->bos() >= 0) {  // the post-processor's template puts BOS first (an empty span)
      ids.push_back((*tok)->bos());
      spans.push_back({0, 0});
    }
    ids.insert(ids.end(), e.ids.begin(), e.ids.end());
    for (const Span& sp : e.spans) spans.push_back(CharSpan(text, sp));
    EXPECT_EQ(ids, want) << "text: " << text;
    EXPECT_EQ(spans, offsets) << "text: " << text;
    ++texts;
  }
  EXPECT_EQ(texts, 20);
}

TEST_P(TokenizerJson, PiecesDecodeToTheTextAndSpecialTokensAreNamed) {
  const std::string dir = kRoot + GetParam();
  auto tok = Tokenizer::Load(dir + "/tokenizer.json", 100000);
  ASSERT_TRUE(tok.ok()) << tok.status();
  const std::string text = "caf\u00e9 \u4eca\u65e5 \U0001F600 ok";
  Encoding e = (*tok)->Encode(text, false);
  std::string back;
  for (int32_t id : e.ids) back += (*tok)->Piece(id);
  EXPECT_EQ(back, text);  // byte-level pieces concatenate to the bytes (NFC/NFKC leave this text as it is)
  EXPECT_GE((*tok)->TokenId("<|endoftext|>") >= 0 || (*tok)->TokenId("<|eot_id|>") >= 0, true);
  EXPECT_EQ((*tok)->TokenId("no such token"), -1);
  EXPECT_GE((*tok)->eos(), 0);  // from tokenizer_config.json
}

INSTANTIATE_TEST_SUITE_P(Fixtures, TokenizerJson, ::testing::Values("qwen2", "llama3", "gpt2"));

TEST(TokenizerJsonFile, WhatIsNotImplementedIsRefusedByName) {
  rapidin::testing::TempDir dir;
  auto base = ReadJson(kRoot + "qwen2/tokenizer.json");
  auto refused = [&](const nlohmann::json& j, const std::string& words) {
    std::ofstream(dir.path("tokenizer.json")) << j.dump();
    auto t = Tokenizer::Load(dir.path("tokenizer.json"), 100000);
    ASSERT_FALSE(t.ok()) << words;
    EXPECT_NE(t.status().message().find(words), std::string::npos) << t.status();
  };
  auto j = base;
  j["model"]["type"] = "Unigram";
  refused(j, "Unigram");
  j = base;
  j["normalizer"] = {{"type", "Lowercase"}};
  refused(j, "Lowercase");
  j = base;
  j["pre_tokenizer"] = {{"type", "Metaspace"}, {"replacement", "\u2581"}};
  refused(j, "Metaspace");
  j = base;
  j["added_tokens"][0]["lstrip"] = true;
  refused(j, "lstrip");
  j = base;
  j["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = "(unclosed";
  refused(j, "regex");
  std::ofstream(dir.path("tokenizer.json")) << "{\"model\": ";
  auto t = Tokenizer::Load(dir.path("tokenizer.json"), 100000);
  EXPECT_EQ(t.status().code(), absl::StatusCode::kDataLoss);
  t = Tokenizer::Load(kRoot + "qwen2/tokenizer.json", 10);  // more tokens than the model's vocabulary
  EXPECT_EQ(t.status().code(), absl::StatusCode::kInvalidArgument);
}

// SentencePiece's nmt_nfkc normaliser (tests/fixtures/hf_tiny/tokenizer.model) against libsentencepiece on text
// that NFKC changes: ligatures, full-width letters, circled digits, fractions, decomposed accents.
TEST(SentencePieceNfkc, IdsAndSpansEqualSentencePiece) {
  auto tok = Tokenizer::Load(RAPIDIN_SOURCE_DIR "/tests/fixtures/hf_tiny/tokenizer.model", 320);
  ASSERT_TRUE(tok.ok()) << tok.status();
  const auto ref = ReadJson(kRoot + "nfkc.json");
  for (const auto& c : ref["texts"]) {
    const std::string text = c["text"].get<std::string>();
    Encoding e = (*tok)->Encode(text, true);
    EXPECT_EQ(e.ids, c["ids"].get<std::vector<int32_t>>()) << text;
    std::vector<int32_t> b, en;
    for (const Span& sp : e.spans) {
      b.push_back(sp.begin);
      en.push_back(sp.end);
    }
    EXPECT_EQ(b, c["begin"].get<std::vector<int32_t>>()) << text;
    EXPECT_EQ(en, c["end"].get<std::vector<int32_t>>()) << text;
  }
}

// A SentencePiece model whose character map is broken, or that puts whitespace after words, is refused by name;
// one whose map was corrupted in place still encodes anything without reading outside it, and every span lies in
// the input, in order.
TEST(SentencePieceNfkc, BrokenMapsAndArbitraryBytes) {
  const std::string path = RAPIDIN_SOURCE_DIR "/tests/fixtures/hf_tiny/tokenizer.model";
  rapidin::sentencepiece::ModelProto m;
  {
    std::ifstream in(path, std::ios::binary);
    ASSERT_TRUE(m.ParseFromIstream(&in));
  }
  ASSERT_GT(m.normalizer_spec().precompiled_charsmap().size(), 1000u);
  rapidin::testing::TempDir dir;
  auto load = [&](const rapidin::sentencepiece::ModelProto& mm) {
    std::ofstream(dir.path("t.model"), std::ios::binary) << mm.SerializeAsString();
    return Tokenizer::Load(dir.path("t.model"), 320);
  };
  for (const std::string blob : {std::string("\x05\x00"), std::string("\xff\xff\xff\x7f....", 8),
                                 std::string("\x06\x00\x00\x00abcdefgh", 12)}) {
    auto bad = m;
    bad.mutable_normalizer_spec()->set_precompiled_charsmap(blob);
    auto t = load(bad);
    EXPECT_EQ(t.status().code(), absl::StatusCode::kDataLoss) << t.status();
  }
  auto suffix = m;
  suffix.mutable_trainer_spec()->set_treat_whitespace_as_suffix(true);
  EXPECT_EQ(load(suffix).status().code(), absl::StatusCode::kUnimplemented);

  std::mt19937 rng(static_cast<uint32_t>(rapidin::testing::FuzzSeed()));
  SCOPED_TRACE(rapidin::testing::FuzzReplay());
  auto corrupt = m;
  std::string* blob = corrupt.mutable_normalizer_spec()->mutable_precompiled_charsmap();
  for (int i = 0; i < 2000; ++i) (*blob)[4 + rng() % (blob->size() - 4)] = static_cast<char>(rng());
  for (const auto* mm : {&m, &corrupt}) {
    auto t = load(*mm);
    ASSERT_TRUE(t.ok()) << t.status();
    for (int r = 0; r < 300; ++r) {
      std::string text(rng() % 40, '\0');
      for (char& c : text) c = static_cast<char>(rng() % 4 == 0 ? "\t\n \xe2\x80\x8b\xff"[rng() % 8] : rng());
      const Encoding e = (*t)->Encode(text, true);
      ASSERT_EQ(e.ids.size(), e.spans.size());
      int32_t prev = 0;
      for (size_t i = 0; i < e.spans.size(); ++i) {
        EXPECT_GE(e.ids[i], 0);
        EXPECT_LT(e.ids[i], 320);
        EXPECT_LE(prev, e.spans[i].begin);
        EXPECT_LE(e.spans[i].begin, e.spans[i].end);
        EXPECT_LE(e.spans[i].end, static_cast<int32_t>(text.size()));
        prev = e.spans[i].begin;
      }
    }
  }
}

}  // namespace
}  // namespace rapidin::model
