#include "server/server.h"

#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/grpcpp.h>
#include <grpcpp/health_check_service_interface.h>
#include <spdlog/spdlog.h>

#include <chrono>
#include <cmath>
#include <filesystem>
#include <mutex>
#include <thread>

#include "absl/strings/str_cat.h"
#include "base/thread_pool.h"
#include "model/attribution.h"
#include "model/featurizer.h"
#include "query/ivf_index.h"
#include "query/pca_index.h"
#include "query/query_engine.h"
#include "rapidin/v1/rapidin.grpc.pb.h"
#include "server/internal/auth.h"
#include "server/internal/router.h"
#include "server/internal/service.h"
#include "server/http.h"
#include "server/metrics.h"
#include "storage/store.h"

namespace rapidin::server {

using query::CudaBackendUsable;
using query::CudaHostAllocator;
using query::QueryEngine;
using query::SearchResult;

namespace {

namespace v1 = rapidin::v1;
using internal::DeadlineOf;
using internal::Need;

using Call = internal::UnaryCall;

// The shard service on gRPC's callback API: no thread waits for a request. Authorization runs on gRPC's thread;
// the rest on the handler pool (admission: RESOURCE_EXHAUSTED when its queue is full), and a scan in the query
// engine, whose answer is handed back to the pool for the record reads.
class InfluenceServiceImpl final : public v1::InfluenceService::CallbackService {
 public:
  InfluenceServiceImpl(storage::Store* store, QueryEngine* engine, Metrics* metrics,
                       const model::Featurizer* featurizer, const ServerOptions& options,
                       const internal::TokenTable* tokens, ThreadPool* pool, query::IvfIndex* ivf,
                       query::PcaIndex* pca)
      : store_(store), engine_(engine), metrics_(metrics), featurizer_(featurizer), options_(options),
        tokens_(tokens), pool_(pool), ivf_(ivf), pca_(pca) {}

  grpc::ServerUnaryReactor* Query(grpc::CallbackServerContext* ctx, const v1::QueryRequest* req,
                                  v1::QueryResponse* resp) override {
    return Start(ctx, Need::kQuery, "Query", [this, ctx, req, resp](const Call& call) {
      absl::Status st = internal::CheckTextQuery(*req, featurizer_ != nullptr, options_.limits);
      if (!st.ok()) return call.Finish(st);
      auto q = std::make_shared<std::vector<float>>();
      auto gen = internal::GenerationGradient(*featurizer_, *req, call.t0, q.get(), resp);
      if (!gen.ok()) return call.Finish(gen.status());
      if (ctx->IsCancelled()) return call.Finish(absl::CancelledError("cancelled by the client"));
      auto example = std::make_shared<model::Example>(std::move(*gen));
      engine_->SearchAsync(*q, 1, static_cast<int>(req->top_k()), static_cast<int>(req->harmful_k()),
                           DeadlineOf(ctx), [this, req, resp, call, q, example](absl::StatusOr<SearchResult> res) {
                             auto r = std::make_shared<absl::StatusOr<SearchResult>>(std::move(res));
                             pool_->Schedule([this, req, resp, call, q, example, r] {
                               call.Finish(AfterQueryScan(*req, *example, *q, *r, call.t0, resp));
                             });
                           });
    });
  }

  grpc::ServerUnaryReactor* QueryByVector(grpc::CallbackServerContext* ctx, const v1::QueryByVectorRequest* req,
                                          v1::QueryByVectorResponse* resp) override {
    return Start(ctx, Need::kQuery, "QueryByVector", [this, ctx, req, resp](const Call& call) {
      int q = 0;
      auto matrix = QueryMatrix(*req, &q);
      if (!matrix.ok()) return call.Finish(matrix.status());
      auto queries = std::make_shared<const std::vector<float>>(*matrix);  // for FillRecords' re-check
      engine_->SearchAsync(std::move(*matrix), q, static_cast<int>(req->top_k()), static_cast<int>(req->harmful_k()),
                           DeadlineOf(ctx), [this, req, resp, call, q, queries](absl::StatusOr<SearchResult> res) {
                             auto r = std::make_shared<absl::StatusOr<SearchResult>>(std::move(res));
                             pool_->Schedule([this, req, resp, call, q, queries, r] {
                               call.Finish(AfterVectorScan(*req, q, *queries, *r, call.t0, resp));
                             });
                           });
    });
  }

  grpc::ServerReadReactor<v1::IngestRequest>* Ingest(grpc::CallbackServerContext* ctx,
                                                     v1::IngestResponse* resp) override {
    return new IngestReactor(this, ctx, resp);
  }

