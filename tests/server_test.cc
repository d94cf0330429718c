// server/ end to end over loopback gRPC: query results against a brute-force reference, every limit, deadlines,
// concurrency, health and metrics.
#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>
#include <httplib.h>

#include <algorithm>
#include <cmath>
#include <future>
#include <map>
#include <thread>

#include "base/mutex.h"
#include "client/client.h"
#include "kernels/half.h"
#include "kernels/score.h"
#include "query/ivf_index.h"
#include "query/pca_index.h"
#include "server/http.h"
#include "server/server.h"
#include "tests/test_util.h"

namespace rapidin::server {
namespace {

using rapidin::testing::SeededVector;
using rapidin::testing::TempDir;
namespace v1 = rapidin::v1;

constexpr int kK = 67;  // odd on purpose
constexpr int kN = 1003;  // not a multiple of the shard count

class ServerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ServerOptions o;
    o.store.path = dir_.path("store");
    o.net.listen = "127.0.0.1:0";
    o.net.metrics_listen = "127.0.0.1:0";
    o.store.shards = 3;
    o.store.create_k = kK;
    o.limits.max_top_k = 50;
    o.limits.max_query_vectors = 8;
    o.net.max_message_bytes = 1 << 20;
    auto s = Server::Create(o);
    ASSERT_TRUE(s.ok()) << s.status();
    server_ = std::move(*s);
    addr_ = "127.0.0.1:" + std::to_string(server_->port());
    client_ = client::Client::Connect(addr_, 30, 8 << 20);
    std::mt19937_64 rng(12345);
    std::normal_distribution<float> g;
    for (int i = 0; i < kN; ++i) {
      std::vector<float> v(kK);
      for (auto& x : v) x = g(rng);
      vectors_.push_back(v);
    }
    // Ingest in batches of 100 through the streaming RPC.
    size_t next = 0;
    auto r = client_->Ingest([&](v1::IngestRequest* b) {
      if (next >= vectors_.size()) return false;
      for (int i = 0; i < 100 && next < vectors_.size(); ++i, ++next) {
        auto* rec = b->add_records();
        rec->mutable_record()->set_id("rec-" + std::to_string(next));
        rec->mutable_record()->set_instruction("instruction " + std::to_string(next));
        (*rec->mutable_record()->mutable_metadata())["source"] = "test";
        rec->mutable_vector()->Add(vectors_[next].begin(), vectors_[next].end());
      }
      return true;
    });
    ASSERT_TRUE(r.ok()) << r.status();
    ASSERT_EQ(r->record_count(), static_cast<uint64_t>(kN));
    ASSERT_EQ(r->batches_applied(), 11u);
  }

  v1::QueryByVectorRequest Request(const std::vector<std::vector<float>>& qs, int top_k, int harmful_k) {
    v1::QueryByVectorRequest req;
    for (const auto& q : qs) req.add_queries()->mutable_values()->Add(q.begin(), q.end());
    req.set_top_k(top_k);
    req.set_harmful_k(harmful_k);
    return req;
  }

  // Double-precision scores of the fp16-rounded store.
  std::vector<double> RefScores(const std::vector<float>& q) {
    std::vector<double> s(kN);
    for (int i = 0; i < kN; ++i) {
      double acc = 0;
      for (int c = 0; c < kK; ++c) acc += double(kernels::HalfToFloat(kernels::FloatToHalf(vectors_[i][c]))) * q[c];
      s[i] = acc;
    }
    return s;
  }

  // The returned lists agree with the brute-force reference: scores match, order is right, nothing better missed.
  void CheckAgainstReference(const v1::QueryResult& r, const std::vector<float>& q, int top_k, int harmful_k) {
    const auto ref = RefScores(q);
    std::vector<int> order(kN);
    for (int i = 0; i < kN; ++i) order[i] = i;
    std::sort(order.begin(), order.end(), [&](int a, int b) { return ref[a] > ref[b]; });
    ASSERT_EQ(r.helpful_size(), std::min(top_k, kN));
    ASSERT_EQ(r.harmful_size(), std::min(harmful_k, kN));
    const double tol = 1e-4;
    for (int i = 0; i < r.helpful_size(); ++i) {
      const auto& s = r.helpful(i);
      EXPECT_EQ(s.rank(), static_cast<uint32_t>(i + 1));
      EXPECT_EQ(s.id(), "rec-" + std::to_string(s.index()));
      EXPECT_EQ(s.record().id(), s.id());
      EXPECT_NEAR(s.score(), ref[s.index()], tol);
      // The i-th best by the reference has the same score up to rounding (same id unless a near-tie).
      EXPECT_NEAR(s.score(), ref[order[i]], tol);
      if (std::fabs(ref[order[i]] - ref[order[std::min(i + 1, kN - 1)]]) > tol && (i == 0 || std::fabs(ref[order[i]] - ref[order[i - 1]]) > tol)) {
        EXPECT_EQ(s.index(), static_cast<uint64_t>(order[i]));
      }
    }
    for (int i = 0; i < r.harmful_size(); ++i) {
      EXPECT_NEAR(r.harmful(i).score(), ref[order[kN - 1 - i]], tol);
    }
  }

