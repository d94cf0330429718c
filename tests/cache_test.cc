// cache/ + query by text: bad records reported with their line numbers and skipped, resumable caching,
// refusal of a store made with another projection state, and a record's own text ranking it first.
#include <gtest/gtest.h>
#include <zlib.h>

#include <algorithm>
#include <cmath>
#include <filesystem>

#include <cstdlib>
#include <fstream>

#include "cache/cache.h"
#include "cache/finetune.h"
#include "client/client.h"
#include "model/engine.h"
#include "model/featurizer.h"
#include "model/training.h"
#include "server/server.h"
#include "storage/store.h"
#include "tests/test_util.h"
#include "tests/tmpfs.h"

namespace rapidin::cache {
namespace {

using client::Client;
using rapidin::testing::SharedData;
std::string ModelPath() { return SharedData() + "/models/stories260K.bin"; }
#define REQUIRE_SHARED_DATA()                                                                  \
  if (!std::ifstream(ModelPath()).good())                                                      \
  GTEST_SKIP() << "shared data not found at " << SharedData() << " (set RAPIDIN_SHARED_DATA)"

// `rapidin eval --json` lines: a generation cut inside a multi-byte character (byte-fallback tokens) still gives
// valid JSON, with U+FFFD for the bad bytes and every valid character kept (it aborted the process before).
TEST(EvalJsonLine, InvalidUtf8InAGenerationIsReplacedNotFatal) {
  EvalRecord e;
  e.id = "query-1";
  e.loss = 2.5;
  e.response_tokens = 7;
  e.generation = std::string("caf\xc3\xa9 ok \xc2") + "'s \xe2\x82";  // "café ok", a cut "§", a cut "€"
  const std::string line = EvalJsonLine(e, true);
  EXPECT_NE(line.find("\"id\":\"query-1\""), std::string::npos) << line;
  EXPECT_NE(line.find("caf\xc3\xa9 ok \xef\xbf\xbd's \xef\xbf\xbd"), std::string::npos) << line;
  EXPECT_EQ(EvalJsonLine(e, false).find("generation"), std::string::npos);
}

TEST(ReadInstructionData, ReportsBadRecordsWithLineNumbers) {
  rapidin::testing::TempDir dir;
  const std::string path = dir.path("train.jsonl");
  std::ofstream(path) << R"({"instruction": "a", "output": "b"})" << "\n"
                      << R"({"instruction": "c", "output": ""})" << "\n"
                      << "{broken\n"
                      << R"({"output": "d"})" << "\n\n"
                      << R"({"id": "x", "instruction": "e", "input": 5, "output": "f"})" << "\n"
                      << R"({"id": "x", "instruction": "g", "output": "h"})" << "\n"
                      << R"({"id": "x", "instruction": "i", "output": "j"})" << "\n";
  std::vector<BadRecord> bad;
  auto recs = ReadInstructionData(path, &bad);
  ASSERT_TRUE(recs.ok()) << recs.status();
  ASSERT_EQ(recs->size(), 2u);
  EXPECT_EQ((*recs)[0].id, "train-0");
  EXPECT_EQ((*recs)[1].id, "x");
  ASSERT_EQ(bad.size(), 5u);
  EXPECT_EQ(bad[0].where, path + ":2");
  EXPECT_EQ(bad[0].reason, "empty output");
  EXPECT_EQ(bad[1].where, path + ":3");
  EXPECT_EQ(bad[1].reason, "malformed JSON");
  EXPECT_EQ(bad[2].reason, "missing \"instruction\"");
  EXPECT_EQ(bad[3].where, path + ":6");
  EXPECT_EQ(bad[3].reason, "\"input\" is not a string");
  EXPECT_EQ(bad[4].reason, "duplicate id \"x\"");
  EXPECT_EQ(ReadInstructionData(dir.path("none.json"), &bad).status().code(), absl::StatusCode::kNotFound);
  std::ofstream(dir.path("arr.json")) << "[{\"instruction\": 1";
  EXPECT_EQ(ReadInstructionData(dir.path("arr.json"), &bad).status().code(), absl::StatusCode::kInvalidArgument);
}

// Chat and plain-text records mix with Alpaca ones; a chat without an assistant turn, or with a malformed
// message, is a bad record with its reason.
TEST(ReadInstructionData, ChatAndTextRecords) {
  rapidin::testing::TempDir dir;
  const std::string path = dir.path("mixed.json");
  std::ofstream(path) << R"([
    {"instruction": "a", "output": "b"},
    {"id": "chat-1", "messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                                  {"role": "assistant", "content": "x"}]},
    {"text": "plain words"},
    {"messages": [{"role": "user", "content": "only a question"}]},
    {"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]},
    {"messages": []},
    {"text": ""}
  ])";
  std::vector<BadRecord> bad;
  auto recs = ReadInstructionData(path, &bad);
  ASSERT_TRUE(recs.ok()) << recs.status();
  ASSERT_EQ(recs->size(), 3u);
  EXPECT_EQ((*recs)[0].example.format, model::RecordFormat::kAlpaca);
  EXPECT_EQ((*recs)[1].id, "chat-1");
  EXPECT_EQ((*recs)[1].example.format, model::RecordFormat::kChat);
  ASSERT_EQ((*recs)[1].example.messages.size(), 3u);
  EXPECT_EQ((*recs)[1].example.messages[2].role, "assistant");
  EXPECT_EQ((*recs)[2].example.format, model::RecordFormat::kText);
  EXPECT_EQ((*recs)[2].example.text, "plain words");
  EXPECT_EQ((*recs)[2].id, "mixed-2");
  ASSERT_EQ(bad.size(), 4u);
  EXPECT_NE(bad[0].reason.find("assistant turn"), std::string::npos) << bad[0].reason;
  EXPECT_NE(bad[1].reason.find("messages[0]"), std::string::npos) << bad[1].reason;
  EXPECT_NE(bad[2].reason.find("non-empty array"), std::string::npos) << bad[2].reason;
  EXPECT_EQ(bad[3].reason, "empty text");
}

// .jsonl.gz and .json.gz read exactly like the plain files (ids too: train.jsonl.gz gives train-N); a truncated
// gzip file is refused whole, naming it.
TEST(ReadInstructionData, GzipFilesReadLikePlainOnesAndTruncatedOnesAreRefused) {
  rapidin::testing::TempDir dir;
  std::string lines;
  for (int i = 0; i < 300; ++i) {
    lines += "{\"instruction\": \"instruction " + std::to_string(i) + " caf\u00e9\", \"output\": \"output " +
             std::to_string(i * 7) + "\"}\n";
  }
  const std::string array = "[" + std::string(R"({"instruction": "a", "input": "b", "output": "c"})") + "]";
  auto gzip = [](const std::string& path, const std::string& body) {
    gzFile f = gzopen(path.c_str(), "wb");
    ASSERT_NE(f, nullptr);
    ASSERT_EQ(gzwrite(f, body.data(), static_cast<unsigned>(body.size())), static_cast<int>(body.size()));
    gzclose(f);
  };
  std::ofstream(dir.path("train.jsonl")) << lines;
  gzip(dir.path("train.jsonl.gz"), lines);
  std::ofstream(dir.path("arr.json")) << array;
  gzip(dir.path("arr.json.gz"), array);
  for (const auto& [plain, packed] : {std::pair<std::string, std::string>{"train.jsonl", "train.jsonl.gz"},
                                      {"arr.json", "arr.json.gz"}}) {
    std::vector<BadRecord> bad;
    auto a = ReadInstructionData(dir.path(plain), &bad);
    auto b = ReadInstructionData(dir.path(packed), &bad);
    ASSERT_TRUE(a.ok() && b.ok()) << a.status() << b.status();
    EXPECT_TRUE(bad.empty());
    ASSERT_EQ(a->size(), b->size());
    for (size_t i = 0; i < a->size(); ++i) {
      EXPECT_EQ((*a)[i].id, (*b)[i].id);
      EXPECT_EQ((*a)[i].example.instruction, (*b)[i].example.instruction);
      EXPECT_EQ((*a)[i].example.output, (*b)[i].example.output);
    }
  }
  std::vector<BadRecord> bad;
  EXPECT_EQ((*ReadInstructionData(dir.path("train.jsonl.gz"), &bad))[299].id, "train-299");
  const std::string cut = dir.path("cut.jsonl.gz");
  std::filesystem::copy_file(dir.path("train.jsonl.gz"), cut);
  std::filesystem::resize_file(cut, std::filesystem::file_size(cut) / 2);
  auto st = ReadInstructionData(cut, &bad).status();
  EXPECT_EQ(st.code(), absl::StatusCode::kDataLoss) << st;
  EXPECT_NE(st.message().find("cut.jsonl.gz"), std::string::npos) << st;
  EXPECT_EQ(ReadInstructionData(dir.path("none.jsonl.gz"), &bad).status().code(), absl::StatusCode::kNotFound);
}

class CacheTest : public ::testing::Test {
 protected:
  void SetUp() override {
    data_ = dir_.path("train.json");
    std::ofstream(data_) << R"([
      {"instruction": "Name a color.", "input": "", "output": "Blue is a color of the sky."},
      {"instruction": "Add the numbers.", "input": "2 and 3", "output": "The sum is 5."},
      {"instruction": "Write a story about a dog.", "input": "", "output": "Once upon a time a dog ran home."},
      {"instruction": "Translate to French.", "input": "cat", "output": ""},
      {"instruction": "Give a greeting.", "input": "", "output": "Howdy! Nice to meet you."},
      {"instruction": "List two fruits.", "input": "", "output": "Apple and banana."}
    ])";
    o_.featurizer.engine.model_path = ModelPath();
    o_.featurizer.engine.tokenizer_path = SharedData() + "/models/tok512.bin";
    o_.featurizer.k = 512;
    o_.data_path = data_;
    o_.store_path = dir_.path("store");
    o_.threads = 2;
    o_.batch_size = 2;
    o_.progress = false;
  }
  // Options for a loopback server with the model over the cached store.
  server::ServerOptions ModelServer() const {
    server::ServerOptions so;
    so.store.path = o_.store_path;
    so.net.listen = "127.0.0.1:0";
    so.net.metrics_listen = "";
    so.store.shards = 2;
    so.model.path = ModelPath();
    return so;
  }
  // Full fine-tuning of the model on the fixture's records, batch 2, quiet; out_name in the temp dir.
  FinetuneOptions FullFinetune(const std::string& out_name) const {
    FinetuneOptions fo;
    fo.engine = o_.featurizer.engine;
    fo.data_path = data_;
    fo.out_path = dir_.path(out_name);
    fo.mode = "full";
    fo.batch_size = 2;
    fo.progress = false;
    return fo;
  }
  static std::unique_ptr<Client> ClientFor(const server::Server& s) {
    return Client::Connect("127.0.0.1:" + std::to_string(s.port()));
  }