  grpc::ServerUnaryReactor* DeleteRecords(grpc::CallbackServerContext* ctx, const v1::DeleteRecordsRequest* req,
                                          v1::DeleteRecordsResponse* resp) override {
    return Start(ctx, Need::kAdmin, "DeleteRecords",
                 [this, req, resp](const Call& call) { call.Finish(DoDeleteRecords(*req, resp)); });
  }

  grpc::ServerUnaryReactor* GetRecord(grpc::CallbackServerContext* ctx, const v1::GetRecordRequest* req,
                                      v1::GetRecordResponse* resp) override {
    return Start(ctx, Need::kQuery, "GetRecord",
                 [this, req, resp](const Call& call) { call.Finish(DoGetRecord(*req, resp)); });
  }

  grpc::ServerUnaryReactor* Stats(grpc::CallbackServerContext* ctx, const v1::StatsRequest*,
                                  v1::StatsResponse* resp) override {
    return Start(ctx, Need::kAnyRole, "Stats", [this, resp](const Call& call) {
      DoStats(resp);
      call.Finish(absl::OkStatus());
    });
  }

  absl::Status DoDeleteRecords(const v1::DeleteRecordsRequest& req, v1::DeleteRecordsResponse* resp) {
    absl::StatusOr<storage::DeleteResult> res;
    {
      MutexLock l(&index_write_mu_);  // the index follows the store in the store's order of writes
      res = store_->Delete({req.ids().begin(), req.ids().end()});
      if (res.ok() && ivf_ != nullptr) ivf_->ApplyDelete(*res);
      if (res.ok() && pca_ != nullptr) pca_->ApplyDelete(*res);
    }
    if (!res.ok()) return res.status();
    resp->set_deleted(res->deleted);
    resp->set_not_found(res->not_found);
    if (req.compact()) {
      if (absl::Status st = store_->Compact(); !st.ok()) return st;
    }
    resp->set_record_count(store_->live_records());
    UpdateTierMetrics();
    spdlog::info("delete: {} deleted, {} not found{}, store now {} records", res->deleted, res->not_found,
                 req.compact() ? ", compacted" : "", resp->record_count());
    return absl::OkStatus();
  }

  absl::Status DoGetRecord(const v1::GetRecordRequest& req, v1::GetRecordResponse* resp) const {
    if (req.id().empty()) return absl::InvalidArgumentError("id is empty");
    auto sr = store_->GetRecordById(req.id());
    if (!sr.ok()) return sr.status();
    *resp->mutable_record() = sr->record();
    resp->set_index(sr->index());
    if (req.include_vector()) {
      auto v = store_->GetVector(sr->index());
      if (!v.ok()) return v.status();
      resp->mutable_vector()->Add(v->begin(), v->end());
    }
    return absl::OkStatus();
  }

  void DoStats(v1::StatsResponse* resp) const {
    const v1::Manifest m = store_->manifest();
    resp->set_num_records(m.record_count() - m.deleted_count());
    resp->set_k(m.k());
    resp->set_dtype(m.dtype());
    resp->set_projection_state_id(m.projection_state_id());
    resp->set_projection_state(m.projection_state());
    resp->set_format_version(m.format_version());
    resp->set_num_shards(store_->num_shards());
    resp->set_num_workers(engine_->num_workers());
    resp->set_backend(engine_->backend());
    resp->set_store_path(store_->path());
    resp->set_max_top_k(options_.limits.max_top_k);
    resp->set_model_loaded(featurizer_ != nullptr);
    if (featurizer_) resp->set_model_device(featurizer_->engine().device());
    const storage::TierUsage u = store_->Usage();
    auto* host = resp->add_tiers();
    host->set_tier("host");
    host->set_records(u.host_records);
    host->set_bytes(u.host_bytes);
    auto* disk = resp->add_tiers();
    disk->set_tier("disk");
    disk->set_records(m.record_count());
    disk->set_bytes(u.disk_bytes);
    auto* cold = resp->add_tiers();
    cold->set_tier("cold");
    cold->set_records(u.cold_records);
    cold->set_bytes(u.cold_bytes);
    if (engine_->uses_gpu()) {
      const kernels::TierBytes g = engine_->GpuUsage();
      const uint64_t row = uint64_t{m.k()} * 2;
      auto* hot = resp->add_tiers();
      hot->set_tier("gpu");
      hot->set_records(row ? g.hot / row : 0);
      hot->set_bytes(g.hot);
      auto* warm = resp->add_tiers();
      warm->set_tier("streamed");
      warm->set_records(row ? g.warm / row : 0);
      warm->set_bytes(g.warm);
    }
  }