  // One record through the streaming Ingest RPC.
  static absl::StatusOr<v1::IngestResponse> IngestOne(client::Client* c, const std::string& id,
                                                      const std::vector<float>& v) {
    bool sent = false;
    return c->Ingest([&](v1::IngestRequest* b) {
      if (sent) return false;
      auto* rec = b->add_records();
      rec->mutable_record()->set_id(id);
      rec->mutable_vector()->Add(v.begin(), v.end());
      return sent = true;
    });
  }

  // Stops the fixture's server and returns options for another one over the same store.
  ServerOptions StopForRestart() {
    server_->Shutdown(absl::Seconds(1));
    server_.reset();
    ServerOptions o;
    o.store.path = dir_.path("store");
    o.net.listen = "127.0.0.1:0";
    o.net.metrics_listen = "";
    return o;
  }

  TempDir dir_;
  std::unique_ptr<Server> server_;
  std::string addr_;
  std::unique_ptr<client::Client> client_;
  std::vector<std::vector<float>> vectors_;
};

// The HTTP gateway's status for every gRPC code: google.rpc.Code's mapping (CANCELLED as 499, as Google's APIs).
TEST(HttpGateway, EveryGrpcCodeHasItsHttpStatus) {
  using C = grpc::StatusCode;
  const std::vector<std::pair<C, int>> want = {
      {C::OK, 200}, {C::CANCELLED, 499}, {C::UNKNOWN, 500}, {C::INVALID_ARGUMENT, 400},
      {C::DEADLINE_EXCEEDED, 504}, {C::NOT_FOUND, 404}, {C::ALREADY_EXISTS, 409}, {C::PERMISSION_DENIED, 403},
      {C::RESOURCE_EXHAUSTED, 429}, {C::FAILED_PRECONDITION, 400}, {C::ABORTED, 409}, {C::OUT_OF_RANGE, 400},
      {C::UNIMPLEMENTED, 501}, {C::INTERNAL, 500}, {C::UNAVAILABLE, 503}, {C::DATA_LOSS, 500},
      {C::UNAUTHENTICATED, 401}};
  for (const auto& [code, http] : want) EXPECT_EQ(server::HttpGateway::HttpStatus(code), http) << code;
}

TEST_F(ServerTest, QueryByVectorMatchesBruteForce) {
  std::vector<std::vector<float>> qs = {SeededVector(1, kK), SeededVector(2, kK), SeededVector(3, kK)};
  for (int top_k : {1, 7, 50}) {
    auto r = client_->QueryByVector(Request(qs, top_k, top_k / 2));
    ASSERT_TRUE(r.ok()) << r.status();
    ASSERT_EQ(r->results_size(), 3);
    ASSERT_EQ(r->shard_timings_size(), 3);
    uint64_t rows = 0;
    for (const auto& t : r->shard_timings()) rows += t.rows();
    EXPECT_EQ(rows, static_cast<uint64_t>(kN));
    for (int j = 0; j < 3; ++j) CheckAgainstReference(r->results(j), qs[j], top_k, top_k / 2);
  }
}

TEST_F(ServerTest, ExactTopKEqualsSingleShardKernel) {
  // Same kernel, one shard, brute-force selection over all rows: ids and scores must be identical.
  const auto q = SeededVector(77, kK);
  std::vector<uint16_t> store;
  for (const auto& v : vectors_) {
    for (float x : v) store.push_back(kernels::FloatToHalf(x));
  }
  std::vector<float> scores(kN);
  ASSERT_TRUE(kernels::ScoreF16(store.data(), kN, kK, q.data(), 1, scores.data()).ok());
  kernels::TopK best(50, true), worst(50, false);
  for (int i = 0; i < kN; ++i) {
    best.Push(scores[i], i);
    worst.Push(scores[i], i);
  }
  auto r = client_->QueryByVector(Request({q}, 50, 50));
  ASSERT_TRUE(r.ok()) << r.status();
  const auto b = best.Sorted(), w = worst.Sorted();
  for (int i = 0; i < 50; ++i) {
    EXPECT_EQ(r->results(0).helpful(i).index(), static_cast<uint64_t>(b[i].index));
    EXPECT_EQ(static_cast<float>(r->results(0).helpful(i).score()), b[i].score);
    EXPECT_EQ(r->results(0).harmful(i).index(), static_cast<uint64_t>(w[i].index));
  }
}

TEST_F(ServerTest, AggregateIsWeightedSum) {
  const auto a = SeededVector(5, kK), b = SeededVector(6, kK);
  auto req = Request({a, b}, 10, 3);
  req.mutable_queries(0)->set_weight(2.0f);
  req.mutable_queries(1)->set_weight(-0.5f);
  req.set_aggregate(true);
  auto r = client_->QueryByVector(req);
  ASSERT_TRUE(r.ok()) << r.status();
  ASSERT_EQ(r->results_size(), 1);
  std::vector<float> sum(kK);
  for (int c = 0; c < kK; ++c) sum[c] = 2.0f * a[c] - 0.5f * b[c];
  CheckAgainstReference(r->results(0), sum, 10, 3);
}