  rapidin::testing::TempDir dir_;
  std::string data_;
  CacheOptions o_;
};

TEST_F(CacheTest, CachesResumesAndRefusesOtherState) {
  REQUIRE_SHARED_DATA();
  o_.limit = 3;  // the first three records (as if a run was killed after them)
  auto s = RunCache(o_);
  ASSERT_TRUE(s.ok()) << s.status();
  EXPECT_EQ(s->cached, 3);
  o_.limit = 0;
  s = RunCache(o_);
  ASSERT_TRUE(s.ok()) << s.status();
  EXPECT_EQ(s->skipped_existing, 3);
  EXPECT_EQ(s->cached, 2);
  EXPECT_EQ(s->bad, 1);
  EXPECT_EQ(s->bad_records[0].where, data_ + " record 4");
  EXPECT_EQ(s->store_records, 5);
  EXPECT_GT(s->mean_loss, 0);
  o_.featurizer.seed = 99;
  auto other = RunCache(o_);
  EXPECT_EQ(other.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(other.status().message().find("seed: store 0, model 99"), std::string::npos) << other.status();
}

// The workers run ahead into the next batches while the writer stores one: two threads over batches of two
// records store, record by record, exactly what one thread stores in one batch.
TEST_F(CacheTest, PipelinedBatchesStoreWhatOneThreadStores) {
  REQUIRE_SHARED_DATA();
  auto piped = RunCache(o_);  // 2 threads, batches of 2
  ASSERT_TRUE(piped.ok()) << piped.status();
  CacheOptions one = o_;
  one.threads = 1;
  one.batch_size = 64;
  one.store_path = dir_.path("store-one");
  auto single = RunCache(one);
  ASSERT_TRUE(single.ok()) << single.status();
  EXPECT_EQ(piped->cached, 5);
  EXPECT_EQ(single->cached, piped->cached);
  EXPECT_EQ(single->bad, piped->bad);
  auto a = storage::Store::Open(o_.store_path, storage::StoreOptions());
  auto b = storage::Store::Open(one.store_path, storage::StoreOptions());
  ASSERT_TRUE(a.ok() && b.ok());
  ASSERT_EQ((*a)->size(), (*b)->size());
  for (uint64_t i = 0; i < (*a)->size(); ++i) {  // ingest order is the file's order in both
    auto ra = (*a)->GetRecordByIndex(i);
    auto rb = (*b)->GetRecordByIndex(i);
    ASSERT_TRUE(ra.ok() && rb.ok());
    EXPECT_EQ(ra->record().id(), rb->record().id());
    auto va = (*a)->GetVector(i);
    auto vb = (*b)->GetVector(i);
    ASSERT_TRUE(va.ok() && vb.ok());
    EXPECT_EQ(*va, *vb) << ra->record().id();
  }
}

// The disk fills under the store while the workers run ahead: the run stops them and returns the store's
// RESOURCE_EXHAUSTED (no hang, no crash), the batches written before stay, and with space again a rerun resumes
// and caches the rest.
TEST_F(CacheTest, FullDiskStopsTheRunAndARerunResumes) {
  REQUIRE_SHARED_DATA();
  std::filesystem::create_directories(dir_.path("full"));
  rapidin::testing::Tmpfs fs(dir_.path("full"), "2m");
  if (!fs.mounted()) GTEST_SKIP() << "cannot mount a tmpfs here (needs root): the full-disk test does not run";
  // 60 records with 60 KB outputs (truncated for the gradient, stored whole): more text than the 2 MB disk holds.
  const std::string data = dir_.path("long.jsonl");
  {
    std::ofstream out(data);
    std::string words;
    for (int i = 0; i < 12000; ++i) words += "word ";
    for (int i = 0; i < 60; ++i) {
      out << R"({"id": "long-)" << i << R"(", "instruction": "Say it again.", "output": ")" << words << "\"}\n";
    }
  }
  o_.data_path = data;
  o_.store_path = dir_.path("full/store");
  auto full = RunCache(o_);
  ASSERT_FALSE(full.ok());
  EXPECT_EQ(full.status().code(), absl::StatusCode::kResourceExhausted) << full.status();
  ASSERT_TRUE(fs.Resize("64m"));
  auto again = RunCache(o_);
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_GT(again->skipped_existing, 0);  // what the first run wrote is still there
  EXPECT_EQ(again->skipped_existing + again->cached, 60);
  EXPECT_EQ(again->store_records, 60);
}