  void UpdateTierMetrics() {
    const storage::TierUsage u = store_->Usage();
    metrics_->SetTier("host", static_cast<double>(u.host_records), static_cast<double>(u.host_bytes));
    metrics_->SetTier("cold", static_cast<double>(u.cold_records), static_cast<double>(u.cold_bytes));
    metrics_->SetTier("disk", static_cast<double>(store_->size()), static_cast<double>(u.disk_bytes));
    if (engine_->uses_gpu()) {
      const kernels::TierBytes g = engine_->GpuUsage();
      const double row = static_cast<double>(store_->k()) * 2;
      metrics_->SetTier("gpu", g.hot / row, static_cast<double>(g.hot));
      metrics_->SetTier("streamed", g.warm / row, static_cast<double>(g.warm));
    }
  }

 private:
  // An ingest stream: each message is one batch, applied (one synced write) on the handler pool before the next
  // is read. The answer counts the batches applied; the first failure ends the stream and names the batch.
  class IngestReactor final : public grpc::ServerReadReactor<v1::IngestRequest> {
   public:
    IngestReactor(InfluenceServiceImpl* service, grpc::CallbackServerContext* ctx, v1::IngestResponse* resp)
        : s_(service), ctx_(ctx), resp_(resp), t0_(std::chrono::steady_clock::now()) {
      if (absl::Status a = s_->Authorize(*ctx, Need::kIngest, "Ingest"); !a.ok()) {
        Finish(internal::Observe(s_->metrics_, "Ingest", t0_, a));
        return;
      }
      StartRead(&msg_);
    }
    void OnReadDone(bool ok) override {
      if (!ok) {  // the client closed its side (or the call is cancelled: the status then goes nowhere)
        return Done(ctx_->IsCancelled() ? absl::CancelledError("ingest cancelled by the client") : absl::OkStatus());
      }
      if (!s_->pool_->TrySchedule([this] { Apply(); })) {
        Done(absl::ResourceExhaustedError(absl::StrCat("server busy: ", s_->pool_->max_queued(),
                                                       " requests are waiting for a handler thread; batch ",
                                                       resp_->batches_applied() + 1, " not applied (",
                                                       resp_->batches_applied(), " earlier batches were)")));
      }
    }
    void OnDone() override { delete this; }

   private:
    void Apply() {
      if (ctx_->IsCancelled()) return Done(absl::CancelledError("ingest cancelled by the client"));
      std::vector<storage::IngestItem> items(msg_.records_size());
      for (int i = 0; i < msg_.records_size(); ++i) {
        auto* r = msg_.mutable_records(i);
        items[i].record = std::move(*r->mutable_record());
        items[i].vector.assign(r->vector().begin(), r->vector().end());
      }
      absl::StatusOr<storage::IngestResult> res;
      {
        MutexLock l(&s_->index_write_mu_);  // the index follows the store in the store's order of writes
        res = s_->store_->Ingest(items);
        if (res.ok() && s_->ivf_ != nullptr) s_->ivf_->ApplyIngest(*res, items);
        if (res.ok() && s_->pca_ != nullptr) s_->pca_->ApplyIngest(*res, items);
      }
      if (!res.ok()) {
        return Done(absl::Status(res.status().code(),
                                 absl::StrCat("batch ", resp_->batches_applied() + 1, " rejected (",
                                              resp_->batches_applied(), " earlier batches were applied): ",
                                              res.status().message())));
      }
      resp_->set_batches_applied(resp_->batches_applied() + 1);
      resp_->set_records_inserted(resp_->records_inserted() + res->inserted);
      resp_->set_records_replaced(resp_->records_replaced() + res->replaced);
      StartRead(&msg_);
    }
    void Done(const absl::Status& st) {
      resp_->set_record_count(s_->store_->live_records());
      s_->UpdateTierMetrics();
      spdlog::info("ingest: {} batches, {} inserted, {} replaced, store now {} records{}", resp_->batches_applied(),
                   resp_->records_inserted(), resp_->records_replaced(), resp_->record_count(),
                   st.ok() ? "" : absl::StrCat(" (", st.message(), ")"));
      Finish(internal::Observe(s_->metrics_, "Ingest", t0_, st));
    }

    InfluenceServiceImpl* const s_;
    grpc::CallbackServerContext* const ctx_;
    v1::IngestResponse* const resp_;
    const std::chrono::steady_clock::time_point t0_;
    v1::IngestRequest msg_;
  };

  grpc::ServerUnaryReactor* Start(grpc::CallbackServerContext* ctx, Need need, const char* method,
                                  std::function<void(const Call&)> work) {
    return internal::StartOnPool(ctx, method, need, tokens_, metrics_, pool_, std::move(work));
  }