TEST_F(ServerTest, GetRecordAndStats) {
  auto g = client_->GetRecord("rec-42", true);
  ASSERT_TRUE(g.ok()) << g.status();
  EXPECT_EQ(g->index(), 42u);
  EXPECT_EQ(g->record().instruction(), "instruction 42");
  EXPECT_EQ(g->record().metadata().at("source"), "test");
  ASSERT_EQ(g->vector_size(), kK);
  for (int c = 0; c < kK; ++c) EXPECT_EQ(g->vector(c), kernels::HalfToFloat(kernels::FloatToHalf(vectors_[42][c])));
  auto s = client_->Stats();
  ASSERT_TRUE(s.ok());
  EXPECT_EQ(s->num_records(), static_cast<uint64_t>(kN));
  EXPECT_EQ(s->k(), static_cast<uint32_t>(kK));
  EXPECT_EQ(s->dtype(), v1::VECTOR_DTYPE_FP16);
  EXPECT_EQ(s->num_shards(), 3u);
  EXPECT_EQ(s->num_workers(), 3u);
  ASSERT_GE(s->tiers_size(), 2);
  EXPECT_EQ(s->tiers(0).tier(), "host");
  EXPECT_EQ(s->tiers(0).bytes(), static_cast<uint64_t>(kN) * kK * 2);
  EXPECT_GT(s->tiers(1).bytes(), 0u);
}

