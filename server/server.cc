#include "server/server.h"

#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/grpcpp.h>
#include <grpcpp/health_check_service_interface.h>
#include <spdlog/spdlog.h>

#include <chrono>
#include <filesystem>
#include <cmath>
#include <mutex>
#include <thread>

#include "absl/strings/str_cat.h"
#include "rapidin/v1/rapidin.grpc.pb.h"
#include "model/featurizer.h"
#include "server/metrics.h"
#include "server/query_engine.h"
#include "storage/store.h"

namespace rapidin::server {
namespace {

// Proto3 strings must be UTF-8, but a byte-fallback token can hold part of a multi-byte character: such bytes
// become U+FFFD in the token's text. Its byte offsets stay exact, so a client can always cut the original bytes.
std::string ValidUtf8(const std::string& s) {
  std::string out;
  out.reserve(s.size());
  const auto* p = reinterpret_cast<const unsigned char*>(s.data());
  const size_t n = s.size();
  for (size_t i = 0; i < n;) {
    const unsigned char c = p[i];
    size_t len = c < 0x80 ? 1 : (c >> 5) == 0x6 ? 2 : (c >> 4) == 0xe ? 3 : (c >> 3) == 0x1e ? 4 : 0;
    bool ok = len > 0 && i + len <= n;
    for (size_t k = 1; ok && k < len; ++k) ok = (p[i + k] & 0xc0) == 0x80;
    if (ok && len == 2) ok = c >= 0xc2;                                        // overlong
    if (ok && len == 3) ok = !(c == 0xe0 && p[i + 1] < 0xa0) && !(c == 0xed && p[i + 1] >= 0xa0);  // overlong, surrogates
    if (ok && len == 4) ok = !(c == 0xf0 && p[i + 1] < 0x90) && !(c == 0xf4 && p[i + 1] >= 0x90) && c <= 0xf4;
    if (ok) {
      out.append(s, i, len);
      i += len;
    } else {
      out += "\xef\xbf\xbd";
      ++i;
    }
  }
  return out;
}

namespace v1 = rapidin::v1;

// The one place absl::Status becomes grpc::Status (the codes map one to one).
grpc::Status ToGrpc(const absl::Status& s) {
  if (s.ok()) return grpc::Status::OK;
  return grpc::Status(static_cast<grpc::StatusCode>(s.code()), std::string(s.message()));
}

const char* CodeName(grpc::StatusCode c) {
  static const char* const kNames[] = {"OK",
                                       "CANCELLED",
                                       "UNKNOWN",
                                       "INVALID_ARGUMENT",
                                       "DEADLINE_EXCEEDED",
                                       "NOT_FOUND",
                                       "ALREADY_EXISTS",
                                       "PERMISSION_DENIED",
                                       "RESOURCE_EXHAUSTED",
                                       "FAILED_PRECONDITION",
                                       "ABORTED",
                                       "OUT_OF_RANGE",
                                       "UNIMPLEMENTED",
                                       "INTERNAL",
                                       "UNAVAILABLE",
                                       "DATA_LOSS",
                                       "UNAUTHENTICATED"};
  const int i = static_cast<int>(c);
  return i >= 0 && i <= 16 ? kNames[i] : "UNKNOWN";
}

absl::Time DeadlineOf(const grpc::ServerContext* ctx) {
  const auto d = ctx->deadline();
  if (d == std::chrono::system_clock::time_point::max()) return absl::InfiniteFuture();
  return absl::FromChrono(d);
}

class InfluenceServiceImpl final : public v1::InfluenceService::Service {
 public:
  InfluenceServiceImpl(storage::Store* store, QueryEngine* engine, Metrics* metrics,
                       const model::Featurizer* featurizer, const ServerOptions& options)
      : store_(store), engine_(engine), metrics_(metrics), featurizer_(featurizer), options_(options) {}