TEST_F(CacheTest, QueryByTextFindsTheRecordItself) {
  REQUIRE_SHARED_DATA();
  ASSERT_TRUE(RunCache(o_).ok());
  server::ServerOptions so = ModelServer();
  so.model.tokenizer_path = o_.featurizer.engine.tokenizer_path;
  auto srv = server::Server::Create(so);
  ASSERT_TRUE(srv.ok()) << srv.status();
  auto c = ClientFor(**srv);
  rapidin::v1::QueryRequest q;
  q.set_instruction("Give a greeting.");
  q.set_generation("Howdy! Nice to meet you.");
  q.set_top_k(3);
  q.set_harmful_k(1);
  auto r = c->Query(q);
  ASSERT_TRUE(r.ok()) << r.status();
  ASSERT_EQ(r->result().helpful_size(), 3);
  EXPECT_EQ(r->result().helpful(0).id(), "train-4");
  EXPECT_EQ(r->result().helpful(0).record().output(), "Howdy! Nice to meet you.");
  EXPECT_GT(r->generation_tokens(), 3u);
  EXPECT_TRUE(c->Stats()->model_loaded());
  EXPECT_EQ(c->Stats()->model_device(), so.model.device == "auto" && model::GetTorchRuntime().cuda_devices > 0
                                            ? "cuda:0"
                                            : "cpu");
  // The same vector through QueryByVector gives the same scores (one pipeline).
  q.set_generation("");
  EXPECT_EQ(c->Query(q).status().code(), absl::StatusCode::kInvalidArgument);
  q.set_generation("x");
  q.set_top_k(0);
  EXPECT_EQ(c->Query(q).status().code(), absl::StatusCode::kInvalidArgument);
}