TEST_F(ServerTest, BadInputGetsClearErrorsAndServerKeepsServing) {
  const auto good = SeededVector(9, kK);
  auto expect_code = [&](v1::QueryByVectorRequest req, absl::StatusCode code, const std::string& words) {
    auto r = client_->QueryByVector(req);
    ASSERT_EQ(r.status().code(), code) << r.status();
    EXPECT_NE(r.status().message().find(words), std::string::npos) << r.status();
  };
  expect_code(Request({SeededVector(9, kK - 1)}, 5, 0), absl::StatusCode::kInvalidArgument, "K is 67");
  auto nan = good;
  nan[3] = std::nanf("");
  expect_code(Request({nan}, 5, 0), absl::StatusCode::kInvalidArgument, "not finite");
  auto inf = good;
  inf[0] = -INFINITY;
  expect_code(Request({inf}, 5, 0), absl::StatusCode::kInvalidArgument, "not finite");
  // Finite, but large enough that fp32 scores would overflow to Inf (and Inf - Inf to NaN).
  auto huge = good;
  huge[1] = 3e38f;
  huge[2] = -3e38f;
  expect_code(Request({huge}, 5, 0), absl::StatusCode::kInvalidArgument, "L1 norm");
  expect_code(Request({}, 5, 0), absl::StatusCode::kInvalidArgument, "no query vectors");
  expect_code(Request({good}, 0, 0), absl::StatusCode::kInvalidArgument, "top_k");
  expect_code(Request({good}, 51, 0), absl::StatusCode::kInvalidArgument, "top_k must be 1..50");
  expect_code(Request({good}, 5, 51), absl::StatusCode::kInvalidArgument, "harmful_k");
  expect_code(Request(std::vector<std::vector<float>>(9, good), 5, 0), absl::StatusCode::kInvalidArgument,
              "at most 8");
  auto other_state = Request({good}, 5, 0);
  other_state.set_projection_state_id("0123456789abcdef");
  expect_code(other_state, absl::StatusCode::kFailedPrecondition, "projection state");
  // Oversized message (the server's limit is 1 MiB).
  expect_code(Request({std::vector<float>(400000, 0.5f)}, 5, 0), absl::StatusCode::kResourceExhausted, "");

  EXPECT_EQ(client_->GetRecord("missing", false).status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(client_->GetRecord("", false).status().code(), absl::StatusCode::kInvalidArgument);
  v1::QueryRequest text;
  text.set_generation("hello");
  text.set_top_k(3);
  auto t = client_->Query(text);
  EXPECT_EQ(t.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(t.status().message().find("--model"), std::string::npos);

  // A bad ingest batch is refused whole; batches before it stay applied.
  int sent = 0;
  auto ing = client_->Ingest([&](v1::IngestRequest* b) {
    if (sent == 2) return false;
    for (int i = 0; i < 3; ++i) {
      auto* rec = b->add_records();
      rec->mutable_record()->set_id("new-" + std::to_string(sent) + "-" + std::to_string(i));
      const auto v = SeededVector(100 + i, sent == 1 && i == 2 ? kK + 1 : kK);
      rec->mutable_vector()->Add(v.begin(), v.end());
    }
    ++sent;
    return true;
  });
  ASSERT_EQ(ing.status().code(), absl::StatusCode::kInvalidArgument) << ing.status();
  EXPECT_NE(ing.status().message().find("batch 2 rejected"), std::string::npos) << ing.status();
  EXPECT_TRUE(client_->GetRecord("new-0-2", false).ok());
  EXPECT_EQ(client_->GetRecord("new-1-0", false).status().code(), absl::StatusCode::kNotFound);

  // Still serving, with correct answers.
  auto r = client_->QueryByVector(Request({good}, 5, 2));
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(client_->Stats()->num_records(), static_cast<uint64_t>(kN + 3));
}

// Mutated encodings of valid requests, sent as raw bytes: each gets a status (no crash, hang or INTERNAL), and
// the server then answers exactly as before. Mutated ingest batches are refused whole or applied whole.
TEST_F(ServerTest, MutatedRequestsGetAStatusAndServingContinues) {
  const uint64_t seed = rapidin::testing::FuzzSeed();
  SCOPED_TRACE(rapidin::testing::FuzzReplay());
  std::mt19937_64 rng(seed);
  auto channel = grpc::CreateChannel(addr_, grpc::InsecureChannelCredentials());
  grpc::GenericStub generic(channel);
  auto call = [&](const std::string& method, const std::string& bytes) {
    grpc::Slice slice(bytes);
    grpc::ByteBuffer req(&slice, 1), resp;
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(20));
    std::promise<grpc::Status> done;
    generic.UnaryCall(&ctx, "/rapidin.v1.InfluenceService/" + method, grpc::StubOptions(), &req, &resp,
                      [&](grpc::Status st) { done.set_value(st); });
    return done.get_future().get();
  };
  auto q = Request({SeededVector(5, kK), SeededVector(6, kK)}, 5, 2);
  q.set_aggregate(rng() % 2);
  v1::GetRecordRequest g;
  g.set_id("rec-5");
  g.set_include_vector(true);
  v1::QueryRequest t;
  t.set_generation("hello");
  t.set_top_k(3);
  const std::vector<std::pair<std::string, std::string>> valid = {{"QueryByVector", q.SerializeAsString()},
                                                                  {"GetRecord", g.SerializeAsString()},
                                                                  {"Stats", v1::StatsRequest().SerializeAsString()},
                                                                  {"Query", t.SerializeAsString()}};
  auto parses = [](const std::string& method, const std::string& bytes) {
    if (method == "QueryByVector") return v1::QueryByVectorRequest().ParseFromString(bytes);
    if (method == "GetRecord") return v1::GetRecordRequest().ParseFromString(bytes);
    if (method == "Stats") return v1::StatsRequest().ParseFromString(bytes);
    return v1::QueryRequest().ParseFromString(bytes);
  };
  std::map<std::string, int> codes;
  for (int i = 0; i < 600; ++i) {
    const auto& [method, bytes] = valid[i % valid.size()];
    std::string m = bytes;
    for (int j = 0, n = 1 + rng() % 3; j < n; ++j) m = rapidin::testing::Mutate(m, 0, rng);
    const grpc::Status st = call(method, m);
    codes[method + " " + std::to_string(st.error_code())]++;
    if (!parses(method, m)) {  // refused by gRPC before rapidin sees it (its callback handlers: an empty UNIMPLEMENTED)
      EXPECT_FALSE(st.ok()) << method;
      continue;
    }
    ASSERT_NE(st.error_code(), grpc::StatusCode::INTERNAL) << method << ": " << st.error_message();
    ASSERT_NE(st.error_code(), grpc::StatusCode::UNKNOWN) << method << ": " << st.error_message();
    ASSERT_NE(st.error_code(), grpc::StatusCode::UNAVAILABLE) << method << ": " << st.error_message();
    ASSERT_NE(st.error_code(), grpc::StatusCode::DEADLINE_EXCEEDED) << method;
  }
  for (const auto& [what, n] : codes) std::cout << what << ": " << n << "\n";
  // Field-level: every field of QueryByVectorRequest set to odd values (NaN, infinities, extremes, wrong
  // lengths), so that each request reaches rapidin's checks. An answer, when there is one, is well formed.
  const float odd[] = {NAN, INFINITY, -INFINITY, 0.0f, -0.0f, 1e-45f, 3.4e38f, -3.4e38f, 65504.0f, 1e5f};
  for (int i = 0; i < 400; ++i) {
    v1::QueryByVectorRequest req;
    const int nq = static_cast<int>(rng() % 11);
    for (int j = 0; j < nq; ++j) {
      auto* qv = req.add_queries();
      const int len = rng() % 8 ? kK : static_cast<int>(rng() % (2 * kK));
      auto v = SeededVector(rng(), len);
      if (rng() % 3 == 0 && len > 0) v[rng() % len] = odd[rng() % 10];
      qv->mutable_values()->Add(v.begin(), v.end());
      if (rng() % 2) qv->set_weight(rng() % 2 ? odd[rng() % 10] : static_cast<float>(rng() % 7) - 3.0f);
    }
    const uint32_t ks[] = {0, 1, 5, 50, 51, 1u << 31, ~0u};
    req.set_top_k(ks[rng() % 7]);
    req.set_harmful_k(ks[rng() % 7]);
    req.set_aggregate(rng() % 2);
    req.set_omit_text(rng() % 2);
    if (rng() % 4 == 0) req.set_projection_state_id(rng() % 2 ? "" : "zz");
    auto res = client_->QueryByVector(req);
    if (!res.ok()) {
      const auto c = res.status().code();
      EXPECT_TRUE(c == absl::StatusCode::kInvalidArgument || c == absl::StatusCode::kFailedPrecondition) << res.status();
      EXPECT_FALSE(res.status().message().empty());
      continue;
    }
    ASSERT_EQ(res->results_size(), req.aggregate() ? 1 : nq);
    for (const auto& result : res->results()) {
      EXPECT_EQ(result.helpful_size(), std::min<int64_t>(req.top_k(), kN));
      EXPECT_EQ(result.harmful_size(), std::min<int64_t>(req.harmful_k(), kN));
      for (const auto& h : result.helpful()) EXPECT_TRUE(std::isfinite(h.score())) << h.score();
    }
  }

  const auto probe = SeededVector(77, kK);
  auto r = client_->QueryByVector(Request({probe}, 10, 3));
  ASSERT_TRUE(r.ok()) << r.status();
  CheckAgainstReference(r->results(0), probe, 10, 3);

  // Ingest: mutated batches (those that still parse) through the streaming RPC, one stream each.
  v1::IngestRequest batch;
  for (int i = 0; i < 3; ++i) {
    auto* rec = batch.add_records();
    rec->mutable_record()->set_id("fuzz-" + std::to_string(i));
    rec->mutable_record()->set_instruction("instruction");
    const auto v = SeededVector(300 + i, kK);
    rec->mutable_vector()->Add(v.begin(), v.end());
  }
  const std::string good = batch.SerializeAsString();
  int applied = 0, refused = 0;
  for (int i = 0; i < 150; ++i) {
    v1::IngestRequest m;
    if (!m.ParseFromString(rapidin::testing::Mutate(good, 0, rng))) continue;
    const uint64_t before = client_->Stats()->num_records();
    bool sent = false;
    auto res = client_->Ingest([&](v1::IngestRequest* b) {
      if (sent) return false;
      *b = m;
      return sent = true;
    });
    const uint64_t after = client_->Stats()->num_records();
    if (res.ok()) {
      ++applied;
      EXPECT_EQ(after, res->record_count());
    } else {
      ++refused;
      EXPECT_EQ(res.status().code(), absl::StatusCode::kInvalidArgument) << res.status();
      EXPECT_EQ(after, before) << "a refused batch changed the store";
    }
  }
  std::cout << "mutated ingest batches: " << applied << " applied, " << refused << " refused\n";
  EXPECT_GT(refused, 0);
  EXPECT_TRUE(client_->QueryByVector(Request({probe}, 10, 3)).ok());

  // Field-level ingest: odd ids (empty, 1024 and 1025 bytes, repeated in a batch), odd values (NaN, Inf, beyond
  // fp16's 65504, subnormal), wrong lengths. A refused batch changes nothing; an applied one reads back exactly,
  // the last occurrence of an id winning and vectors rounded to fp16.
  const float odd_values[] = {NAN, INFINITY, 65504.0f, 65520.0f, -1e6f, 1e-8f, -0.0f, 3.0f};
  int fields_applied = 0, fields_refused = 0;
  for (int i = 0; i < 120; ++i) {
    v1::IngestRequest b;
    std::map<std::string, v1::IngestRecord> last;
    for (int j = 0, n = 1 + rng() % 4; j < n; ++j) {
      auto* rec = b.add_records();
      const int id_kind = rng() % 10;
      std::string id = id_kind == 0   ? ""
                       : id_kind == 1 ? std::string(1024, 'x')
                       : id_kind == 2 ? std::string(1025, 'y')
                       : id_kind == 3 ? "rec-" + std::to_string(rng() % kN)  // replaces a fixture row
                                      : "f-" + std::to_string(rng() % 20);
      rec->mutable_record()->set_id(id);
      rec->mutable_record()->set_output("out " + std::to_string(rng()));
      if (rng() % 3 == 0) (*rec->mutable_record()->mutable_metadata())["k" + std::to_string(rng() % 3)] = "v";
      const int len = rng() % 10 ? kK : static_cast<int>(rng() % (2 * kK));
      auto v = SeededVector(rng(), len);
      if (rng() % 5 == 0 && len > 0) v[rng() % len] = odd_values[rng() % 8];
      rec->mutable_vector()->Add(v.begin(), v.end());
      last[id] = *rec;
    }
    const uint64_t before = client_->Stats()->num_records();
    bool sent = false;
    auto res = client_->Ingest([&](v1::IngestRequest* out) {
      if (sent) return false;
      *out = b;
      return sent = true;
    });
    if (!res.ok()) {
      ++fields_refused;
      EXPECT_EQ(res.status().code(), absl::StatusCode::kInvalidArgument) << res.status();
      EXPECT_EQ(client_->Stats()->num_records(), before) << "a refused batch changed the store";
      continue;
    }
    ++fields_applied;
    for (const auto& [id, want] : last) {
      auto got = client_->GetRecord(id, true);
      ASSERT_TRUE(got.ok()) << got.status();
      EXPECT_EQ(got->record().SerializeAsString(), want.record().SerializeAsString()) << id;
      ASSERT_EQ(got->vector_size(), kK);
      for (int c = 0; c < kK; ++c) {
        EXPECT_EQ(got->vector(c), kernels::HalfToFloat(kernels::FloatToHalf(want.vector(c)))) << id << " value " << c;
      }
    }
  }
  std::cout << "field-level ingest batches: " << fields_applied << " applied, " << fields_refused << " refused\n";
  EXPECT_GT(fields_applied, 0);
  EXPECT_GT(fields_refused, 0);
}

TEST_F(ServerTest, DeadlineIsHonoured) {
  auto stub = v1::InfluenceService::NewStub(grpc::CreateChannel(addr_, grpc::InsecureChannelCredentials()));
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() - std::chrono::milliseconds(1));
  v1::QueryByVectorResponse resp;
  auto st = stub->QueryByVector(&ctx, Request({SeededVector(1, kK)}, 5, 0), &resp);
  EXPECT_EQ(st.error_code(), grpc::StatusCode::DEADLINE_EXCEEDED);
  EXPECT_TRUE(client_->QueryByVector(Request({SeededVector(1, kK)}, 5, 0)).ok());
}