  grpc::Status Query(grpc::ServerContext* ctx, const v1::QueryRequest* req, v1::QueryResponse* resp) override {
    const auto t0 = std::chrono::steady_clock::now();
    return Observe("Query", t0, DoQuery(ctx, *req, resp, t0));
  }

  grpc::Status QueryByVector(grpc::ServerContext* ctx, const v1::QueryByVectorRequest* req,
                             v1::QueryByVectorResponse* resp) override {
    const auto t0 = std::chrono::steady_clock::now();
    return Observe("QueryByVector", t0, DoQueryByVector(ctx, *req, resp, t0));
  }

  grpc::Status Ingest(grpc::ServerContext* ctx, grpc::ServerReader<v1::IngestRequest>* reader,
                      v1::IngestResponse* resp) override {
    const auto t0 = std::chrono::steady_clock::now();
    v1::IngestRequest msg;
    absl::Status st;
    while (reader->Read(&msg)) {
      if (ctx->IsCancelled()) {
        st = absl::CancelledError("ingest cancelled by the client");
        break;
      }
      std::vector<storage::IngestItem> items(msg.records_size());
      for (int i = 0; i < msg.records_size(); ++i) {
        auto* r = msg.mutable_records(i);
        items[i].record = std::move(*r->mutable_record());
        items[i].vector.assign(r->vector().begin(), r->vector().end());
      }
      auto res = store_->Ingest(items);
      if (!res.ok()) {
        st = absl::Status(res.status().code(),
                          absl::StrCat("batch ", resp->batches_applied() + 1, " rejected (", resp->batches_applied(),
                                       " earlier batches were applied): ", res.status().message()));
        break;
      }
      resp->set_batches_applied(resp->batches_applied() + 1);
      resp->set_records_inserted(resp->records_inserted() + res->inserted);
      resp->set_records_replaced(resp->records_replaced() + res->replaced);
      resp->set_record_count(store_->size());
    }
    resp->set_record_count(store_->size());
    UpdateTierMetrics();
    spdlog::info("ingest: {} batches, {} inserted, {} replaced, store now {} records{}", resp->batches_applied(),
                 resp->records_inserted(), resp->records_replaced(), resp->record_count(),
                 st.ok() ? "" : absl::StrCat(" (", st.message(), ")"));
    return Observe("Ingest", t0, st);
  }

  grpc::Status GetRecord(grpc::ServerContext*, const v1::GetRecordRequest* req, v1::GetRecordResponse* resp) override {
    const auto t0 = std::chrono::steady_clock::now();
    if (req->id().empty()) return Observe("GetRecord", t0, absl::InvalidArgumentError("id is empty"));
    auto sr = store_->GetRecordById(req->id());
    if (!sr.ok()) return Observe("GetRecord", t0, sr.status());
    *resp->mutable_record() = sr->record();
    resp->set_index(sr->index());
    if (req->include_vector()) {
      auto v = store_->GetVector(sr->index());
      if (!v.ok()) return Observe("GetRecord", t0, v.status());
      resp->mutable_vector()->Add(v->begin(), v->end());
    }
    return Observe("GetRecord", t0, absl::OkStatus());
  }

  grpc::Status Stats(grpc::ServerContext*, const v1::StatsRequest*, v1::StatsResponse* resp) override {
    const auto t0 = std::chrono::steady_clock::now();
    const v1::Manifest m = store_->manifest();
    resp->set_num_records(m.record_count());
    resp->set_k(m.k());
    resp->set_dtype(m.dtype());
    resp->set_projection_state_id(m.projection_state_id());
    resp->set_format_version(m.format_version());
    resp->set_num_shards(store_->num_shards());
    resp->set_num_workers(engine_->num_workers());
    resp->set_backend(engine_->backend());
    resp->set_store_path(store_->path());
    resp->set_max_top_k(options_.max_top_k);
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
      const GpuTierUsage g = engine_->GpuUsage();
      const uint64_t row = uint64_t{m.k()} * 2;
      auto* hot = resp->add_tiers();
      hot->set_tier("gpu");
      hot->set_records(row ? g.hot_bytes / row : 0);
      hot->set_bytes(g.hot_bytes);
      auto* warm = resp->add_tiers();
      warm->set_tier("streamed");
      warm->set_records(row ? g.warm_bytes / row : 0);
      warm->set_bytes(g.warm_bytes);
    }
    return Observe("Stats", t0, absl::OkStatus());
  }