// Strict UTF-8 (what proto3 string fields require).
bool IsUtf8(const std::string& s) {
  const auto* p = reinterpret_cast<const unsigned char*>(s.data());
  for (size_t i = 0; i < s.size();) {
    const unsigned char c = p[i];
    const size_t len = c < 0x80 ? 1 : (c >> 5) == 0x6 ? 2 : (c >> 4) == 0xe ? 3 : (c >> 3) == 0x1e ? 4 : 0;
    if (len == 0 || i + len > s.size()) return false;
    for (size_t k = 1; k < len; ++k) {
      if ((p[i + k] & 0xc0) != 0x80) return false;
    }
    i += len;
  }
  return true;
}

TEST_F(CacheTest, TokenAttributionsMapBackToTextAndAreDeterministic) {
  REQUIRE_SHARED_DATA();
  ASSERT_TRUE(RunCache(o_).ok());
  server::ServerOptions so = ModelServer();
  so.limits.max_attributed_records = 3;
  auto srv = server::Server::Create(so);
  ASSERT_TRUE(srv.ok()) << srv.status();
  auto c = ClientFor(**srv);
  rapidin::v1::QueryRequest q;
  q.set_instruction("Give a greeting.");
  // The cat (U+732B) is not in the 512-token vocabulary: byte tokens, each holding part of a UTF-8 character.
  q.set_generation("Howdy! Nice\nto meet you, \xe7\x8c\xab.");
  q.set_top_k(2);
  q.set_harmful_k(1);
  q.set_attributions(true);
  auto r = c->Query(q);
  ASSERT_TRUE(r.ok()) << r.status();
  auto again = c->Query(q);
  ASSERT_TRUE(again.ok());
  const std::string& gen = q.generation();
  int partial = 0;  // generation tokens that hold part of a character
  for (int side = 0; side < 2; ++side) {
    const auto& list = side == 0 ? r->result().helpful() : r->result().harmful();
    const auto& list2 = side == 0 ? again->result().helpful() : again->result().harmful();
    for (int i = 0; i < list.size(); ++i) {
      const auto& sr = list[i];
      ASSERT_EQ(static_cast<uint32_t>(sr.generation_tokens_size()), r->generation_tokens());
      ASSERT_GT(sr.record_influence_tokens_size(), 10);
      for (int t = 0; t < sr.generation_tokens_size(); ++t) {
        const auto& ts = sr.generation_tokens(t);
        EXPECT_EQ(ts.field(), "generation");
        const std::string bytes = gen.substr(ts.begin(), ts.end() - ts.begin());
        if (ts.end() > ts.begin() && IsUtf8(bytes)) EXPECT_EQ(bytes, ts.text());
        EXPECT_TRUE(IsUtf8(ts.text())) << t;
        partial += !IsUtf8(bytes);
        EXPECT_EQ(ts.score(), list2[i].generation_tokens(t).score());  // deterministic
      }
      const auto& rec = sr.record();
      const std::string prompt = model::AlpacaPrompt(rec.instruction(), rec.input());
      int seen_instruction = 0, seen_output = 0;
      // The influence view covers every token of the record (prompt included), each mapped back to its text.
      double max_infl = 0;
      for (int t = 0; t < sr.record_influence_tokens_size(); ++t) {
        const auto& ti = sr.record_influence_tokens(t);
        EXPECT_EQ(ti.score(), list2[i].record_influence_tokens(t).score());
        max_infl = std::max(max_infl, std::fabs(static_cast<double>(ti.score())));
        const std::string* field = ti.field() == "instruction" ? &rec.instruction()
                                   : ti.field() == "input"     ? &rec.input()
                                   : ti.field() == "output"    ? &rec.output()
                                                               : &prompt;
        ASSERT_LE(ti.end(), field->size()) << ti.field();
        const std::string span = field->substr(ti.begin(), ti.end() - ti.begin());
        if (t == 0) {
          EXPECT_EQ(" " + span, ti.text());  // the dummy-prefix space merged into the first token
        } else if (ti.end() > ti.begin()) {
          EXPECT_EQ(span, ti.text()) << ti.field() << " token " << t;
        }
        seen_instruction += ti.field() == "instruction";
        seen_output += ti.field() == "output";
      }
      EXPECT_GT(max_infl, 0);
      EXPECT_GT(seen_instruction, 0);
      EXPECT_GT(seen_output, 0);
      // The token-loss view covers exactly the tokens the loss is on, the output (and EOS) at the end of the
      // record, with the influence view's placement; prompt tokens were never trained on.
      ASSERT_EQ(sr.record_tokens_size(), seen_output);
      const int first = sr.record_influence_tokens_size() - seen_output;
      double max_loss = 0;
      for (int t = 0; t < sr.record_tokens_size(); ++t) {
        const auto& ts = sr.record_tokens(t);
        const auto& ti = sr.record_influence_tokens(first + t);
        EXPECT_EQ(ts.field(), "output");
        EXPECT_EQ(ti.field(), "output");
        EXPECT_EQ(ts.begin(), ti.begin());
        EXPECT_EQ(ts.text(), ti.text());
        EXPECT_EQ(ts.score(), list2[i].record_tokens(t).score());  // deterministic
        max_loss = std::max(max_loss, std::fabs(static_cast<double>(ts.score())));
      }
      EXPECT_GT(max_loss, 0);
    }
  }
  EXPECT_GT(partial, 0);
  EXPECT_GT(r->attribution_ms(), 0);
  q.set_top_k(3);  // 3 + 1 > max_attributed_records
  auto too_many = c->Query(q);
  EXPECT_EQ(too_many.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(too_many.status().message().find("at most 3 records"), std::string::npos) << too_many.status();
}

// `rapidin cache --preconditioner F --score cosine`: the store's projection state records both; a server without
// the same optimizer state refuses it and says which file it needs; with it, a record's own text scores ~1
// against itself (unit vectors).
TEST_F(CacheTest, PreconditionedCosineStoreNeedsTheSameOptimizerState) {
  REQUIRE_SHARED_DATA();
  {
    model::EngineOptions eo = o_.featurizer.engine;
    auto e = model::GradientEngine::Load(eo);
    ASSERT_TRUE(e.ok()) << e.status();
    auto t = (*e)->Tokenize({"Name a color.", "", "Blue is a color of the sky.", {}});
    ASSERT_TRUE(t.ok());
    model::AdamWOptions adam;
    ASSERT_TRUE(model::TrainStep(e->get(), {*t}, adam).ok());
    ASSERT_TRUE(model::SaveOptimizerState(**e, dir_.path("opt.safetensors"), adam).ok());
    // The saved state is of the weights before the step: cache with the base model, as the benchmark caches
    // the fine-tuned one with its own run's state.
  }
  o_.featurizer.engine.preconditioner_path = dir_.path("opt.safetensors");
  o_.featurizer.unit_norm = true;
  auto s = RunCache(o_);
  ASSERT_TRUE(s.ok()) << s.status();
  auto f = model::Featurizer::Create(o_.featurizer);
  ASSERT_TRUE(f.ok());
  EXPECT_NE((*f)->projection_state().find("score=cosine precondition=adam-v/"), std::string::npos)
      << (*f)->projection_state();
  auto opts = model::OptionsFromState((*f)->projection_state(), o_.featurizer.engine);
  ASSERT_TRUE(opts.ok());
  EXPECT_TRUE(opts->unit_norm);

  server::ServerOptions so = ModelServer();
  auto refused = server::Server::Create(so);
  ASSERT_EQ(refused.status().code(), absl::StatusCode::kFailedPrecondition) << refused.status();
  EXPECT_NE(refused.status().message().find("--preconditioner"), std::string::npos) << refused.status();
  so.model.preconditioner_path = dir_.path("opt.safetensors");
  auto srv = server::Server::Create(so);
  ASSERT_TRUE(srv.ok()) << srv.status();
  auto c = ClientFor(**srv);
  rapidin::v1::QueryRequest q;
  q.set_instruction("Give a greeting.");
  q.set_generation("Howdy! Nice to meet you.");
  q.set_top_k(5);
  auto r = c->Query(q);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->result().helpful(0).id(), "train-4");
  EXPECT_NEAR(r->result().helpful(0).score(), 1.0, 2e-3);  // fp16 store
  for (const auto& h : r->result().helpful()) EXPECT_LE(h.score(), 1.0 + 2e-3);
}