TEST_F(ServerTest, ConcurrentQueriesGetTheirOwnAnswers) {
  std::vector<std::vector<float>> qs;
  for (int i = 0; i < 16; ++i) qs.push_back(SeededVector(1000 + i, kK));
  std::vector<v1::QueryByVectorResponse> serial;
  for (const auto& q : qs) serial.push_back(*client_->QueryByVector(Request({q}, 10, 10)));
  std::vector<std::future<absl::StatusOr<v1::QueryByVectorResponse>>> futs;
  for (const auto& q : qs) {
    futs.push_back(std::async(std::launch::async, [&, q] {
      return client::Client::Connect(addr_)->QueryByVector(Request({q}, 10, 10));
    }));
  }
  for (size_t i = 0; i < qs.size(); ++i) {
    auto r = futs[i].get();
    ASSERT_TRUE(r.ok()) << r.status();
    for (int j = 0; j < 10; ++j) {
      EXPECT_EQ(r->results(0).helpful(j).index(), serial[i].results(0).helpful(j).index());
      EXPECT_EQ(r->results(0).harmful(j).score(), serial[i].results(0).harmful(j).score());
    }
  }
}

// The callback API with one handler thread: a burst of concurrent requests is served without a thread per
// request, and requests beyond the queue's bound are refused with RESOURCE_EXHAUSTED, never dropped or mixed up.
TEST_F(ServerTest, BurstBeyondTheHandlerQueueIsRefusedAndTheRestAnswered) {
  ServerOptions o = StopForRestart();
  o.limits.handler_threads = 1;
  o.limits.max_queued_requests = 1;
  o.limits.max_top_k = 50;
  o.limits.max_query_vectors = 8;
  auto s = Server::Create(o);
  ASSERT_TRUE(s.ok()) << s.status();
  const std::string addr = "127.0.0.1:" + std::to_string((*s)->port());
  auto stub = v1::InfluenceService::NewStub(grpc::CreateChannel(addr, grpc::InsecureChannelCredentials()));
  // Each request reads 8 x 100 records after its scan (milliseconds on the one handler thread): the burst queues.
  std::vector<std::vector<float>> qs;
  for (int i = 0; i < 8; ++i) qs.push_back(SeededVector(2000 + i, kK));
  const v1::QueryByVectorRequest req = Request(qs, 50, 50);
  constexpr int kBurst = 64;
  std::vector<grpc::ClientContext> ctxs(kBurst);
  std::vector<v1::QueryByVectorResponse> resps(kBurst);
  std::vector<grpc::Status> got(kBurst);
  BlockingCounter left(kBurst);
  for (int i = 0; i < kBurst; ++i) {
    stub->async()->QueryByVector(&ctxs[i], &req, &resps[i], [&, i](grpc::Status st) {
      got[i] = std::move(st);
      left.DecrementCount();
    });
  }
  left.Wait();
  int ok = 0, busy = 0;
  for (int i = 0; i < kBurst; ++i) {
    if (got[i].ok()) {
      ++ok;
      ASSERT_EQ(resps[i].results_size(), 8);
      for (int j = 0; j < 8; ++j) CheckAgainstReference(resps[i].results(j), qs[j], 50, 50);
    } else {
      ASSERT_EQ(got[i].error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED) << got[i].error_message();
      EXPECT_NE(got[i].error_message().find("server busy"), std::string::npos) << got[i].error_message();
      ++busy;
    }
  }
  EXPECT_GT(ok, 0);
  EXPECT_GT(busy, 0);
  auto after = client::Client::Connect(addr)->QueryByVector(Request({qs[0]}, 5, 0));
  EXPECT_TRUE(after.ok()) << after.status();
}