  absl::Status Authorize(const grpc::ServerContextBase& ctx, Need need, const char* method) const {
    return internal::Authorize(tokens_, ctx, need, method);
  }

  // Validates the request and returns the query matrix (q x K), aggregated into one row when asked.
  absl::StatusOr<std::vector<float>> QueryMatrix(const v1::QueryByVectorRequest& req, int* q) const {
    const v1::Manifest m = store_->manifest();
    const uint32_t k = m.k();
    if (req.queries_size() > options_.limits.max_query_vectors) {
      return absl::InvalidArgumentError(absl::StrCat(req.queries_size(), " query vectors; at most ",
                                                     options_.limits.max_query_vectors, " per request"));
    }
    absl::Status st =
        internal::CheckQueryVectors(req, k, m.projection_state_id(), options_.limits.max_top_k, "this store uses");
    if (!st.ok()) return st;
    const int nq = req.queries_size();
    std::vector<float> out(static_cast<size_t>(req.aggregate() ? 1 : nq) * k, 0.0f);
    for (int j = 0; j < nq; ++j) {
      const auto& v = req.queries(j);
      const float w = v.weight() == 0.0f ? 1.0f : v.weight();
      if (!std::isfinite(w)) return absl::InvalidArgumentError(absl::StrCat("query vector ", j, ": weight is not finite"));
      for (uint32_t c = 0; c < k; ++c) {
        const float x = v.values(c);
        if (!std::isfinite(x)) {
          return absl::InvalidArgumentError(absl::StrCat("query vector ", j, ": value ", c, " is not finite"));
        }
        if (req.aggregate()) {
          out[c] += w * x;
        } else {
          out[static_cast<size_t>(j) * k + c] = x;
        }
      }
    }
    if (req.aggregate()) {
      for (uint32_t c = 0; c < k; ++c) {
        if (!std::isfinite(out[c])) return absl::InvalidArgumentError("weighted sum of the query vectors overflows");
      }
    }
    *q = req.aggregate() ? 1 : nq;
    // Scores are fp32 sums of query x stored value, and stored values reach 65504 (fp16): with the query's L1 norm
    // below 1e33 no score can overflow (65504e33 < FLT_MAX). Compressed gradients are many orders smaller.
    for (int j = 0; j < *q; ++j) {
      double l1 = 0;
      for (uint32_t c = 0; c < k; ++c) l1 += std::fabs(out[static_cast<size_t>(j) * k + c]);
      if (l1 > 1e33) {
        return absl::InvalidArgumentError(absl::StrCat(req.aggregate() ? "the weighted sum of the query vectors"
                                                                        : absl::StrCat("query vector ", j),
                                                       " has an L1 norm of ", l1,
                                                       "; above 1e33 its scores could overflow float32"));
      }
    }
    return out;
  }

  // The candidates' records, best first. A row that changed between the scan and now (its record deleted, or
  // its row reused by a new record, or replaced in place) is left out: its score is re-checked against the row's
  // vector now (query: the K floats the candidates were scored with), so a score is never shown beside a record
  // that did not earn it.
  absl::Status FillRecords(const std::vector<kernels::Candidate>& cands, const float* query, bool omit_text,
                           google::protobuf::RepeatedPtrField<v1::ScoredRecord>* out) const {
    uint32_t rank = 0;
    for (const auto& c : cands) {
      auto rec = store_->GetRecordByIndex(c.index);
      if (absl::IsNotFound(rec.status())) continue;
      if (!rec.ok()) return rec.status();
      auto now = store_->GetVector(c.index);
      if (!now.ok()) return now.status();
      double dot = 0, mag = 0;
      for (size_t e = 0; e < now->size(); ++e) {
        dot += static_cast<double>((*now)[e]) * query[e];
        mag += std::fabs(static_cast<double>((*now)[e]) * query[e]);
      }
      // fp32 accumulation over K terms stays far inside 1e-3 of the magnitude; another vector does not.
      if (!(std::fabs(dot - c.score) <= 1e-3 * mag + 1e-30)) continue;
      auto* sr = out->Add();
      sr->set_rank(++rank);
      sr->set_score(c.score);
      sr->set_index(c.index);
      sr->set_id(rec->record().id());
      if (!omit_text) *sr->mutable_record() = std::move(*rec->mutable_record());
    }
    return absl::OkStatus();
  }

