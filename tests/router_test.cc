// Router mode (rapidin-server --shard-servers) over loopback gRPC: merged answers equal one server over the whole
// store (by vector, and by text with token attributions), stats and records through the router, the merge's tie
// rule, `rapidin cache --shard-index/--shard-count` ranges, and every refusal (stores that differ, a shard server
// that is down, a router started before its shard servers).
#include <arpa/inet.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <future>
#include <map>
#include <random>
#include <thread>

#include "cache/cache.h"
#include "client/client.h"
#include "model/engine.h"
#include "model/training.h"
#include "server/internal/router.h"
#include "server/server.h"
#include "tests/test_util.h"

namespace rapidin::server {
namespace {

using rapidin::testing::TempDir;
namespace v1 = rapidin::v1;

constexpr int kK = 67;
constexpr int kN = 900;
constexpr int kShards = 3;

ServerOptions ShardOptions(const std::string& store, uint32_t k) {
  ServerOptions o;
  o.store.path = store;
  o.net.listen = "127.0.0.1:0";
  o.net.metrics_listen = "";
  o.store.shards = 2;
  o.store.create_k = k;
  return o;
}

ServerOptions RouterOptions(const std::vector<std::string>& addresses) {
  ServerOptions o;
  o.net.listen = "127.0.0.1:0";
  o.net.metrics_listen = "127.0.0.1:0";
  o.router.shard_servers = addresses;
  o.router.connect_timeout = absl::Seconds(10);
  return o;
}

std::string Address(const Server& s) { return "127.0.0.1:" + std::to_string(s.port()); }

// Ingests records [ids, vectors] through the API.
void IngestAll(client::Client* c, const std::vector<int>& rows, const std::vector<std::vector<float>>& vectors) {
  size_t next = 0;
  auto r = c->Ingest([&](v1::IngestRequest* b) {
    if (next >= rows.size()) return false;
    for (int i = 0; i < 100 && next < rows.size(); ++i, ++next) {
      auto* rec = b->add_records();
      rec->mutable_record()->set_id("rec-" + std::to_string(rows[next]));
      rec->mutable_record()->set_instruction("instruction " + std::to_string(rows[next]));
      rec->mutable_vector()->Add(vectors[rows[next]].begin(), vectors[rows[next]].end());
    }
    return true;
  });
  ASSERT_TRUE(r.ok()) << r.status();
}

class RouterTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::mt19937_64 rng(rapidin::testing::FuzzSeed());
    std::normal_distribution<float> g;
    vectors_.assign(kN, std::vector<float>(kK));
    for (auto& v : vectors_) {
      for (auto& x : v) x = g(rng);
    }
    // Records spread over the shard servers at random (not by range), so the merge sees interleaved rows.
    std::vector<std::vector<int>> rows(kShards);
    std::vector<int> all(kN);
    for (int i = 0; i < kN; ++i) {
      all[i] = i;
      const int s = static_cast<int>(rng() % kShards);
      shard_of_[i] = s;
      row_in_shard_[i] = static_cast<int>(rows[s].size());
      rows[s].push_back(i);
    }
    auto whole = Server::Create(ShardOptions(dir_.path("whole"), kK));
    ASSERT_TRUE(whole.ok()) << whole.status();
    whole_ = std::move(*whole);
    IngestAll(client::Client::Connect(Address(*whole_)).get(), all, vectors_);
    std::vector<std::string> addresses;
    for (int s = 0; s < kShards; ++s) {
      auto srv = Server::Create(ShardOptions(dir_.path("shard" + std::to_string(s)), kK));
      ASSERT_TRUE(srv.ok()) << srv.status();
      IngestAll(client::Client::Connect(Address(**srv)).get(), rows[s], vectors_);
      addresses.push_back(Address(**srv));
      shards_.push_back(std::move(*srv));
    }
    addresses_ = addresses;
    auto router = Server::Create(RouterOptions(addresses));
    ASSERT_TRUE(router.ok()) << router.status();
    router_ = std::move(*router);
    via_router_ = client::Client::Connect(Address(*router_));
    direct_ = client::Client::Connect(Address(*whole_));
  }