TEST_F(ServerTest, OneHandlerThreadServesManyConcurrentQueries) {
  ServerOptions o = StopForRestart();
  o.limits.handler_threads = 1;
  auto s = Server::Create(o);
  ASSERT_TRUE(s.ok()) << s.status();
  const std::string addr = "127.0.0.1:" + std::to_string((*s)->port());
  auto stub = v1::InfluenceService::NewStub(grpc::CreateChannel(addr, grpc::InsecureChannelCredentials()));
  constexpr int kCalls = 48;
  std::vector<v1::QueryByVectorRequest> reqs;
  for (int i = 0; i < kCalls; ++i) reqs.push_back(Request({SeededVector(3000 + i, kK)}, 10, 3));
  std::vector<grpc::ClientContext> ctxs(kCalls);
  std::vector<v1::QueryByVectorResponse> resps(kCalls);
  std::vector<grpc::Status> got(kCalls);
  BlockingCounter left(kCalls);
  for (int i = 0; i < kCalls; ++i) {
    stub->async()->QueryByVector(&ctxs[i], &reqs[i], &resps[i], [&, i](grpc::Status st) {
      got[i] = std::move(st);
      left.DecrementCount();
    });
  }
  left.Wait();
  for (int i = 0; i < kCalls; ++i) {
    ASSERT_TRUE(got[i].ok()) << i << ": " << got[i].error_message();
    CheckAgainstReference(resps[i].results(0), SeededVector(3000 + i, kK), 10, 3);
  }
}