  // Copies the scan's per-shard timings into the response and counts this request's share of the bytes read
  // (a scan may serve several batched requests).
  void RecordScan(const SearchResult& res, int q, google::protobuf::RepeatedPtrField<v1::ShardTiming>* out) {
    double bytes = 0;
    for (const auto& t : res.shard_timings) {
      auto* st = out->Add();
      st->set_shard(t.shard);
      st->set_backend(t.backend);
      st->set_rows(t.rows);
      st->set_scan_ms(t.scan_ms);
      st->set_bytes_scanned(t.bytes_scanned);
      st->set_cold_rows(t.cold_rows);
      bytes += static_cast<double>(t.bytes_scanned);
    }
    metrics_->AddBytesScanned(bytes * q / std::max(1, res.vectors_in_scan));
    metrics_->AddVectorsScanned(q);
  }

  // A returned record's text and stored vector, from this server's store.
  model::RecordFetcher LocalRecord() const {
    return [this](const v1::ScoredRecord& sr, v1::Record* rec, std::vector<float>* x) -> absl::Status {
      auto v = store_->GetVector(sr.index());
      if (!v.ok()) return v.status();
      *x = std::move(*v);
      auto r = store_->GetRecordByIndex(sr.index());
      if (!r.ok()) return r.status();
      *rec = std::move(*r->mutable_record());
      return absl::OkStatus();
    };
  }

  // A text query after its scan: the records, then the token attributions when asked.
  absl::Status AfterQueryScan(const v1::QueryRequest& req, const model::Example& gen, const std::vector<float>& q,
                              const absl::StatusOr<SearchResult>& res, std::chrono::steady_clock::time_point t0,
                              v1::QueryResponse* resp) {
    if (!res.ok()) return res.status();
    RecordScan(*res, 1, resp->mutable_shard_timings());
    absl::Status st = FillRecords(res->helpful[0], q.data(), req.omit_text(), resp->mutable_result()->mutable_helpful());
    if (st.ok()) {
      st = FillRecords(res->harmful[0], q.data(), req.omit_text(), resp->mutable_result()->mutable_harmful());
    }
    if (!st.ok()) return st;
    if (req.attributions()) {
      const auto ta = std::chrono::steady_clock::now();
      st = model::Attribute(*featurizer_, gen, q, LocalRecord(), resp->mutable_result());
      if (!st.ok()) return st;
      resp->set_attribution_ms(internal::MsSince(ta));
    }
    resp->set_total_ms(internal::MsSince(t0));
    return absl::OkStatus();
  }

  absl::Status AfterVectorScan(const v1::QueryByVectorRequest& req, int q, const std::vector<float>& queries,
                               const absl::StatusOr<SearchResult>& res, std::chrono::steady_clock::time_point t0,
                               v1::QueryByVectorResponse* resp) {
    if (!res.ok()) return res.status();
    const size_t k = queries.size() / std::max(q, 1);
    RecordScan(*res, q, resp->mutable_shard_timings());
    resp->set_vectors_in_scan(res->vectors_in_scan);
    for (int j = 0; j < q; ++j) {
      auto* r = resp->add_results();
      const float* qj = queries.data() + j * k;
      absl::Status st = FillRecords(res->helpful[j], qj, req.omit_text(), r->mutable_helpful());
      if (st.ok()) st = FillRecords(res->harmful[j], qj, req.omit_text(), r->mutable_harmful());
      if (!st.ok()) return st;
    }
    resp->set_total_ms(internal::MsSince(t0));
    return absl::OkStatus();
  }