// TracIn-CP: two checkpoints of a real fine-tuning run. The concatenated vectors' inner product is the weighted
// sum of the per-checkpoint inner products; the state names the checkpoints, a server needs the same summary, and
// a bad summary is refused with its reason.
TEST_F(CacheTest, TracInCheckpointScoresSumOverCheckpoints) {
  REQUIRE_SHARED_DATA();
  FinetuneOptions fo = FullFinetune("ft.bin");
  fo.epochs = 2;
  fo.checkpoint_every = 1;
  fo.adam.lr = 5e-3;
  auto ft = RunFinetune(fo);
  ASSERT_TRUE(ft.ok()) << ft.status();
  ASSERT_EQ(ft->checkpoints.size(), 2u);
  const std::string early = ft->checkpoints[0].path, last = ft->checkpoints[1].path;
  EXPECT_EQ(early, fo.out_path + ".epoch-1");
  EXPECT_EQ(last, fo.out_path);
  const std::string summary = dir_.path("ft.json");
  std::ofstream(summary) << R"({"checkpoints": [{"epoch": 1, "path": ")" << early << R"(", "optimizer_state": ")"
                         << ft->checkpoints[0].optimizer_path << R"(", "lr": 0.5}, {"epoch": 2, "path": ")" << last
                         << R"(", "optimizer_state": ")" << ft->checkpoints[1].optimizer_path << R"(", "lr": 2}]})";

  model::FeaturizerOptions one = o_.featurizer;
  one.engine.model_path = early;
  auto fa = model::Featurizer::Create(one);
  one.engine.model_path = last;
  auto fb = model::Featurizer::Create(one);
  model::FeaturizerOptions tc = one;
  ASSERT_TRUE(model::ReadFinetuneCheckpoints(summary, /*precondition=*/false, &tc).ok());
  ASSERT_EQ(tc.checkpoints.size(), 1u);
  EXPECT_EQ(tc.checkpoints[0].model_path, early);
  EXPECT_EQ(tc.weight, 2);
  auto ft_cp = model::Featurizer::Create(tc);
  ASSERT_TRUE(fa.ok() && fb.ok() && ft_cp.ok()) << ft_cp.status();
  ASSERT_EQ((*ft_cp)->dim(), 2 * o_.featurizer.k);
  EXPECT_EQ((*ft_cp)->final_offset(), o_.featurizer.k);
  const model::Example x{"Name a color.", "", "Blue is a color of the sky.", {}};
  const model::Example y{"Write a story about a dog.", "", "Once upon a time a dog ran home.", {}};
  std::vector<float> ax, ay, bx, by, tx, ty;
  ASSERT_TRUE((*fa)->Compress(x, &ax).ok() && (*fa)->Compress(y, &ay).ok());
  ASSERT_TRUE((*fb)->Compress(x, &bx).ok() && (*fb)->Compress(y, &by).ok());
  ASSERT_TRUE((*ft_cp)->Compress(x, &tx).ok() && (*ft_cp)->Compress(y, &ty).ok());
  auto dot = [](const std::vector<float>& a, const std::vector<float>& b) {
    double s = 0;
    for (size_t i = 0; i < a.size(); ++i) s += static_cast<double>(a[i]) * b[i];
    return s;
  };
  const double want = 0.5 * dot(ax, ay) + 2 * dot(bx, by), got = dot(tx, ty);
  EXPECT_NE(dot(ax, ay), dot(bx, by));  // the checkpoints really differ
  EXPECT_NEAR(got, want, 1e-5 * (std::abs(0.5 * dot(ax, ay)) + std::abs(2 * dot(bx, by))));
  const std::string state = (*ft_cp)->projection_state();
  EXPECT_NE(state.find("tracincp=2 weights=0.5,2 earlier="), std::string::npos) << state;

  // The training-side token view explains the same score: its total is <tx, ty>, and per token it is the sum of
  // the checkpoints' views, each against its weighted part of the query.
  auto xt = (*ft_cp)->engine().Tokenize(x);
  ASSERT_TRUE(xt.ok()) << xt.status();
  std::vector<double> view, view_a, view_b;
  auto total = (*ft_cp)->RecordTokenInfluence(*xt, ty, &view);
  ASSERT_TRUE(total.ok()) << total.status();
  EXPECT_NEAR(*total, got, 1e-4 * (std::abs(0.5 * dot(ax, ay)) + std::abs(2 * dot(bx, by))));
  std::vector<float> qa(ty.begin(), ty.begin() + o_.featurizer.k), qb(ty.begin() + o_.featurizer.k, ty.end());
  for (float& v : qa) v *= std::sqrt(0.5f);
  for (float& v : qb) v *= std::sqrt(2.0f);
  auto ta = (*fa)->RecordTokenInfluence(*xt, qa, &view_a);
  auto tb = (*fb)->RecordTokenInfluence(*xt, qb, &view_b);
  ASSERT_TRUE(ta.ok() && tb.ok());
  EXPECT_NEAR(*total, *ta + *tb, 1e-6 * (std::abs(*ta) + std::abs(*tb)));
  ASSERT_EQ(view.size(), xt->ids.size());
  ASSERT_EQ(view_a.size(), view.size());
  double diff = 0, mag = 0, a_mag = 0;
  for (size_t i = 0; i < view.size(); ++i) {
    diff = std::max(diff, std::abs(view[i] - view_a[i] - view_b[i]));
    mag = std::max(mag, std::abs(view[i]));
    a_mag = std::max(a_mag, std::abs(view_a[i]));
  }
  EXPECT_GT(a_mag, 0);  // the early checkpoint contributes
  EXPECT_LE(diff, 1e-5 * mag);  // q scaled in float here, in double inside

  // The state asks for the summary; another summary (other weights) is a state difference.
  auto no_summary = model::OptionsFromState(state, one.engine);
  ASSERT_EQ(no_summary.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(no_summary.status().message().find("--checkpoints"), std::string::npos) << no_summary.status();
  auto from_state = model::OptionsFromState(state, one.engine, summary);
  ASSERT_TRUE(from_state.ok()) << from_state.status();
  EXPECT_EQ(from_state->checkpoints.size(), 1u);

  // Bad summaries.
  model::FeaturizerOptions bad = one;
  EXPECT_EQ(model::ReadFinetuneCheckpoints(dir_.path("none.json"), false, &bad).code(), absl::StatusCode::kNotFound);
  std::ofstream(dir_.path("broken.json")) << "{\"checkpoints\": [";
  EXPECT_EQ(model::ReadFinetuneCheckpoints(dir_.path("broken.json"), false, &bad).code(), absl::StatusCode::kDataLoss);
  bad.engine.model_path = early;  // the summary's last checkpoint is another file
  absl::Status other = model::ReadFinetuneCheckpoints(summary, false, &bad);
  EXPECT_EQ(other.code(), absl::StatusCode::kInvalidArgument) << other;

  // Cache and serve: the store holds 2k values per record; the server needs the summary.
  o_.featurizer = tc;
  auto s = RunCache(o_);
  ASSERT_TRUE(s.ok()) << s.status();
  server::ServerOptions so = ModelServer();
  so.model.path = last;
  so.model.tokenizer_path = o_.featurizer.engine.tokenizer_path;
  auto refused = server::Server::Create(so);
  ASSERT_EQ(refused.status().code(), absl::StatusCode::kFailedPrecondition) << refused.status();
  EXPECT_NE(refused.status().message().find("--checkpoints"), std::string::npos) << refused.status();
  so.model.checkpoints_path = summary;
  auto srv = server::Server::Create(so);
  ASSERT_TRUE(srv.ok()) << srv.status();
  auto c = ClientFor(**srv);
  EXPECT_EQ(c->Stats()->k(), static_cast<uint32_t>(2 * o_.featurizer.k));
  rapidin::v1::QueryRequest q;
  q.set_instruction("Give a greeting.");
  q.set_generation("Howdy! Nice to meet you.");
  q.set_top_k(2);
  q.set_attributions(true);
  auto r = c->Query(q);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->result().helpful(0).id(), "train-4");
  // One influence score per record token (summed over the checkpoints), finite.
  EXPECT_GT(r->result().helpful(0).record_influence_tokens_size(), 3);
  for (const auto& t : r->result().helpful(0).record_influence_tokens()) EXPECT_TRUE(std::isfinite(t.score()));
}