TEST_F(ServerTest, HealthAndMetrics) {
  // grpc.health.v1.Health/Check with a hand-encoded HealthCheckRequest{service: "rapidin.v1.InfluenceService"}.
  auto channel = grpc::CreateChannel(addr_, grpc::InsecureChannelCredentials());
  grpc::GenericStub generic(channel);
  const std::string service = "rapidin.v1.InfluenceService";
  std::string req_bytes = std::string("\x0a", 1) + static_cast<char>(service.size()) + service;
  grpc::Slice slice(req_bytes);
  grpc::ByteBuffer req(&slice, 1), resp;
  grpc::ClientContext ctx;
  std::promise<grpc::Status> done;
  generic.UnaryCall(&ctx, "/grpc.health.v1.Health/Check", grpc::StubOptions(), &req, &resp,
                    [&](grpc::Status s) { done.set_value(s); });
  auto st = done.get_future().get();
  ASSERT_TRUE(st.ok()) << st.error_message();
  std::vector<grpc::Slice> slices;
  ASSERT_TRUE(resp.Dump(&slices).ok());
  std::string bytes;
  for (auto& s : slices) bytes += std::string(reinterpret_cast<const char*>(s.begin()), s.size());
  EXPECT_EQ(bytes, std::string("\x08\x01", 2));  // status: SERVING

  ASSERT_TRUE(client_->QueryByVector(Request({SeededVector(1, kK)}, 5, 0)).ok());
  (void)client_->GetRecord("missing", false);
  httplib::Client http("127.0.0.1", server_->metrics_port());
  auto res = http.Get("/metrics");
  ASSERT_TRUE(res);
  EXPECT_EQ(res->status, 200);
  for (const char* want : {"rapidin_requests_total{code=\"OK\",method=\"QueryByVector\"}",
                           "rapidin_requests_total{code=\"NOT_FOUND\",method=\"GetRecord\"}",
                           "rapidin_request_latency_seconds_bucket", "rapidin_scanned_bytes_total",
                           "rapidin_tier_bytes{tier=\"host\"}", "rapidin_tier_records{tier=\"disk\"} 1003"}) {
    EXPECT_NE(res->body.find(want), std::string::npos) << want;
  }
}

TEST_F(ServerTest, RestartKeepsData) {
  ServerOptions o = StopForRestart();
  o.store.shards = 2;  // a different shard count over the same store
  auto s = Server::Create(o);
  ASSERT_TRUE(s.ok()) << s.status();
  auto c = client::Client::Connect("127.0.0.1:" + std::to_string((*s)->port()));
  const auto q = SeededVector(4, kK);
  auto r = c->QueryByVector(Request({q}, 20, 5));
  ASSERT_TRUE(r.ok()) << r.status();
  CheckAgainstReference(r->results(0), q, 20, 5);
}