  storage::Store* store_;
  QueryEngine* engine_;
  Metrics* metrics_;
  const model::Featurizer* featurizer_;
  ServerOptions options_;
  const internal::TokenTable* tokens_;  // null: no tokens required
  ThreadPool* pool_;
  query::IvfIndex* ivf_;               // null without --index ivf
  query::PcaIndex* pca_;               // null without --index pca
  Mutex index_write_mu_;               // a store write and its index update, together
};

}  // namespace

struct Server::Impl {
  ServerOptions options;
  std::unique_ptr<storage::Store> store;
  std::unique_ptr<query::IvfIndex> ivf;             // null unless --index ivf; kept in step by ingest and delete
  std::unique_ptr<query::PcaIndex> pca;             // null unless --index pca; likewise
  std::unique_ptr<model::Featurizer> featurizer;
  std::unique_ptr<QueryEngine> engine;
  std::unique_ptr<Metrics> metrics;
  std::unique_ptr<InfluenceServiceImpl> service;
  std::unique_ptr<internal::RouterService> router;  // router mode, instead of store, engine and service
  std::unique_ptr<internal::TokenTable> tokens;     // null without --auth-tokens
  std::unique_ptr<ThreadPool> pool;                 // handlers' blocking work; outlives every call
  std::unique_ptr<grpc::Server> grpc_server;
  std::unique_ptr<HttpGateway> http;                // null without --http-listen
  int port = 0;
  std::once_flag shutdown_once;
};

Server::Server(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

Server::~Server() { Shutdown(absl::Seconds(1)); }

namespace {

// Starts /metrics and the gRPC server for `service` (health and reflection included).
absl::Status Serve(const ServerOptions& options, grpc::Service* service, Metrics* metrics, const std::string& what,
                   const std::shared_ptr<grpc::ServerCredentials>& creds, const internal::TokenTable* tokens,
                   std::unique_ptr<grpc::Server>* out, int* port, std::unique_ptr<HttpGateway>* http) {
  if (!options.net.metrics_listen.empty()) {
    absl::Status st = metrics->Serve(options.net.metrics_listen);
    if (!st.ok()) return st;
  }
  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  builder.AddListeningPort(options.net.listen, creds, port);
  builder.SetMaxReceiveMessageSize(options.net.max_message_bytes);
  builder.SetMaxSendMessageSize(options.net.max_message_bytes);
  builder.RegisterService(service);
  *out = builder.BuildAndStart();
  if (!*out || *port == 0) return absl::UnavailableError(absl::StrCat("cannot listen on ", options.net.listen));
  (*out)->GetHealthCheckService()->SetServingStatus("rapidin.v1.InfluenceService", true);
  (*out)->GetHealthCheckService()->SetServingStatus("", true);
  const char* transport = options.net.tls_cert.empty()       ? "plaintext"
                          : options.net.tls_client_ca.empty() ? "TLS"
                                                              : "mutual TLS";
  spdlog::info("serving rapidin.v1.InfluenceService on port {} ({}; {}, {}){}", *port, what, transport,
               tokens ? absl::StrCat(tokens->size(), " bearer tokens") : "no tokens",
               options.net.metrics_listen.empty() ? "" : absl::StrCat(", metrics on port ", metrics->port()));
  if (!options.net.http_listen.empty()) {
    // The gateway calls the service in-process: the same handlers, limits, tokens and metrics.
    grpc::ChannelArguments args;
    args.SetMaxReceiveMessageSize(options.net.max_message_bytes);
    args.SetMaxSendMessageSize(options.net.max_message_bytes);
    auto g = HttpGateway::Start(options, (*out)->InProcessChannel(args));
    if (!g.ok()) return g.status();
    *http = std::move(*g);
  }
  return absl::OkStatus();
}

std::unique_ptr<ThreadPool> MakePool(const ServerOptions::Limits& limits) {
  const int n = limits.handler_threads > 0 ? limits.handler_threads
                                           : std::max(4, static_cast<int>(std::thread::hardware_concurrency()));
  return std::make_unique<ThreadPool>(n, limits.max_queued_requests);
}

}  // namespace

absl::StatusOr<std::unique_ptr<Server>> Server::Create(const ServerOptions& options) {
  if (options.limits.max_top_k == 0 || options.limits.max_query_vectors <= 0 || options.net.max_message_bytes <= 0 ||
      options.limits.handler_threads < 0 || options.limits.max_queued_requests <= 0) {
    return absl::InvalidArgumentError("limits must be positive");
  }
  // Security settings are checked first, before any slow start-up work.
  auto creds = internal::ServerCredentials(options.net);
  if (!creds.ok()) return creds.status();
  std::unique_ptr<internal::TokenTable> tokens;
  if (!options.net.auth_tokens.empty()) {
    auto t = internal::TokenTable::Load(options.net.auth_tokens);
    if (!t.ok()) return t.status();
    tokens = std::move(*t);
  }
  if (!options.router.shard_servers.empty()) {
    if (!options.store.path.empty()) {
      return absl::InvalidArgumentError("--store and --shard-servers exclude each other: a router has no store");
    }
    auto impl = std::make_unique<Impl>();
    impl->options = options;
    impl->tokens = std::move(tokens);
    impl->metrics = std::make_unique<Metrics>();
    impl->pool = MakePool(options.limits);
    auto router =
        internal::RouterService::Create(options, impl->metrics.get(), impl->tokens.get(), impl->pool.get());
    if (!router.ok()) return router.status();
    impl->router = std::move(*router);
    absl::Status st = Serve(options, impl->router.get(), impl->metrics.get(),
                            absl::StrCat("router over ", options.router.shard_servers.size(), " shard servers"),
                            *creds, impl->tokens.get(), &impl->grpc_server, &impl->port, &impl->http);
    if (!st.ok()) return st;
    return std::unique_ptr<Server>(new Server(std::move(impl)));
  }
  if (options.store.path.empty()) return absl::InvalidArgumentError("--store (or --shard-servers) is required");
  if (options.scan.backend != "auto" && options.scan.backend != "cpu" && options.scan.backend != "cuda") {
    return absl::InvalidArgumentError(absl::StrCat("unknown backend \"", options.scan.backend, "\" (auto|cpu|cuda)"));
  }
  if (options.scan.index != "none" && options.scan.index != "ivf" && options.scan.index != "pca") {
    return absl::InvalidArgumentError(absl::StrCat("unknown index \"", options.scan.index, "\" (none|pca|ivf)"));
  }
  const bool indexed = options.scan.index != "none";
  if (indexed && options.scan.backend == "cuda") {
    return absl::InvalidArgumentError(absl::StrCat("--index ", options.scan.index,
                                                   " scores its candidates on the CPU: use --backend cpu (or auto)"));
  }
  // Decide the backend before opening the store: the CUDA backend wants the host tier in pinned memory.
  std::string backend = indexed ? "cpu" : options.scan.backend;
  if (backend != "cpu") {
    std::string devices;
    const absl::Status usable = CudaBackendUsable(&devices);
    if (usable.ok()) {
      spdlog::info("CUDA devices: {}", devices);
      backend = "cuda";
    } else if (backend == "cuda") {
      return absl::FailedPreconditionError(absl::StrCat("--backend cuda: ", usable.message()));
    } else {
      spdlog::info("backend auto: CPU (no usable CUDA device: {})", std::string(usable.message()));
      backend = "cpu";
    }
  }
  auto impl = std::make_unique<Impl>();
  impl->options = options;
  storage::StoreOptions so;
  so.create_if_missing = options.store.create_k > 0;
  so.k = options.store.create_k;
  so.num_shards = options.store.shards > 0 ? options.store.shards : std::max(1u, std::thread::hardware_concurrency());
  so.progress = options.store.load_progress;
  so.host_budget_bytes = options.store.host_budget_bytes;
  if (backend == "cuda") so.host_allocator = CudaHostAllocator();
  if (!options.model.path.empty()) {  // checked before the store is opened (or created) for nothing
    if (absl::Status st = internal::CheckModelExists(options.model); !st.ok()) return st;
    if (!std::filesystem::exists(options.store.path)) {
      return absl::FailedPreconditionError(absl::StrCat(
          "no store at ", options.store.path, ": with --model, build it first with `rapidin cache --model ",
          options.model.path, " --store ", options.store.path, " --data ...`"));
    }
  }
  const auto t0 = std::chrono::steady_clock::now();
  auto store = storage::Store::Open(options.store.path, so);
  if (!store.ok()) return store.status();
  impl->store = std::move(*store);
  spdlog::info("store {}: {} records, K={}, projection state {}, {} shards, loaded in {:.2f} s",
               options.store.path, impl->store->size(), impl->store->k(),
               impl->store->manifest().projection_state_id(), impl->store->num_shards(),
               std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());

  if (!options.model.path.empty()) {
    auto f = internal::LoadFeaturizer(impl->store->manifest().projection_state(), options.model,
                                      absl::StrCat("store ", options.store.path));
    if (!f.ok()) return f.status();
    impl->featurizer = std::move(*f);
    spdlog::info("model {} on {} ({} gradients): gradient dimension {}, {}", options.model.path,
                 impl->featurizer->engine().device(), impl->featurizer->engine().grad_path(), impl->featurizer->engine().grad_dim(),
                 impl->featurizer->sketch().Describe());
  }

  if (indexed) {
    auto progress = [last = std::chrono::steady_clock::now()](const char* stage, uint64_t done,
                                                             uint64_t total) mutable {
      const auto now = std::chrono::steady_clock::now();
      if (done != total && now - last < std::chrono::seconds(2)) return;
      last = now;
      spdlog::info("index: {} {}/{}", stage, done, total);
    };
    const auto ti = std::chrono::steady_clock::now();
    std::string how;
    if (options.scan.index == "ivf") {
      query::IvfOptions io;
      io.nlist = options.scan.index_nlist;
      io.nprobe = options.scan.index_nprobe;
      io.progress = progress;
      auto index = query::IvfIndex::Open(*impl->store, io, options.scan.index_rebuild, &how);
      if (!index.ok()) return index.status();
      impl->ivf = std::move(*index);
      how = absl::StrCat(impl->ivf->Describe(), ", ", impl->ivf->rows(), " rows: ", how);
    } else {
      query::PcaOptions po;
      po.dim = options.scan.index_dim;
      po.progress = progress;
      auto index = query::PcaIndex::Open(*impl->store, po, options.scan.index_rebuild, &how);
      if (!index.ok()) return index.status();
      impl->pca = std::move(*index);
      how = absl::StrCat(impl->pca->Describe(), ", ", impl->pca->rows(), " rows: ", how);
    }
    spdlog::info("index {} in {:.2f} s", how,
                 std::chrono::duration<double>(std::chrono::steady_clock::now() - ti).count());
  }

  QueryEngine::Options eo;
  eo.ivf = impl->ivf.get();
  eo.nprobe = options.scan.index_nprobe;
  eo.pca = impl->pca.get();
  eo.candidates_per_k = options.scan.index_candidates_per_k;
  eo.min_candidates = options.scan.index_min_candidates;
  eo.max_batch_vectors = options.scan.max_batch_vectors;
  eo.cold_chunk_bytes = options.scan.cold_chunk_bytes;
  eo.impl = options.scan.impl;
  if (eo.impl == kernels::ScoreImpl::kAvx2 && !kernels::Avx2Available()) {
    return absl::FailedPreconditionError("AVX2/F16C/FMA kernels requested but this CPU lacks them");
  }
  eo.backend = backend;
  eo.gpu = options.scan.gpu;
  const auto t1 = std::chrono::steady_clock::now();
  auto engine = QueryEngine::Create(impl->store.get(), eo);
  if (!engine.ok()) return engine.status();
  impl->engine = std::move(*engine);
  if (backend == "cuda") {
    const kernels::TierBytes g = impl->engine->GpuUsage();
    spdlog::info("{}: {:.1f} MB hot in GPU memory, {:.1f} MB streamed from host, placed in {:.2f} s",
                 impl->engine->backend(), g.hot / 1e6, g.warm / 1e6,
                 std::chrono::duration<double>(std::chrono::steady_clock::now() - t1).count());
  }
  impl->metrics = std::make_unique<Metrics>();
  impl->tokens = std::move(tokens);
  impl->pool = MakePool(options.limits);
  impl->service = std::make_unique<InfluenceServiceImpl>(impl->store.get(), impl->engine.get(), impl->metrics.get(),
                                                         impl->featurizer.get(), options, impl->tokens.get(),
                                                         impl->pool.get(), impl->ivf.get(), impl->pca.get());
  impl->service->UpdateTierMetrics();
  absl::Status st = Serve(options, impl->service.get(), impl->metrics.get(),
                          absl::StrCat(impl->engine->num_workers(), " workers, ", impl->engine->backend(), " kernels"),
                          *creds, impl->tokens.get(), &impl->grpc_server, &impl->port, &impl->http);
  if (!st.ok()) return st;
  return std::unique_ptr<Server>(new Server(std::move(impl)));
}

int Server::port() const { return impl_->port; }
int Server::http_port() const { return impl_->http ? impl_->http->port() : 0; }
int Server::metrics_port() const { return impl_->options.net.metrics_listen.empty() ? 0 : impl_->metrics->port(); }

void Server::Wait() { impl_->grpc_server->Wait(); }

absl::Status Server::ReloadTokens() {
  if (!impl_->tokens) return absl::FailedPreconditionError("the server was started without --auth-tokens");
  absl::Status st = impl_->tokens->Reload();
  if (st.ok()) spdlog::info("reloaded {}: {} bearer tokens", impl_->options.net.auth_tokens, impl_->tokens->size());
  return st;
}

void Server::Shutdown(absl::Duration grace) {
  std::call_once(impl_->shutdown_once, [&] {
    spdlog::info("shutting down (grace {} ms)", absl::ToInt64Milliseconds(grace));
    if (impl_->http) impl_->http->Stop();  // no new HTTP calls; the gRPC shutdown below finishes the rest
    impl_->grpc_server->GetHealthCheckService()->SetServingStatus(false);
    impl_->grpc_server->Shutdown(absl::ToChronoTime(absl::Now() + grace));  // returns when every call is finished
    impl_->pool.reset();
    impl_->metrics->Stop();
    impl_->engine.reset();
    // The index follows every write made through this server; saved now, the next start loads it as current.
    auto save = [&](const auto& index, const std::string& path) {
      if (index == nullptr || impl_->store == nullptr || index->sequence() != impl_->store->sequence()) return;
      if (absl::Status st = index->Save(path); st.ok()) {
        spdlog::info("index saved to {}", path);
      } else {
        spdlog::warn("index not saved ({}): the next start brings it up to date", std::string(st.message()));
      }
    };
    if (impl_->store != nullptr) {
      save(impl_->ivf, query::IvfIndex::DefaultPath(impl_->store->path()));
      save(impl_->pca, query::PcaIndex::DefaultPath(impl_->store->path()));
    }
    impl_->ivf.reset();
    impl_->pca.reset();
    impl_->store.reset();
    spdlog::info("shutdown complete");
  });
}

}  // namespace rapidin::server