// A linear learning-rate schedule: the checkpoints' TracIn-CP weights are the mean rate of the epoch before each,
// the constant schedule keeps the rate, and an unknown schedule is refused. Training still lowers the loss.
TEST_F(CacheTest, LinearScheduleWeightsCheckpointsByTheirEpochsMeanRate) {
  REQUIRE_SHARED_DATA();
  FinetuneOptions fo = FullFinetune("lin.bin");
  fo.epochs = 3;
  fo.checkpoint_epochs = {0, 1};
  fo.adam.lr = 4e-3;
  fo.lr_schedule = "linear";
  auto ft = RunFinetune(fo);
  ASSERT_TRUE(ft.ok()) << ft.status();
  ASSERT_EQ(ft->checkpoints.size(), 3u);  // epochs 0, 1 and the final model (3)
  const int64_t total = ft->steps, per = total / fo.epochs;
  ASSERT_GE(per, 2);
  auto mean_lr = [&](int epoch) {  // slow: the rate of every step of that epoch
    double s = 0;
    for (int64_t t = epoch * per; t < (epoch + 1) * per; ++t) s += fo.adam.lr * (1.0 - double(t) / total);
    return s / per;
  };
  EXPECT_NEAR(ft->checkpoints[0].lr, mean_lr(0), 1e-15);  // checkpoint 0 opens the first epoch
  EXPECT_NEAR(ft->checkpoints[1].lr, mean_lr(0), 1e-15);
  EXPECT_NEAR(ft->checkpoints[2].lr, mean_lr(2), 1e-15);
  EXPECT_LT(ft->checkpoints[2].lr, ft->checkpoints[1].lr / 2);
  EXPECT_LT(ft->epoch_loss.back(), ft->epoch_loss.front());
  fo.lr_schedule = "constant";
  fo.out_path = dir_.path("const.bin");
  auto fc = RunFinetune(fo);
  ASSERT_TRUE(fc.ok()) << fc.status();
  for (const auto& c : fc->checkpoints) EXPECT_EQ(c.lr, fo.adam.lr);
  fo.lr_schedule = "cosine";
  EXPECT_EQ(RunFinetune(fo).status().code(), absl::StatusCode::kInvalidArgument);
}

