// Mutation tests of everything rapidin reads from users: model and tokenizer files (llama2.c, Hugging Face
// safetensors/config/SentencePiece, PEFT adapters), arbitrary bytes as text, and JSONL record and query lines.
// Each input must give either a working object or a Status: never a crash, a hang or a huge allocation. Run under
// scripts/sanitize.sh this also checks every byte read. The seed is fresh each run and printed (set
// RAPIDIN_FUZZ_SEED to replay one).
#include <gtest/gtest.h>

#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include "cache/cache.h"
#include "client/client.h"
#include "model/engine.h"
#include "model/featurizer.h"
#include "model/tokenizer.h"
#include "tests/test_util.h"

namespace rapidin {
namespace {

namespace fs = std::filesystem;
const std::string kHf = RAPIDIN_SOURCE_DIR "/tests/fixtures/hf_tiny";

// Prints the seed with every failure of the calling test.
#define FUZZ_TRACE() SCOPED_TRACE(rapidin::testing::FuzzReplay())

std::string ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

void WriteFile(const std::string& path, const std::string& bytes) {
  std::ofstream(path, std::ios::binary | std::ios::trunc) << bytes;
}

// Text that a user could send: random bytes, broken UTF-8, NULs, long runs, and real words.
std::string RandomText(std::mt19937_64& rng, int max_pieces = 40) {
  static const char* kPieces[] = {"Howdy!", " the", "\xc3\xa9", "\xe2\x9c\x93", "\xf0\x9f\x98\x80", "\xc3", "\xe2\x9c",
                                  "\xff", "\x80\x80", "\n\t", "  ", "<s>", "</s>", "42", "\\u0000"};
  std::string t;
  for (int i = 0, n = rng() % max_pieces; i < n; ++i) {
    switch (rng() % 3) {
      case 0: t += kPieces[rng() % 15]; break;
      case 1: t += static_cast<char>(rng()); break;
      default: t += std::string(1 + rng() % 8, static_cast<char>('a' + rng() % 26));
    }
  }
  if (rng() % 10 == 0) t.push_back('\0');
  return t;
}

void CheckEncoding(const model::Tokenizer& tok, const std::string& text) {
  const model::Encoding e = tok.Encode(text, true);
  ASSERT_EQ(e.ids.size(), e.spans.size());
  int32_t prev = 0;
  for (size_t i = 0; i < e.ids.size(); ++i) {
    ASSERT_GE(e.ids[i], 0);
    ASSERT_LT(e.ids[i], tok.vocab_size());
    ASSERT_LE(prev, e.spans[i].begin) << "spans go backwards at token " << i;
    ASSERT_LE(e.spans[i].begin, e.spans[i].end);
    ASSERT_LE(e.spans[i].end, static_cast<int32_t>(text.size()));
    prev = e.spans[i].begin;
    (void)tok.Piece(e.ids[i]);
  }
}

// Both tokenizers take any bytes: ids in range, spans inside the text and in order.
TEST(Robustness, TokenizersTakeAnyBytes) {
  FUZZ_TRACE();
  std::mt19937_64 rng(rapidin::testing::FuzzSeed());
  std::vector<std::unique_ptr<model::Tokenizer>> toks;
  auto sp = model::Tokenizer::Load(kHf + "/tokenizer.model", 320);
  ASSERT_TRUE(sp.ok()) << sp.status();
  toks.push_back(std::move(*sp));
  const std::string tok512 = rapidin::testing::SharedData() + "/models/tok512.bin";
  if (fs::exists(tok512)) {
    auto t = model::Tokenizer::Load(tok512, 512);
    ASSERT_TRUE(t.ok()) << t.status();
    toks.push_back(std::move(*t));
  } else {
    std::cout << "llama2.c tokenizer skipped: " << tok512 << " is absent\n";
  }
  for (int i = 0; i < 5000; ++i) {
    const std::string text = RandomText(rng);
    for (const auto& t : toks) ASSERT_NO_FATAL_FAILURE(CheckEncoding(*t, text)) << "text #" << i;
  }
}

// Mutated tokenizer files load or are refused; what loads still encodes within bounds.
TEST(Robustness, MutatedTokenizerFiles) {
  FUZZ_TRACE();
  std::mt19937_64 rng(rapidin::testing::FuzzSeed() + 1);
  rapidin::testing::TempDir dir;
  struct Case { std::string path; int32_t vocab; size_t hot; };
  std::vector<Case> cases = {{kHf + "/tokenizer.model", 320, 256}};
  const std::string tok512 = rapidin::testing::SharedData() + "/models/tok512.bin";
  if (fs::exists(tok512)) cases.push_back({tok512, 512, 64});
  int loaded = 0, refused = 0;
  for (const auto& c : cases) {
    const std::string good = ReadFile(c.path);
    const std::string path = dir.path(fs::path(c.path).filename());
    for (int i = 0; i < 600; ++i) {
      WriteFile(path, rapidin::testing::Mutate(good, c.hot, rng));
      auto t = model::Tokenizer::Load(path, c.vocab);
      if (!t.ok()) {
        ++refused;
        EXPECT_FALSE(t.status().message().empty());
        continue;
      }
      ++loaded;
      for (int j = 0; j < 5; ++j) ASSERT_NO_FATAL_FAILURE(CheckEncoding(**t, RandomText(rng))) << c.path << " #" << i;
    }
  }
  std::cout << "mutated tokenizers: " << loaded << " loaded, " << refused << " refused\n";
  EXPECT_GT(refused, 0);
}

// Loads `opts`; when it loads, the model must also run (a NaN loss is fine, a crash is not).
void LoadAndRun(const model::EngineOptions& opts, int* loaded, int* refused) {
  const auto t0 = std::chrono::steady_clock::now();
  auto e = model::GradientEngine::Load(opts);
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  EXPECT_LT(s, 20.0) << "a mutated file took " << s << " s to load or refuse";
  if (!e.ok()) {
    ++*refused;
    EXPECT_FALSE(e.status().message().empty());
    return;
  }
  ++*loaded;
  int64_t n = 0;
  (void)(*e)->MeanNll("Once upon a time there was a dog.", &n);
}

// Mutated llama2.c checkpoints (header and weights) and tokenizers.
TEST(Robustness, MutatedLlama2cCheckpoints) {
  FUZZ_TRACE();
  const std::string model = rapidin::testing::SharedData() + "/models/stories260K.bin";
  if (!fs::exists(model)) GTEST_SKIP() << model << " is absent (set RAPIDIN_SHARED_DATA)";
  std::mt19937_64 rng(rapidin::testing::FuzzSeed() + 2);
  rapidin::testing::TempDir dir;
  const std::string good = ReadFile(model);
  fs::copy_file(rapidin::testing::SharedData() + "/models/tok512.bin", dir.path("tok512.bin"));
  model::EngineOptions o;
  o.model_path = dir.path("model.bin");
  o.tokenizer_path = dir.path("tok512.bin");
  int loaded = 0, refused = 0;
  for (int i = 0; i < 400; ++i) {
    WriteFile(o.model_path, rapidin::testing::Mutate(good, 28, rng));  // 28 bytes: the header's 7 int32 fields
    ASSERT_NO_FATAL_FAILURE(LoadAndRun(o, &loaded, &refused)) << "case " << i;
  }
  // Every header field set to every extreme and near value, one at a time.
  int32_t hdr[7];
  std::memcpy(hdr, good.data(), sizeof hdr);
  for (int f = 0; f < 7; ++f) {
    for (int64_t v : {int64_t{0}, int64_t{-1}, int64_t{1}, int64_t{2}, int64_t{INT32_MAX}, int64_t{INT32_MIN},
                      int64_t{hdr[f]} - 1, int64_t{hdr[f]} + 1, int64_t{hdr[f]} * 2, -int64_t{hdr[f]}}) {
      std::string bytes = good;
      const int32_t x = static_cast<int32_t>(v);
      std::memcpy(&bytes[4 * f], &x, 4);
      WriteFile(o.model_path, bytes);
      ASSERT_NO_FATAL_FAILURE(LoadAndRun(o, &loaded, &refused)) << "header field " << f << " = " << x;
    }
  }
  std::cout << "mutated checkpoints: " << loaded << " loaded, " << refused << " refused\n";
  EXPECT_GT(refused, 0);
}

// Mutated Hugging Face directories: config.json, the shard index, a safetensors shard, the adapter's files.
TEST(Robustness, MutatedHuggingFaceFiles) {
  FUZZ_TRACE();
  std::mt19937_64 rng(rapidin::testing::FuzzSeed() + 3);
  rapidin::testing::TempDir dir;
  fs::copy(kHf, dir.path("m"), fs::copy_options::recursive);
  model::EngineOptions o;
  o.model_path = dir.path("m");
  o.adapter_path = dir.path("m/adapter");
  const std::vector<std::pair<std::string, size_t>> files = {
      {"config.json", 0},       {"model.safetensors.index.json", 0}, {"model-00002-of-00003.safetensors", 512},
      {"tokenizer.model", 256}, {"adapter/adapter_config.json", 0},  {"adapter/adapter_model.safetensors", 512}};
  int loaded = 0, refused = 0;
  for (const auto& [name, hot] : files) {
    const std::string path = dir.path("m/" + name), good = ReadFile(path);
    for (int i = 0; i < 150; ++i) {
      WriteFile(path, rapidin::testing::Mutate(good, hot, rng));
      ASSERT_NO_FATAL_FAILURE(LoadAndRun(o, &loaded, &refused)) << name << " case " << i;
    }
    WriteFile(path, good);
  }
  std::cout << "mutated HF files: " << loaded << " loaded, " << refused << " refused\n";
  EXPECT_GT(refused, 0);
  int l2 = 0, r2 = 0;
  LoadAndRun(o, &l2, &r2);
  EXPECT_EQ(l2, 1) << "the restored directory must load again";
}

// JSONL lines for `rapidin ingest` and `rapidin query`: every mutation of a valid line parses or is refused with
// INVALID_ARGUMENT.
TEST(Robustness, MutatedJsonLines) {
  FUZZ_TRACE();
  std::mt19937_64 rng(rapidin::testing::FuzzSeed() + 4);
  const std::vector<std::string> records = {
      R"({"id": "a-1", "instruction": "List 3 fruits", "input": "", "output": "apple, pear, fig", "vector": [0.5, -1, 2e-3]})",
      R"({"id": "b", "text": "Howdy! caf\u00e9", "metadata": {"source": "x"}})",
      R"({"instruction": "Say hi", "output": "Howdy!"})"};
  const std::vector<std::string> queries = {R"({"vector": [1, 2.5, -3], "weight": 0.25})", R"([0.1, 0.2, 0.3])"};
  int ok = 0, refused = 0;
  for (int i = 0; i < 20000; ++i) {
    std::string line = (i % 2 ? records[rng() % records.size()] : queries[rng() % queries.size()]);
    for (int m = 0, n = 1 + rng() % 3; m < n; ++m) line = rapidin::testing::Mutate(line, 0, rng);
    const absl::Status st = i % 2 ? client::ParseRecordLine(line).status() : client::ParseQueryLine(line).status();
    if (st.ok()) {
      ++ok;
    } else {
      ++refused;
      EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument) << st << "\nline: " << line;
    }
  }
  std::cout << "mutated lines: " << ok << " parsed, " << refused << " refused\n";
  EXPECT_GT(ok, 0);
  EXPECT_GT(refused, 0);
}

// Any text as instruction, input, generation and hotwords reaches the featurizer: a finite K-vector (and finite
// token sketches for the response), or INVALID_ARGUMENT / FAILED_PRECONDITION with a message.
TEST(Robustness, AnyTextThroughTheFeaturizer) {
  FUZZ_TRACE();
  const std::string data = rapidin::testing::SharedData() + "/models/";
  if (!fs::exists(data + "stories260K.bin")) GTEST_SKIP() << data << "stories260K.bin is absent (set RAPIDIN_SHARED_DATA)";
  std::mt19937_64 rng(rapidin::testing::FuzzSeed() + 6);
  model::FeaturizerOptions o;
  o.engine.model_path = data + "stories260K.bin";
  o.engine.tokenizer_path = data + "tok512.bin";
  o.engine.max_length = 160;  // long texts get truncated
  o.k = 128;
  auto f = model::Featurizer::Create(o);
  ASSERT_TRUE(f.ok()) << f.status();
  int ok = 0, refused = 0;
  for (int i = 0; i < 40; ++i) {
    model::Example ex{RandomText(rng, 8), rng() % 2 ? "" : RandomText(rng, 6), RandomText(rng), {}};
    for (int h = 0, n = rng() % 3; h < n; ++h) {
      ex.hotwords.push_back(rng() % 2 && !ex.output.empty() ? ex.output.substr(rng() % ex.output.size(), 1 + rng() % 4)
                                                             : RandomText(rng));
    }
    std::vector<float> v;
    auto info = (*f)->Compress(ex, &v);
    if (!info.ok()) {
      ++refused;
      const auto c = info.status().code();
      EXPECT_TRUE(c == absl::StatusCode::kInvalidArgument || c == absl::StatusCode::kFailedPrecondition)
          << info.status();
      EXPECT_FALSE(info.status().message().empty());
      continue;
    }
    ASSERT_EQ(v.size(), 128u);
    for (float x : v) ASSERT_TRUE(std::isfinite(x));
    if (++ok > 3) continue;  // per-token sketches cost O(tokens^2): a few are enough
    auto t = (*f)->engine().Tokenize(ex);
    ASSERT_TRUE(t.ok()) << t.status();
    std::vector<std::vector<float>> tokens;
    const absl::Status ts = (*f)->TokenSketches(t->ids, t->response_begin, &tokens);
    ASSERT_TRUE(ts.ok()) << ts;
    EXPECT_EQ(tokens.size(), t->ids.size() - t->response_begin);
  }
  std::cout << "random examples: " << ok << " compressed, " << refused << " refused\n";
  EXPECT_GT(ok, 0);
}

// Training-data files for `rapidin cache` (a JSON array or JSONL): any edit gives records, bad records with their
// place, or INVALID_ARGUMENT; every record returned has an id and an output.
TEST(Robustness, MutatedInstructionFiles) {
  FUZZ_TRACE();
  std::mt19937_64 rng(rapidin::testing::FuzzSeed() + 5);
  rapidin::testing::TempDir dir;
  const std::string array =
      R"([{"instruction": "List 3 fruits", "input": "", "output": "apple, pear, fig"},)"
      R"( {"id": "b", "instruction": "Say hi", "output": "Howdy! caf\u00e9"},)"
      R"( {"instruction": "Add", "input": "2 and 3", "output": "5"}])";
  const std::string jsonl = R"({"instruction": "a", "output": "b"})" "\n" R"({"id": "x", "instruction": "c", "output": "d"})"
                            "\n" R"({"instruction": "e", "input": "f", "output": "g"})" "\n";
  int records = 0, bad_records = 0, refused = 0;
  for (int i = 0; i < 600; ++i) {
    const bool is_array = i % 2;
    std::string text = is_array ? array : jsonl;
    for (int m = 0, n = 1 + rng() % 3; m < n; ++m) text = rapidin::testing::Mutate(text, 0, rng);
    const std::string path = dir.path(is_array ? "train.json" : "train.jsonl");
    WriteFile(path, text);
    std::vector<cache::BadRecord> bad;
    auto recs = cache::ReadInstructionData(path, &bad);
    if (!recs.ok()) {
      ++refused;
      EXPECT_EQ(recs.status().code(), absl::StatusCode::kInvalidArgument) << recs.status();
      continue;
    }
    for (const auto& r : *recs) {
      EXPECT_FALSE(r.id.empty());
      EXPECT_FALSE(r.example.output.empty());
    }
    for (const auto& b : bad) EXPECT_FALSE(b.where.empty() || b.reason.empty());
    records += static_cast<int>(recs->size());
    bad_records += static_cast<int>(bad.size());
  }
  std::cout << "mutated data files: " << records << " records, " << bad_records << " bad records, " << refused
            << " files refused\n";
  EXPECT_GT(records, 0);
}

}  // namespace
}  // namespace rapidin