// Cold tier: with a host budget of 400 rows, the other 603 are read from RocksDB in 97-row chunks spread over the
// workers at every scan; the answers equal the brute-force reference, Stats reports the split, and a replaced cold
// row is seen by the next scan.
TEST_F(ServerTest, ColdTierScansFromDiskAndFollowsIngest) {
  ServerOptions o = StopForRestart();
  o.store.shards = 3;
  o.store.host_budget_bytes = 400 * kK * 2;
  o.scan.cold_chunk_bytes = 97 * kK * 2;
  auto s = Server::Create(o);
  ASSERT_TRUE(s.ok()) << s.status();
  auto c = client::Client::Connect("127.0.0.1:" + std::to_string((*s)->port()));
  std::vector<std::vector<float>> qs = {SeededVector(5, kK), SeededVector(6, kK)};
  auto r = c->QueryByVector(Request(qs, 30, 10));
  ASSERT_TRUE(r.ok()) << r.status();
  uint64_t rows = 0, cold = 0;
  for (const auto& t : r->shard_timings()) {
    rows += t.rows();
    cold += t.cold_rows();
    EXPECT_GT(t.cold_rows(), 0u) << "shard " << t.shard();  // 7 chunks over 3 workers
  }
  EXPECT_EQ(rows, static_cast<uint64_t>(kN));
  EXPECT_EQ(cold, static_cast<uint64_t>(kN - 400));
  for (int j = 0; j < 2; ++j) CheckAgainstReference(r->results(j), qs[j], 30, 10);
  auto st = c->Stats();
  ASSERT_TRUE(st.ok());
  bool seen = false;
  for (const auto& t : st->tiers()) {
    if (t.tier() == "host") EXPECT_EQ(t.records(), 400u);
    if (t.tier() == "cold") {
      seen = true;
      EXPECT_EQ(t.records(), static_cast<uint64_t>(kN - 400));
      EXPECT_EQ(t.bytes(), static_cast<uint64_t>(kN - 400) * kK * 2);
    }
  }
  EXPECT_TRUE(seen);
  // Replace cold row 900 with a vector aligned with the query: it becomes the top hit; GetRecord reads it back.
  std::vector<float> v(qs[0]);
  for (auto& x : v) x *= 4;
  auto in = IngestOne(c.get(), "rec-900", v);
  ASSERT_TRUE(in.ok()) << in.status();
  r = c->QueryByVector(Request({qs[0]}, 1, 0));
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->results(0).helpful(0).index(), 900u);
  auto g = c->GetRecord("rec-900", true);
  ASSERT_TRUE(g.ok());
  ASSERT_EQ(g->vector_size(), kK);
  EXPECT_EQ(g->vector(3), kernels::HalfToFloat(kernels::FloatToHalf(v[3])));
}

// --index ivf and --index pca: with every list probed (every row a candidate) the answers are the exact scan's;
// ingest and delete through the server keep the index in step (a new record is found, a deleted one is gone);
// shutdown saves an index that the next start loads as current. The GPU backend and unknown names are refused.
class ServerIndexTest : public ServerTest, public ::testing::WithParamInterface<std::string> {};

TEST_P(ServerIndexTest, FollowsIngestAndDeleteAndPersists) {
  ServerOptions o = StopForRestart();
  o.store.shards = 3;
  o.scan.index = GetParam();
  o.scan.index_nlist = 8;
  o.scan.index_nprobe = 8;
  o.scan.index_dim = 16;
  o.scan.index_min_candidates = kN;
  {
    ServerOptions bad = o;
    bad.scan.backend = "cuda";
    EXPECT_EQ(Server::Create(bad).status().code(), absl::StatusCode::kInvalidArgument);
    bad = o;
    bad.scan.index = "hnsw";
    EXPECT_EQ(Server::Create(bad).status().code(), absl::StatusCode::kInvalidArgument);
  }
  auto s = Server::Create(o);
  ASSERT_TRUE(s.ok()) << s.status();
  auto c = client::Client::Connect("127.0.0.1:" + std::to_string((*s)->port()));
  auto st = c->Stats();
  ASSERT_TRUE(st.ok());
  EXPECT_NE(st->backend().find(GetParam() == "ivf" ? "ivf nlist=8 nprobe=8" : "pca dim=16"), std::string::npos)
      << st->backend();
  std::vector<std::vector<float>> qs = {SeededVector(7, kK), SeededVector(8, kK)};
  auto r = c->QueryByVector(Request(qs, 20, 5));
  ASSERT_TRUE(r.ok()) << r.status();
  for (int j = 0; j < 2; ++j) CheckAgainstReference(r->results(j), qs[j], 20, 5);

  std::vector<float> v(qs[0]);
  for (auto& x : v) x *= 4;
  auto in = IngestOne(c.get(), "aligned", v);
  ASSERT_TRUE(in.ok()) << in.status();
  r = c->QueryByVector(Request({qs[0]}, 1, 0));
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->results(0).helpful(0).id(), "aligned");
  auto del = c->DeleteRecords({"aligned"});
  ASSERT_TRUE(del.ok()) << del.status();
  r = c->QueryByVector(Request({qs[0]}, 1, 0));
  ASSERT_TRUE(r.ok());
  EXPECT_NE(r->results(0).helpful(0).id(), "aligned");

  (*s)->Shutdown(absl::Seconds(1));
  s->reset();
  storage::StoreOptions so;
  so.num_shards = 1;
  auto store = storage::Store::Open(o.store.path, so);
  ASSERT_TRUE(store.ok()) << store.status();
  auto check = [&](auto loaded) {
    ASSERT_TRUE(loaded.ok()) << loaded.status();
    EXPECT_FALSE((*loaded)->stale());
    EXPECT_EQ((*loaded)->rows(), static_cast<uint64_t>(kN));  // the ingested row came and went
  };
  if (GetParam() == "ivf") {
    check(query::IvfIndex::Load(query::IvfIndex::DefaultPath(o.store.path), **store));
  } else {
    check(query::PcaIndex::Load(query::PcaIndex::DefaultPath(o.store.path), **store));
  }
}

INSTANTIATE_TEST_SUITE_P(Indexes, ServerIndexTest, ::testing::Values("ivf", "pca"));

}  // namespace
}  // namespace rapidin::server