// --normalize none: the store keeps each record's gradient norm; the server reads that from the projection state
// (no flag), its scores are the raw sketches' inner products, and a record's token view totals its score.
TEST_F(CacheTest, RawGradientStoreIsServedFromItsState) {
  REQUIRE_SHARED_DATA();
  o_.featurizer.layer_norm = false;
  auto s = RunCache(o_);
  ASSERT_TRUE(s.ok()) << s.status();
  auto f = model::Featurizer::Create(o_.featurizer);
  ASSERT_TRUE(f.ok()) << f.status();
  const model::Example record{"Give a greeting.", "", "Howdy! Nice to meet you.", {}};
  std::vector<float> x;
  ASSERT_TRUE((*f)->Compress(record, &x).ok());
  auto srv = server::Server::Create(ModelServer());
  ASSERT_TRUE(srv.ok()) << srv.status();
  auto c = ClientFor(**srv);
  rapidin::v1::QueryRequest q;
  q.set_instruction(record.instruction);
  q.set_generation(record.output);
  q.set_top_k(2);
  q.set_attributions(true);
  auto r = c->Query(q);
  ASSERT_TRUE(r.ok()) << r.status();
  ASSERT_EQ(r->result().helpful(0).id(), "train-4");
  double self = 0;
  for (float v : x) self += static_cast<double>(v) * v;
  EXPECT_NEAR(r->result().helpful(0).score(), self, 2e-3 * self);  // fp16 store
  EXPECT_GT(std::fabs(self - 1.0), 0.05);  // not a unit-norm vector: the raw gradient's norm is kept
  // The influence view's total is the score before fp16 storage: recompute it from the tokens.
  auto t = (*f)->engine().Tokenize(record);
  ASSERT_TRUE(t.ok());
  std::vector<double> view;
  auto total = (*f)->RecordTokenInfluence(*t, x, &view);
  ASSERT_TRUE(total.ok()) << total.status();
  EXPECT_NEAR(*total, self, 1e-4 * self);
  EXPECT_EQ(r->result().helpful(0).record_influence_tokens_size(), static_cast<int>(t->ids.size()) - 1);
}