  void UpdateTierMetrics() {
    const storage::TierUsage u = store_->Usage();
    metrics_->SetTier("host", static_cast<double>(u.host_records), static_cast<double>(u.host_bytes));
    metrics_->SetTier("cold", static_cast<double>(u.cold_records), static_cast<double>(u.cold_bytes));
    metrics_->SetTier("disk", static_cast<double>(store_->size()), static_cast<double>(u.disk_bytes));
    if (engine_->uses_gpu()) {
      const GpuTierUsage g = engine_->GpuUsage();
      const double row = static_cast<double>(store_->k()) * 2;
      metrics_->SetTier("gpu", g.hot_bytes / row, static_cast<double>(g.hot_bytes));
      metrics_->SetTier("streamed", g.warm_bytes / row, static_cast<double>(g.warm_bytes));
    }
  }

 private:
  grpc::Status Observe(const char* method, std::chrono::steady_clock::time_point t0, const absl::Status& st) {
    grpc::Status g = ToGrpc(st);
    const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    metrics_->ObserveRequest(method, CodeName(g.error_code()), secs);
    if (!st.ok()) spdlog::debug("{} -> {}: {}", method, CodeName(g.error_code()), std::string(st.message()));
    return g;
  }

  // Validates the request and returns the query matrix (q x K), aggregated into one row when asked.
  absl::StatusOr<std::vector<float>> QueryMatrix(const v1::QueryByVectorRequest& req, int* q) const {
    const v1::Manifest m = store_->manifest();
    const uint32_t k = m.k();
    if (req.queries_size() == 0) return absl::InvalidArgumentError("no query vectors");
    if (req.queries_size() > options_.max_query_vectors) {
      return absl::InvalidArgumentError(absl::StrCat(req.queries_size(), " query vectors; at most ",
                                                     options_.max_query_vectors, " per request"));
    }
    absl::Status st = CheckK(req.top_k(), req.harmful_k());
    if (!st.ok()) return st;
    if (!req.projection_state_id().empty() && req.projection_state_id() != m.projection_state_id()) {
      return absl::FailedPreconditionError(absl::StrCat(
          "query vectors were compressed with projection state ", req.projection_state_id(),
          " but this store uses ", m.projection_state_id(), "; scores would be meaningless"));
    }
    const int nq = req.queries_size();
    std::vector<float> out(static_cast<size_t>(req.aggregate() ? 1 : nq) * k, 0.0f);
    for (int j = 0; j < nq; ++j) {
      const auto& v = req.queries(j);
      if (static_cast<uint32_t>(v.values_size()) != k) {
        return absl::InvalidArgumentError(
            absl::StrCat("query vector ", j, " has ", v.values_size(), " values; the store's K is ", k));
      }
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

  absl::Status FillRecords(const std::vector<kernels::Candidate>& cands, bool omit_text,
                           google::protobuf::RepeatedPtrField<v1::ScoredRecord>* out) const {
    uint32_t rank = 0;
    for (const auto& c : cands) {
      auto* sr = out->Add();
      sr->set_rank(++rank);
      sr->set_score(c.score);
      sr->set_index(c.index);
      auto rec = store_->GetRecordByIndex(c.index);
      if (!rec.ok()) return rec.status();
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

  static double Dot(const std::vector<float>& a, const std::vector<float>& b) {
    double s = 0;
    for (size_t i = 0; i < a.size() && i < b.size(); ++i) s += static_cast<double>(a[i]) * b[i];
    return s;
  }

  // Byte ranges of the instruction and the input inside a record's formatted prompt (computed once per record).
  struct PromptFields {
    int32_t ib, ie, nb, ne;  // nb = ne = -1 without input
  };
  static PromptFields FieldsOf(const model::Example& z) {
    const std::string prompt = model::AlpacaPrompt(z.instruction, z.input);
    PromptFields f;
    f.ib = static_cast<int32_t>(prompt.find("### Instruction:\n") + 17);
    f.ie = f.ib + static_cast<int32_t>(z.instruction.size());
    f.nb = z.input.empty() ? -1 : static_cast<int32_t>(prompt.find("### Input:\n", f.ie) + 11);
    f.ne = z.input.empty() ? -1 : f.nb + static_cast<int32_t>(z.input.size());
    return f;
  }

  // Where a prompt token's byte span falls: inside the instruction, the input, or the template's own text.
  static void SetPromptField(const PromptFields& f, model::Span sp, v1::TokenScore* ts) {
    if (sp.begin >= f.ib && sp.end <= f.ie) {
      ts->set_field("instruction");
      ts->set_begin(sp.begin - f.ib);
      ts->set_end(sp.end - f.ib);
    } else if (f.nb >= 0 && sp.begin >= f.nb && sp.end <= f.ne) {
      ts->set_field("input");
      ts->set_begin(sp.begin - f.nb);
      ts->set_end(sp.end - f.nb);
    } else {
      ts->set_field("template");
      ts->set_begin(sp.begin);
      ts->set_end(sp.end);
    }
  }

  // Token-level views for every returned record: generation side (per generated token, against the record's
  // stored vector) and training side (per token of the record, against the query vector q).
  absl::Status Attribute(const model::Example& gen, const std::vector<float>& q, v1::QueryResult* result) {
    const model::GradientEngine& eng = featurizer_->engine();
    auto gt = eng.Tokenize(gen);
    if (!gt.ok()) return gt.status();
    std::vector<std::vector<float>> g_tok;
    absl::Status st = featurizer_->TokenSketches(gt->ids, gt->response_begin, &g_tok);
    if (!st.ok()) return st;
    auto attribute = [&](v1::ScoredRecord* sr) -> absl::Status {
      auto x = store_->GetVector(sr->index());
      if (!x.ok()) return x.status();
      for (size_t t = 0; t < g_tok.size(); ++t) {
        auto* ts = sr->add_generation_tokens();
        ts->set_text(ValidUtf8(eng.tokenizer()->Piece(gt->ids[gt->response_begin + t])));
        ts->set_field("generation");
        ts->set_begin(gt->response_spans[t].begin);
        ts->set_end(gt->response_spans[t].end);
        ts->set_score(static_cast<float>(Dot(g_tok[t], *x)));
      }
      auto rec = store_->GetRecordByIndex(sr->index());
      if (!rec.ok()) return rec.status();
      const model::Example z{rec->record().instruction(), rec->record().input(), rec->record().output(), {}};
      auto zt = eng.Tokenize(z);
      if (!zt.ok()) return zt.status();
      std::vector<std::vector<float>> z_tok;
      absl::Status s2 = featurizer_->TokenSketches(zt->ids, 1, &z_tok);
      if (!s2.ok()) return s2;
      const PromptFields fields = FieldsOf(z);
      for (size_t s = 1; s < zt->ids.size(); ++s) {
        auto* ts = sr->add_record_tokens();
        ts->set_text(ValidUtf8(eng.tokenizer()->Piece(zt->ids[s])));
        ts->set_score(static_cast<float>(Dot(z_tok[s - 1], q)));
        if (static_cast<int32_t>(s) < zt->response_begin) {
          SetPromptField(fields, zt->prompt_spans[s - 1], ts);
        } else {
          const model::Span sp = zt->response_spans[s - zt->response_begin];
          ts->set_field("output");
          ts->set_begin(sp.begin);
          ts->set_end(sp.end);
        }
      }
      return absl::OkStatus();
    };
    for (auto& sr : *result->mutable_helpful()) {
      st = attribute(&sr);
      if (!st.ok()) return st;
    }
    for (auto& sr : *result->mutable_harmful()) {
      st = attribute(&sr);
      if (!st.ok()) return st;
    }
    return absl::OkStatus();
  }

  absl::Status CheckK(uint32_t top_k, uint32_t harmful_k) const {
    if (top_k == 0 || top_k > options_.max_top_k) {
      return absl::InvalidArgumentError(absl::StrCat("top_k must be 1..", options_.max_top_k, ", got ", top_k));
    }
    if (harmful_k > options_.max_top_k) {
      return absl::InvalidArgumentError(absl::StrCat("harmful_k must be 0..", options_.max_top_k, ", got ", harmful_k));
    }
    return absl::OkStatus();
  }

  absl::Status DoQuery(grpc::ServerContext* ctx, const v1::QueryRequest& req, v1::QueryResponse* resp,
                       std::chrono::steady_clock::time_point t0) {
    if (featurizer_ == nullptr) {
      return absl::FailedPreconditionError(
          "Query by text needs a model: this server was started without --model; use QueryByVector with "
          "precomputed compressed gradients");
    }
    if (req.generation().empty()) return absl::InvalidArgumentError("generation is empty");
    if (req.instruction().empty()) return absl::InvalidArgumentError("instruction is empty");
    absl::Status st = CheckK(req.top_k(), req.harmful_k());
    if (!st.ok()) return st;
    if (req.attributions() && req.top_k() + req.harmful_k() > options_.max_attributed_records) {
      return absl::InvalidArgumentError(absl::StrCat("token attributions are computed for at most ",
                                                     options_.max_attributed_records, " records per query; asked for ",
                                                     req.top_k() + req.harmful_k(), " (top_k + harmful_k)"));
    }
    std::vector<float> q;
    const model::Example gen{req.instruction(), req.input(), req.generation(),
                             {req.hotwords().begin(), req.hotwords().end()}};
    auto info = featurizer_->Compress(gen, &q);
    if (!info.ok()) return info.status();
    resp->set_gradient_ms(
        std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
    resp->set_generation_tokens(info->response_tokens);
    resp->set_truncated(info->truncated);
    resp->set_generation_loss(info->loss);
    if (ctx->IsCancelled()) return absl::CancelledError("cancelled by the client");
    const std::vector<float> q_copy = req.attributions() ? q : std::vector<float>();
    auto res = engine_->Search(std::move(q), 1, static_cast<int>(req.top_k()), static_cast<int>(req.harmful_k()),
                               DeadlineOf(ctx));
    if (!res.ok()) return res.status();
    RecordScan(*res, 1, resp->mutable_shard_timings());
    st = FillRecords(res->helpful[0], req.omit_text(), resp->mutable_result()->mutable_helpful());
    if (st.ok()) st = FillRecords(res->harmful[0], req.omit_text(), resp->mutable_result()->mutable_harmful());
    if (!st.ok()) return st;
    if (req.attributions()) {
      const auto ta = std::chrono::steady_clock::now();
      st = Attribute(gen, q_copy, resp->mutable_result());
      if (!st.ok()) return st;
      resp->set_attribution_ms(
          std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - ta).count());
    }
    resp->set_total_ms(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
    return absl::OkStatus();
  }

  absl::Status DoQueryByVector(grpc::ServerContext* ctx, const v1::QueryByVectorRequest& req,
                               v1::QueryByVectorResponse* resp, std::chrono::steady_clock::time_point t0) {
    int q = 0;
    auto matrix = QueryMatrix(req, &q);
    if (!matrix.ok()) return matrix.status();
    if (ctx->IsCancelled()) return absl::CancelledError("cancelled by the client");
    auto res = engine_->Search(std::move(*matrix), q, static_cast<int>(req.top_k()),
                               static_cast<int>(req.harmful_k()), DeadlineOf(ctx));
    if (!res.ok()) return res.status();
    RecordScan(*res, q, resp->mutable_shard_timings());
    resp->set_vectors_in_scan(res->vectors_in_scan);
    for (int j = 0; j < q; ++j) {
      auto* r = resp->add_results();
      absl::Status st = FillRecords(res->helpful[j], req.omit_text(), r->mutable_helpful());
      if (st.ok()) st = FillRecords(res->harmful[j], req.omit_text(), r->mutable_harmful());
      if (!st.ok()) return st;
    }
    resp->set_total_ms(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
    return absl::OkStatus();
  }

  storage::Store* store_;
  QueryEngine* engine_;
  Metrics* metrics_;
  const model::Featurizer* featurizer_;
  ServerOptions options_;
};

}  // namespace

struct Server::Impl {
  ServerOptions options;
  std::unique_ptr<storage::Store> store;
  std::unique_ptr<model::Featurizer> featurizer;
  std::unique_ptr<QueryEngine> engine;
  std::unique_ptr<Metrics> metrics;
  std::unique_ptr<InfluenceServiceImpl> service;
  std::unique_ptr<grpc::Server> grpc_server;
  int port = 0;
  std::once_flag shutdown_once;
};

Server::Server(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

Server::~Server() { Shutdown(absl::Seconds(1)); }

absl::StatusOr<std::unique_ptr<Server>> Server::Create(const ServerOptions& options) {
  if (options.store_path.empty()) return absl::InvalidArgumentError("--store is required");
  if (options.backend != "auto" && options.backend != "cpu" && options.backend != "cuda") {
    return absl::InvalidArgumentError(absl::StrCat("unknown backend \"", options.backend, "\" (auto|cpu|cuda)"));
  }
  // Decide the backend before opening the store: the CUDA backend wants the host tier in pinned memory.
  std::string backend = options.backend;
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
  if (options.max_top_k == 0 || options.max_query_vectors <= 0 || options.max_message_bytes <= 0) {
    return absl::InvalidArgumentError("limits must be positive");
  }
  auto impl = std::make_unique<Impl>();
  impl->options = options;
  storage::StoreOptions so;
  so.create_if_missing = options.create_k > 0;
  so.k = options.create_k;
  so.num_shards = options.shards > 0 ? options.shards : std::max(1u, std::thread::hardware_concurrency());
  so.progress = options.load_progress;
  so.host_budget_bytes = options.host_budget_bytes;
  if (backend == "cuda") so.host_allocator = CudaHostAllocator();
  if (!options.model_path.empty()) {  // checked before the store is opened (or created) for nothing
    if (!std::filesystem::exists(options.model_path)) {
      return absl::NotFoundError(absl::StrCat("model not found: ", options.model_path));
    }
    if (!std::filesystem::exists(options.store_path)) {
      return absl::FailedPreconditionError(absl::StrCat(
          "no store at ", options.store_path, ": with --model, build it first with `rapidin cache --model ",
          options.model_path, " --store ", options.store_path, " --data ...`"));
    }
  }
  const auto t0 = std::chrono::steady_clock::now();
  auto store = storage::Store::Open(options.store_path, so);
  if (!store.ok()) return store.status();
  impl->store = std::move(*store);
  spdlog::info("store {}: {} records, K={}, projection state {}, {} shards, loaded in {:.2f} s",
               options.store_path, impl->store->size(), impl->store->k(),
               impl->store->manifest().projection_state_id(), impl->store->num_shards(),
               std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());

  if (!options.model_path.empty()) {
    const std::string state = impl->store->manifest().projection_state();
    model::EngineOptions mo;
    mo.model_path = options.model_path;
    mo.tokenizer_path = options.tokenizer_path;
    mo.adapter_path = options.adapter_path;
    mo.param_pattern = options.param_pattern;
    mo.device = options.model_device;
    auto fo = model::OptionsFromState(state, mo);
    if (!fo.ok()) return fo.status();
    fo->token_method = options.token_method;
    model::SetComputeThreads(1);
    auto f = model::Featurizer::Create(*fo);
    if (!f.ok()) return f.status();
    const std::string diff = model::DescribeStateDifference(state, (*f)->projection_state());
    if (!diff.empty()) {
      return absl::FailedPreconditionError(absl::StrCat("store ", options.store_path,
                                                        " was not built with this model and parameter selection: ",
                                                        diff));
    }
    impl->featurizer = std::move(*f);
    spdlog::info("model {} on {}: gradient dimension {}, {}", options.model_path,
                 impl->featurizer->engine().device(), impl->featurizer->engine().grad_dim(),
                 impl->featurizer->sketch().Describe());
  }

  QueryEngine::Options eo;
  eo.max_batch_vectors = options.max_batch_vectors;
  eo.cold_chunk_bytes = options.cold_chunk_bytes;
  eo.impl = options.impl;
  if (eo.impl == kernels::ScoreImpl::kAvx2 && !kernels::Avx2Available()) {
    return absl::FailedPreconditionError("AVX2/F16C/FMA kernels requested but this CPU lacks them");
  }
  eo.backend = backend;
  eo.gpu = options.gpu;
  const auto t1 = std::chrono::steady_clock::now();
  auto engine = QueryEngine::Create(impl->store.get(), eo);
  if (!engine.ok()) return engine.status();
  impl->engine = std::move(*engine);
  if (backend == "cuda") {
    const GpuTierUsage g = impl->engine->GpuUsage();
    spdlog::info("{}: {:.1f} MB hot in GPU memory, {:.1f} MB streamed from host, placed in {:.2f} s",
                 impl->engine->backend(), g.hot_bytes / 1e6, g.warm_bytes / 1e6,
                 std::chrono::duration<double>(std::chrono::steady_clock::now() - t1).count());
  }
  impl->metrics = std::make_unique<Metrics>();
  if (!options.metrics_listen.empty()) {
    absl::Status st = impl->metrics->Serve(options.metrics_listen);
    if (!st.ok()) return st;
  }
  impl->service = std::make_unique<InfluenceServiceImpl>(impl->store.get(), impl->engine.get(), impl->metrics.get(),
                                                         impl->featurizer.get(), options);
  impl->service->UpdateTierMetrics();

  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  builder.AddListeningPort(options.listen, grpc::InsecureServerCredentials(), &impl->port);
  builder.SetMaxReceiveMessageSize(options.max_message_bytes);
  builder.SetMaxSendMessageSize(options.max_message_bytes);
  builder.RegisterService(impl->service.get());
  impl->grpc_server = builder.BuildAndStart();
  if (!impl->grpc_server || impl->port == 0) {
    return absl::UnavailableError(absl::StrCat("cannot listen on ", options.listen));
  }
  impl->grpc_server->GetHealthCheckService()->SetServingStatus("rapidin.v1.InfluenceService", true);
  impl->grpc_server->GetHealthCheckService()->SetServingStatus("", true);
  spdlog::info("serving rapidin.v1.InfluenceService on port {} ({} workers, {} kernels){}", impl->port,
               impl->engine->num_workers(), impl->engine->backend(),
               options.metrics_listen.empty() ? ""
                                              : absl::StrCat(", metrics on port ", impl->metrics->port()));
  return std::unique_ptr<Server>(new Server(std::move(impl)));
}

int Server::port() const { return impl_->port; }
int Server::metrics_port() const { return impl_->options.metrics_listen.empty() ? 0 : impl_->metrics->port(); }

void Server::Wait() { impl_->grpc_server->Wait(); }

void Server::Shutdown(absl::Duration grace) {
  std::call_once(impl_->shutdown_once, [&] {
    spdlog::info("shutting down (grace {} ms)", absl::ToInt64Milliseconds(grace));
    impl_->grpc_server->GetHealthCheckService()->SetServingStatus(false);
    impl_->grpc_server->Shutdown(absl::ToChronoTime(absl::Now() + grace));
    impl_->metrics->Stop();
    impl_->engine.reset();
    impl_->store.reset();
    spdlog::info("shutdown complete");
  });
}

}  // namespace rapidin::server