  v1::QueryByVectorRequest Request(int q, int top_k, int harmful_k, uint64_t seed) {
    std::mt19937_64 rng(seed);
    std::normal_distribution<float> g;
    v1::QueryByVectorRequest req;
    for (int j = 0; j < q; ++j) {
      auto* v = req.add_queries();
      for (int c = 0; c < kK; ++c) v->add_values(g(rng));
      v->set_weight(0.5f + j);
    }
    req.set_top_k(top_k);
    req.set_harmful_k(harmful_k);
    return req;
  }

  // The router's list equals the whole store's: same scores, same ids (except within a near-tie), ranks 1..n, and
  // each record's source and row are where it was ingested.
  void ExpectSameList(const google::protobuf::RepeatedPtrField<v1::ScoredRecord>& got,
                      const google::protobuf::RepeatedPtrField<v1::ScoredRecord>& want) {
    ASSERT_EQ(got.size(), want.size());
    const double tol = 1e-5;
    for (int i = 0; i < got.size(); ++i) {
      const auto& r = got[i];
      EXPECT_EQ(r.rank(), static_cast<uint32_t>(i + 1));
      EXPECT_NEAR(r.score(), want[i].score(), tol * std::max(1.0, std::fabs(want[i].score())));
      const bool near_tie = (i > 0 && std::fabs(want[i].score() - want[i - 1].score()) < 1e-4) ||
                            (i + 1 < want.size() && std::fabs(want[i].score() - want[i + 1].score()) < 1e-4);
      if (!near_tie) EXPECT_EQ(r.id(), want[i].id()) << "rank " << i + 1;
      const int row = std::stoi(r.id().substr(4));
      EXPECT_EQ(r.source(), addresses_[shard_of_.at(row)]);
      EXPECT_EQ(r.index(), static_cast<uint64_t>(row_in_shard_.at(row)));
      EXPECT_EQ(r.record().instruction(), "instruction " + std::to_string(row));
    }
  }

  TempDir dir_;
  std::vector<std::vector<float>> vectors_;
  std::map<int, int> shard_of_, row_in_shard_;
  std::unique_ptr<Server> whole_, router_;
  std::vector<std::unique_ptr<Server>> shards_;
  std::vector<std::string> addresses_;
  std::unique_ptr<client::Client> via_router_, direct_;
};

TEST_F(RouterTest, VectorQueriesEqualOneServerOverTheWholeStore) {
  SCOPED_TRACE(rapidin::testing::FuzzReplay());
  for (int trial = 0; trial < 8; ++trial) {
    const bool aggregate = trial % 2 == 1;
    auto req = Request(3, 1 + trial * 5, trial, rapidin::testing::FuzzSeed() + 1000 + trial);
    req.set_aggregate(aggregate);
    auto got = via_router_->QueryByVector(req);
    auto want = direct_->QueryByVector(req);
    ASSERT_TRUE(got.ok()) << got.status();
    ASSERT_TRUE(want.ok()) << want.status();
    ASSERT_EQ(got->results_size(), aggregate ? 1 : 3);
    ASSERT_EQ(got->results_size(), want->results_size());
    for (int j = 0; j < got->results_size(); ++j) {
      ASSERT_EQ(got->results(j).helpful_size(), 1 + trial * 5);
      ExpectSameList(got->results(j).helpful(), want->results(j).helpful());
      ExpectSameList(got->results(j).harmful(), want->results(j).harmful());
    }
    // Every shard of every shard server scanned, each named with its server.
    ASSERT_EQ(got->shard_timings_size(), kShards * 2);
    uint64_t rows = 0;
    for (int i = 0; i < got->shard_timings_size(); ++i) {
      EXPECT_EQ(got->shard_timings(i).shard(), static_cast<uint32_t>(i));
      EXPECT_NE(got->shard_timings(i).backend().find("@127.0.0.1:"), std::string::npos);
      rows += got->shard_timings(i).rows();
    }
    EXPECT_EQ(rows, static_cast<uint64_t>(kN));
  }
}