TEST_F(CacheTest, ServerRefusesStoreOfAnotherModelState) {
  REQUIRE_SHARED_DATA();
  o_.featurizer.engine.max_length = 100;
  ASSERT_TRUE(RunCache(o_).ok());
  server::ServerOptions so = ModelServer();
  so.model.param_pattern = "attention";  // the store was cached with every matrix
  auto srv = server::Server::Create(so);
  ASSERT_EQ(srv.status().code(), absl::StatusCode::kFailedPrecondition) << srv.status();
  EXPECT_NE(srv.status().message().find("model: store"), std::string::npos) << srv.status();
  so.model.path = dir_.path("missing.bin");
  EXPECT_EQ(server::Server::Create(so).status().code(), absl::StatusCode::kNotFound);
  // A model with a store that does not exist yet: refused before anything is created.
  so = ModelServer();
  so.store.path = dir_.path("not_yet");
  so.store.create_k = 64;
  auto st = server::Server::Create(so).status();
  EXPECT_EQ(st.code(), absl::StatusCode::kFailedPrecondition) << st;
  EXPECT_NE(st.message().find("rapidin cache"), std::string::npos) << st;
  EXPECT_FALSE(std::filesystem::exists(so.store.path));
  // A store of precomputed vectors (no projection state) with a model.
  {
    server::ServerOptions vo;
    vo.store.path = dir_.path("vectors");
    vo.store.create_k = 64;
    vo.net.listen = "127.0.0.1:0";
    vo.net.metrics_listen = "";
    ASSERT_TRUE(server::Server::Create(vo).ok());
  }
  so.store.path = dir_.path("vectors");
  st = server::Server::Create(so).status();
  EXPECT_EQ(st.code(), absl::StatusCode::kFailedPrecondition) << st;
  EXPECT_NE(st.message().find("no projection state"), std::string::npos) << st;
}

}  // namespace
}  // namespace rapidin::cache