TEST_F(RouterTest, StatsAndRecordsThroughTheRouter) {
  auto st = via_router_->Stats();
  ASSERT_TRUE(st.ok()) << st.status();
  auto whole = direct_->Stats();
  ASSERT_TRUE(whole.ok()) << whole.status();
  EXPECT_EQ(st->num_records(), static_cast<uint64_t>(kN));
  EXPECT_EQ(st->k(), static_cast<uint32_t>(kK));
  EXPECT_EQ(st->projection_state_id(), whole->projection_state_id());
  EXPECT_EQ(st->num_shards(), static_cast<uint32_t>(kShards * 2));
  EXPECT_EQ(st->backend().rfind("router over 3 shard servers", 0), 0u) << st->backend();
  ASSERT_EQ(st->shard_servers_size(), kShards);
  for (int s = 0; s < kShards; ++s) EXPECT_EQ(st->shard_servers(s), addresses_[s]);
  std::map<std::string, uint64_t> tiers, whole_tiers;
  for (const auto& t : st->tiers()) tiers[t.tier()] = t.records();
  for (const auto& t : whole->tiers()) whole_tiers[t.tier()] = t.records();
  EXPECT_EQ(tiers["host"], static_cast<uint64_t>(kN));
  EXPECT_EQ(tiers, whole_tiers);

  for (int row : {0, 1, kN / 2, kN - 1}) {
    auto r = via_router_->GetRecord("rec-" + std::to_string(row), /*include_vector=*/true);
    ASSERT_TRUE(r.ok()) << r.status();
    EXPECT_EQ(r->source(), addresses_[shard_of_[row]]);
    EXPECT_EQ(r->index(), static_cast<uint64_t>(row_in_shard_[row]));
    const std::vector<float> v(r->vector().begin(), r->vector().end());
    EXPECT_EQ(v, rapidin::testing::Fp16Rounded(vectors_[row]));
  }
  EXPECT_EQ(via_router_->GetRecord("rec-nope", false).status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(via_router_->GetRecord("", false).status().code(), absl::StatusCode::kInvalidArgument);
}

// DeleteRecords through the router reaches the shard server holding each record: afterwards the router answers as
// the whole store does after the same delete, the deleted records never come back from a scan, and a repeat is
// harmless.
TEST_F(RouterTest, DeletesThroughTheRouterEqualDeletesOnOneStore) {
  const std::vector<std::string> ids = {"rec-0", "rec-5", "rec-" + std::to_string(kN / 2), "rec-nope", "rec-5"};
  auto r = via_router_->DeleteRecords(ids, /*compact=*/true);
  ASSERT_TRUE(r.ok()) << r.status();
  auto w = direct_->DeleteRecords(ids);
  ASSERT_TRUE(w.ok()) << w.status();
  EXPECT_EQ(r->deleted(), 3u);
  EXPECT_EQ(r->not_found(), 1u);
  EXPECT_EQ(w->deleted(), 3u);
  EXPECT_EQ(r->record_count(), static_cast<uint64_t>(kN - 3));
  EXPECT_EQ(w->record_count(), static_cast<uint64_t>(kN - 3));
  EXPECT_EQ(via_router_->Stats()->num_records(), static_cast<uint64_t>(kN - 3));
  EXPECT_EQ(via_router_->GetRecord("rec-5", false).status().code(), absl::StatusCode::kNotFound);
  // A query that is record 5's own vector: it would rank first; now it is nowhere, at either end.
  v1::QueryByVectorRequest req;
  for (int row : {5, 0}) {
    auto* v = req.add_queries();
    for (float x : vectors_[row]) v->add_values(x);
  }
  req.set_top_k(kN);
  req.set_harmful_k(10);
  auto got = via_router_->QueryByVector(req);
  auto want = direct_->QueryByVector(req);
  ASSERT_TRUE(got.ok() && want.ok()) << got.status() << " / " << want.status();
  for (int j = 0; j < 2; ++j) {
    ASSERT_EQ(got->results(j).helpful_size(), kN - 3) << "every live record, and no deleted one";
    for (const auto& sr : got->results(j).helpful()) {
      EXPECT_TRUE(sr.id() != "rec-0" && sr.id() != "rec-5" && sr.id() != "rec-" + std::to_string(kN / 2)) << sr.id();
    }
    ExpectSameList(got->results(j).helpful(), want->results(j).helpful());
    ExpectSameList(got->results(j).harmful(), want->results(j).harmful());
  }
  auto again = via_router_->DeleteRecords(ids);
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_EQ(again->deleted(), 0u);
  EXPECT_EQ(again->not_found(), 4u);
}

TEST_F(RouterTest, BadRequestsAndAStoppedShardServerAreClearErrors) {
  auto req = Request(1, 5, 0, 7);
  req.mutable_queries(0)->add_values(1.0f);
  auto r = via_router_->QueryByVector(req);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(r.status().message().find("K is 67"), std::string::npos) << r.status();
  req = Request(1, 0, 0, 7);
  EXPECT_EQ(via_router_->QueryByVector(req).status().code(), absl::StatusCode::kInvalidArgument);
  req = Request(1, 5, 0, 7);
  req.set_projection_state_id("0123456789abcdef");
  EXPECT_EQ(via_router_->QueryByVector(req).status().code(), absl::StatusCode::kFailedPrecondition);
  req = Request(1, 5, 0, 7);
  req.mutable_queries(0)->set_values(3, std::nanf(""));
  r = via_router_->QueryByVector(req);  // checked by the shard servers, named by the first
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(r.status().message().find("shard server " + addresses_[0]), std::string::npos) << r.status();

  auto ing = via_router_->Ingest([](v1::IngestRequest* b) {
    b->add_records()->mutable_record()->set_id("x");
    return false;
  });
  EXPECT_EQ(ing.status().code(), absl::StatusCode::kUnimplemented);
  v1::QueryRequest text;
  text.set_instruction("a");
  text.set_generation("b");
  text.set_top_k(1);
  EXPECT_EQ(via_router_->Query(text).status().code(), absl::StatusCode::kFailedPrecondition);

  // A stopped shard server fails queries and stats (never a partial answer), naming it.
  const int row_elsewhere = [&] {
    for (int i = 0; i < kN; ++i) {
      if (shard_of_[i] != 1) return i;
    }
    return -1;
  }();
  shards_[1]->Shutdown(absl::Milliseconds(100));
  r = via_router_->QueryByVector(Request(1, 5, 2, 8));
  EXPECT_EQ(r.status().code(), absl::StatusCode::kUnavailable) << r.status();
  EXPECT_NE(r.status().message().find(addresses_[1]), std::string::npos) << r.status();
  EXPECT_EQ(via_router_->Stats().status().code(), absl::StatusCode::kUnavailable);
  // A record held by a running shard server is still found; one that may be on the stopped one is not NOT_FOUND.
  EXPECT_TRUE(via_router_->GetRecord("rec-" + std::to_string(row_elsewhere), false).ok());
  EXPECT_EQ(via_router_->GetRecord("rec-nope", false).status().code(), absl::StatusCode::kUnavailable);
}

TEST(Router, RefusesShardServersThatDifferOrDoNotAnswer) {
  TempDir dir;
  auto a = Server::Create(ShardOptions(dir.path("a"), 16));
  auto b = Server::Create(ShardOptions(dir.path("b"), 32));
  ASSERT_TRUE(a.ok() && b.ok());
  auto r = Server::Create(RouterOptions({Address(**a), Address(**b)}));
  EXPECT_EQ(r.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(r.status().message().find("K=32"), std::string::npos) << r.status();

  // Nothing listening there: refused after the connect timeout.
  (*b)->Shutdown(absl::Milliseconds(10));
  ServerOptions o = RouterOptions({Address(**a), Address(**b)});
  o.router.connect_timeout = absl::Seconds(1);
  r = Server::Create(o);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_NE(r.status().message().find(Address(**b)), std::string::npos) << r.status();

  o = RouterOptions({Address(**a), Address(**a)});
  EXPECT_EQ(Server::Create(o).status().code(), absl::StatusCode::kInvalidArgument);
  o = RouterOptions({Address(**a), ""});
  r = Server::Create(o);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(r.status().message().find("empty address"), std::string::npos) << r.status();
  o = RouterOptions({Address(**a)});
  o.store.path = dir.path("c");
  EXPECT_EQ(Server::Create(o).status().code(), absl::StatusCode::kInvalidArgument);
  o = RouterOptions({Address(**a)});
  o.model.path = dir.path("missing.bin");
  EXPECT_EQ(Server::Create(o).status().code(), absl::StatusCode::kNotFound);
}

TEST(Router, WaitsForShardServersThatStartLater) {
  TempDir dir;
  // A port for the late shard server, held (bound, not listening) by this test until the server starts, so that
  // no other test running in parallel can take it meanwhile; SO_REUSEPORT, which gRPC's servers also set, lets the
  // server bind it while it is held.
  const int held = socket(AF_INET, SOCK_STREAM, 0);
  ASSERT_GE(held, 0);
  const int one = 1;
  ASSERT_EQ(setsockopt(held, SOL_SOCKET, SO_REUSEPORT, &one, sizeof one), 0);
  sockaddr_in sa{};
  sa.sin_family = AF_INET;
  sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ASSERT_EQ(bind(held, reinterpret_cast<sockaddr*>(&sa), sizeof sa), 0);
  socklen_t len = sizeof sa;
  ASSERT_EQ(getsockname(held, reinterpret_cast<sockaddr*>(&sa), &len), 0);
  const int port = ntohs(sa.sin_port);
  const std::string address = "127.0.0.1:" + std::to_string(port);
  auto router = std::async(std::launch::async, [&] { return Server::Create(RouterOptions({address})); });
  std::this_thread::sleep_for(std::chrono::milliseconds(500));
  ServerOptions so = ShardOptions(dir.path("late"), 8);
  so.net.listen = address;
  auto late = Server::Create(so);
  close(held);
  ASSERT_TRUE(late.ok()) << late.status();
  auto r = router.get();
  ASSERT_TRUE(r.ok()) << r.status();
  auto st = client::Client::Connect(Address(**r))->Stats();
  ASSERT_TRUE(st.ok()) << st.status();
  EXPECT_EQ(st->k(), 8u);
}

TEST(Router, MergeTiesGoToTheEarlierShardThenTheSmallerRow) {
  v1::QueryResult a, b, out;
  auto add = [](v1::QueryResult* r, bool helpful, const std::string& id, double score, uint64_t index) {
    auto* s = helpful ? r->add_helpful() : r->add_harmful();
    s->set_id(id);
    s->set_score(score);
    s->set_index(index);
  };
  add(&a, true, "a5", 2.0, 5);
  add(&a, true, "a7", 1.0, 7);
  add(&b, true, "b1", 3.0, 1);
  add(&b, true, "b0", 2.0, 0);
  add(&b, true, "b2", 2.0, 2);
  add(&a, false, "a9", -1.0, 9);
  add(&b, false, "b3", -1.0, 3);
  add(&b, false, "b4", -2.0, 4);
  internal::MergeResults({&a, &b}, {"A", "B"}, 4, 2, &out);
  std::vector<std::string> ids, src;
  for (const auto& s : out.helpful()) ids.push_back(s.id()), src.push_back(s.source());
  EXPECT_EQ(ids, (std::vector<std::string>{"b1", "a5", "b0", "b2"}));
  EXPECT_EQ(src, (std::vector<std::string>{"B", "A", "B", "B"}));
  EXPECT_EQ(out.helpful(3).rank(), 4u);
  ASSERT_EQ(out.harmful_size(), 2);
  EXPECT_EQ(out.harmful(0).id(), "b4");
  EXPECT_EQ(out.harmful(1).id(), "a9");
}

// A random llama2.c checkpoint with a byte-level llama2.c tokenizer beside it (0 <unk>, 1 <s>, 2 </s>, 3..258 one
// byte each), long enough for the Alpaca prompt template. Returns the checkpoint's path.
std::string WriteByteLevelModel(const TempDir& dir) {
  model::ModelConfig c;
  c.dim = 16;
  c.hidden_dim = 24;
  c.n_layers = 2;
  c.n_heads = 4;
  c.n_kv_heads = 2;
  c.vocab_size = 259;
  c.seq_len = 512;
  auto e = model::GradientEngine::Random(c, 11, model::EngineOptions());
  EXPECT_TRUE(e.ok()) << e.status();
  const std::string path = dir.path("model.bin");
  EXPECT_TRUE(model::SaveLlama2c(**e, path).ok());
  std::ofstream tok(dir.path("tokenizer.bin"), std::ios::binary);
  auto put = [&](const std::string& piece) {
    const float score = 0;
    const int32_t len = static_cast<int32_t>(piece.size());
    tok.write(reinterpret_cast<const char*>(&score), 4);
    tok.write(reinterpret_cast<const char*>(&len), 4);
    tok.write(piece.data(), len);
  };
  const int32_t max_len = 7;
  tok.write(reinterpret_cast<const char*>(&max_len), 4);
  put("<unk>");
  put("\n<s>\n");
  put("\n</s>\n");
  char hex[8];
  for (int b = 0; b < 256; ++b) {
    std::snprintf(hex, sizeof(hex), "<0x%02X>", b);
    put(hex);
  }
  return path;
}

// Text queries through a router over stores cached by range: the same records, scores and token attributions as
// one server over one store.
TEST(RouterText, CachedRangesAnswerLikeOneStore) {
  TempDir dir;
  const std::string model = WriteByteLevelModel(dir);
  const std::string data = dir.path("train.jsonl");
  {
    std::ofstream f(data);
    const char* words[] = {"red", "blue", "green", "dog", "cat", "sun", "rain", "tree", "river", "stone"};
    std::mt19937_64 rng(rapidin::testing::FuzzSeed());
    for (int i = 0; i < 14; ++i) {
      std::string out;
      for (int w = 0; w < 4 + static_cast<int>(rng() % 6); ++w) out += std::string(w ? " " : "") + words[rng() % 10];
      f << "{\"instruction\": \"Say something about " << words[i % 10] << ".\", \"output\": \"" << out << ".\"}\n";
      if (i == 6) f << "{broken\n";  // a bad record inside a range: reported by the run that covers it
    }
  }
  cache::CacheOptions co;
  co.featurizer.engine.model_path = model;
  co.featurizer.k = 256;
  co.data_path = data;
  co.progress = false;
  co.store_path = dir.path("whole");
  auto whole = cache::RunCache(co);
  ASSERT_TRUE(whole.ok()) << whole.status();
  ASSERT_EQ(whole->cached, 14);
  int64_t cached = 0, bad = 0, next_begin = 0;
  std::vector<std::unique_ptr<Server>> shards;
  std::vector<std::string> addresses;
  for (int s = 0; s < 3; ++s) {
    co.store_path = dir.path("shard" + std::to_string(s));
    co.shard_index = s;
    co.shard_count = 3;
    auto sum = cache::RunCache(co);
    ASSERT_TRUE(sum.ok()) << sum.status();
    EXPECT_EQ(sum->range_begin, next_begin);  // contiguous ranges covering all 15 positions
    EXPECT_EQ(sum->range_end - sum->range_begin, 5);
    EXPECT_EQ(sum->projection_state_id, whole->projection_state_id);
    next_begin = sum->range_end;
    cached += sum->cached;
    bad += sum->bad;
    ServerOptions so = ShardOptions(co.store_path, 0);
    so.model.path = model;
    auto srv = Server::Create(so);
    ASSERT_TRUE(srv.ok()) << srv.status();
    addresses.push_back(Address(**srv));
    shards.push_back(std::move(*srv));
  }
  EXPECT_EQ(next_begin, 15);
  EXPECT_EQ(cached, 14);
  EXPECT_EQ(bad, 1);
  co.shard_index = 3;
  EXPECT_EQ(cache::RunCache(co).status().code(), absl::StatusCode::kInvalidArgument);

  ServerOptions wo = ShardOptions(dir.path("whole"), 0);
  wo.model.path = model;
  auto one = Server::Create(wo);
  ASSERT_TRUE(one.ok()) << one.status();
  ServerOptions ro = RouterOptions(addresses);
  ro.model.path = model;
  auto router = Server::Create(ro);
  ASSERT_TRUE(router.ok()) << router.status();

  v1::QueryRequest q;
  q.set_instruction("Say something about rain.");
  q.set_generation("green river and stone.");
  q.set_top_k(3);
  q.set_harmful_k(2);
  q.set_attributions(true);
  auto got = client::Client::Connect(Address(**router))->Query(q);
  auto want = client::Client::Connect(Address(**one))->Query(q);
  ASSERT_TRUE(got.ok()) << got.status();
  ASSERT_TRUE(want.ok()) << want.status();
  EXPECT_EQ(got->generation_loss(), want->generation_loss());
  EXPECT_EQ(got->generation_tokens(), want->generation_tokens());
  auto same = [&](const auto& g, const auto& w) {
    ASSERT_EQ(g.size(), w.size());
    for (int i = 0; i < g.size(); ++i) {
      EXPECT_EQ(g[i].id(), w[i].id());
      EXPECT_NEAR(g[i].score(), w[i].score(), 1e-6 * std::max(1.0, std::fabs(w[i].score())));
      EXPECT_FALSE(g[i].source().empty());
      EXPECT_EQ(g[i].record().output(), w[i].record().output());
      ASSERT_GT(g[i].generation_tokens_size(), 0);
      ASSERT_EQ(g[i].generation_tokens_size(), w[i].generation_tokens_size());
      ASSERT_EQ(g[i].record_tokens_size(), w[i].record_tokens_size());
      for (int t = 0; t < g[i].generation_tokens_size(); ++t) {
        EXPECT_EQ(g[i].generation_tokens(t).text(), w[i].generation_tokens(t).text());
        EXPECT_NEAR(g[i].generation_tokens(t).score(), w[i].generation_tokens(t).score(), 1e-6);
      }
      for (int t = 0; t < g[i].record_tokens_size(); ++t) {
        EXPECT_EQ(g[i].record_tokens(t).field(), w[i].record_tokens(t).field());
        EXPECT_NEAR(g[i].record_tokens(t).score(), w[i].record_tokens(t).score(), 1e-6);
      }
    }
  };
  same(got->result().helpful(), want->result().helpful());
  same(got->result().harmful(), want->result().harmful());

  // A shard server whose store was built with another sketch seed is refused by name.
  co.store_path = dir.path("other");
  co.shard_index = 0;
  co.featurizer.seed = 5;
  ASSERT_TRUE(cache::RunCache(co).ok());
  ServerOptions oo = ShardOptions(co.store_path, 0);
  auto other = Server::Create(oo);
  ASSERT_TRUE(other.ok()) << other.status();
  ro.router.shard_servers = {addresses[0], Address(**other)};
  auto refused = Server::Create(ro);
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(refused.status().message().find(Address(**other)), std::string::npos) << refused.status();
}

}  // namespace
}  // namespace rapidin::server
