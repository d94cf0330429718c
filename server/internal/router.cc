#include "server/internal/router.h"

#include <spdlog/spdlog.h>

#include <algorithm>
#include <atomic>
#include <map>
#include <set>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "base/mutex.h"
#include "client/credentials.h"
#include "kernels/topk.h"
#include "model/attribution.h"
#include "server/internal/auth.h"
#include "server/internal/service.h"

namespace rapidin::server::internal {

struct RouterService::Shard {
  std::string address;
  std::shared_ptr<grpc::Channel> channel;
  std::unique_ptr<v1::InfluenceService::Stub> stub;
};

namespace {

const char* DTypeName(v1::VectorDType d) {
  switch (d) {
    case v1::VECTOR_DTYPE_FP16: return "fp16";
    case v1::VECTOR_DTYPE_BF16: return "bf16";
    case v1::VECTOR_DTYPE_FP32: return "fp32";
    default: return "unspecified";
  }
}

// A shard server's answer as an absl::Status whose message names the server.
absl::Status ShardStatus(const std::string& address, const grpc::Status& s) {
  if (s.ok()) return absl::OkStatus();
  return absl::Status(static_cast<absl::StatusCode>(s.error_code()),
                      absl::StrCat("shard server ", address, ": ", s.error_message()));
}

// First failure in shard order, or OK.
absl::Status First(const std::vector<absl::Status>& st) {
  for (const auto& s : st) {
    if (!s.ok()) return s;
  }
  return absl::OkStatus();
}

}  // namespace

void MergeResults(const std::vector<const v1::QueryResult*>& parts, const std::vector<std::string>& sources,
                  uint32_t top_k, uint32_t harmful_k, v1::QueryResult* out) {
  std::vector<int64_t> source_of_part(parts.size());
  for (size_t i = 0; i < parts.size(); ++i) source_of_part[i] = static_cast<int64_t>(i);
  auto merge = [&](bool helpful, uint32_t k, google::protobuf::RepeatedPtrField<v1::ScoredRecord>* dst) {
    std::vector<std::vector<kernels::Candidate>> lists(parts.size());
    for (size_t i = 0; i < parts.size(); ++i) {
      for (const auto& r : helpful ? parts[i]->helpful() : parts[i]->harmful()) {
        lists[i].push_back({static_cast<float>(r.score()), static_cast<int64_t>(r.index())});
      }
    }
    const auto merged = kernels::MergeParts(lists, static_cast<int>(std::min<uint32_t>(k, INT32_MAX)), helpful,
                                            source_of_part);
    for (size_t j = 0; j < merged.size(); ++j) {
      const auto& from = helpful ? parts[merged[j].part]->helpful() : parts[merged[j].part]->harmful();
      v1::ScoredRecord* r = dst->Add();
      *r = from.Get(merged[j].position);
      r->set_rank(static_cast<uint32_t>(j + 1));
      r->set_source(sources[merged[j].part]);
    }
  };
  merge(true, top_k, out->mutable_helpful());
  merge(false, harmful_k, out->mutable_harmful());
}

RouterService::RouterService(const ServerOptions& options, Metrics* metrics, const TokenTable* tokens,
                             ThreadPool* pool)
    : options_(options), metrics_(metrics), tokens_(tokens), pool_(pool) {}
RouterService::~RouterService() = default;

template <typename Req, typename Resp, typename Call>
void RouterService::FanOut(const grpc::ServerContextBase* parent, const Req& req, Call call, Answers<Resp> done,
                           absl::Time deadline, bool wait_for_ready) const {
  struct State {
    Req req;
    std::vector<Resp> out;
    std::vector<std::unique_ptr<grpc::ClientContext>> ctxs;
    std::vector<grpc::Status> got;
    std::atomic<size_t> left{0};
    Answers<Resp> done;
  };
  const size_t n = shards_.size();
  auto st = std::make_shared<State>();
  st->req = req;
  st->out.resize(n);
  st->ctxs.resize(n);
  st->got.resize(n);
  st->left = n;
  st->done = std::move(done);
  for (size_t i = 0; i < n; ++i) {
    st->ctxs[i] = parent ? grpc::ClientContext::FromServerContext(*parent) : std::make_unique<grpc::ClientContext>();
    if (deadline != absl::InfiniteFuture()) st->ctxs[i]->set_deadline(absl::ToChronoTime(deadline));
    st->ctxs[i]->set_wait_for_ready(wait_for_ready);
    client::AddToken(options_.router.shard_credentials, st->ctxs[i].get());
  }
  for (size_t i = 0; i < n; ++i) {
    call(shards_[i]->stub->async(), st->ctxs[i].get(), &st->req, &st->out[i], [this, st, i, n](grpc::Status s) {
      st->got[i] = std::move(s);  // each callback its own slot; the last one (acq_rel) reads them all
      if (st->left.fetch_sub(1, std::memory_order_acq_rel) != 1) return;
      std::vector<absl::Status> statuses(n);
      for (size_t j = 0; j < n; ++j) statuses[j] = ShardStatus(shards_[j]->address, st->got[j]);
      Answers<Resp> d = std::move(st->done);
      d(std::move(statuses), std::move(st->out));
    });
  }
}

absl::StatusOr<std::unique_ptr<RouterService>> RouterService::Create(const ServerOptions& options,
                                                                     Metrics* metrics, const TokenTable* tokens,
                                                                     ThreadPool* pool) {
  std::unique_ptr<RouterService> r(new RouterService(options, metrics, tokens, pool));
  auto creds = client::ChannelCredentials(options.router.shard_credentials);
  if (!creds.ok()) {
    return absl::Status(creds.status().code(), absl::StrCat("shard servers: ", creds.status().message()));
  }
  std::set<std::string> seen;
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(options.net.max_message_bytes);
  args.SetMaxSendMessageSize(options.net.max_message_bytes);
  // A shard server that restarts is reached again within a second or two, not after gRPC's default backoff
  // (which grows to two minutes while it is down).
  args.SetInt(GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS, 200);
  args.SetInt(GRPC_ARG_MIN_RECONNECT_BACKOFF_MS, 200);
  args.SetInt(GRPC_ARG_MAX_RECONNECT_BACKOFF_MS, 1000);
  for (const std::string& a : options.router.shard_servers) {
    if (a.empty()) return absl::InvalidArgumentError("--shard-servers: an empty address");
    if (!seen.insert(a).second) return absl::InvalidArgumentError(absl::StrCat("--shard-servers: ", a, " twice"));
    auto s = std::make_unique<Shard>();
    s->address = a;
    s->channel = grpc::CreateCustomChannel(a, *creds, args);
    s->stub = v1::InfluenceService::NewStub(s->channel);
    r->shards_.push_back(std::move(s));
  }
  if (absl::Status st = CheckModelExists(options.model); !st.ok()) return st;  // before waiting for shard servers

  // Shard servers may start after the router (Kubernetes starts pods in any order): wait for every one.
  std::vector<v1::StatsResponse> stats;
  std::vector<absl::Status> failed;
  const auto t0 = std::chrono::steady_clock::now();
  BlockingCounter answered(1);
  r->FanOut<v1::StatsRequest, v1::StatsResponse>(
      nullptr, v1::StatsRequest(),
      [](auto* a, auto* c, auto* q, auto* p, auto cb) { a->Stats(c, q, p, std::move(cb)); },
      [&](std::vector<absl::Status> st, std::vector<v1::StatsResponse> parts) {
        failed = std::move(st);
        stats = std::move(parts);
        answered.DecrementCount();
      },
      absl::Now() + options.router.connect_timeout, /*wait_for_ready=*/true);
  answered.Wait();
  if (absl::Status st = First(failed); !st.ok()) {
    return absl::UnavailableError(absl::StrCat("router start-up (waited up to ",
                                               absl::FormatDuration(options.router.connect_timeout),
                                               "): ", st.message()));
  }
  const v1::StatsResponse& s0 = stats[0];
  bool same = true;
  std::vector<std::string> desc;
  uint64_t records = 0;
  for (size_t i = 0; i < stats.size(); ++i) {
    const v1::StatsResponse& s = stats[i];
    same = same && s.k() == s0.k() && s.dtype() == s0.dtype() && s.projection_state_id() == s0.projection_state_id();
    desc.push_back(absl::StrCat(r->shards_[i]->address, ": ", s.num_records(), " records, K=", s.k(), " ",
                                DTypeName(s.dtype()), ", projection state ", s.projection_state_id()));
    records += s.num_records();
    r->options_.limits.max_top_k = std::min(r->options_.limits.max_top_k, s.max_top_k());
  }
  if (!same) {
    return absl::FailedPreconditionError(
        absl::StrCat("the shard servers' stores differ (a router merges only stores built with one model and "
                     "sketch): ", absl::StrJoin(desc, "; ")));
  }
  r->k_ = s0.k();
  r->dtype_ = s0.dtype();
  r->state_id_ = s0.projection_state_id();
  r->state_ = s0.projection_state();
  spdlog::info("router over {} shard servers ({} records, K={}, projection state {}) ready after {:.2f} s: {}",
               r->shards_.size(), records, r->k_, r->state_id_, MsSince(t0) / 1e3, absl::StrJoin(desc, "; "));
  if (!options.model.path.empty()) {
    auto f = LoadFeaturizer(r->state_, options.model, "the shard servers' stores were");
    if (!f.ok()) return f.status();
    r->featurizer_ = std::move(*f);
    spdlog::info("model {} on {}: gradient dimension {}, {}", options.model.path, r->featurizer_->engine().device(),
                 r->featurizer_->engine().grad_dim(), r->featurizer_->sketch().Describe());
  }
  return r;
}

void RouterService::Scatter(const grpc::ServerContextBase* ctx, const v1::QueryByVectorRequest& req,
                            std::function<void(absl::Status, v1::QueryByVectorResponse)> done) const {
  auto shape = std::make_shared<v1::QueryByVectorRequest>();  // what the merge needs of the request
  shape->set_top_k(req.top_k());
  shape->set_harmful_k(req.harmful_k());
  FanOut<v1::QueryByVectorRequest, v1::QueryByVectorResponse>(
      ctx, req, [](auto* a, auto* c, auto* q, auto* p, auto cb) { a->QueryByVector(c, q, p, std::move(cb)); },
      [this, shape, done = std::move(done)](std::vector<absl::Status> st,
                                            std::vector<v1::QueryByVectorResponse> parts) {
        v1::QueryByVectorResponse merged;
        absl::Status s = First(st);
        if (s.ok()) s = MergeScattered(*shape, parts, &merged);
        done(std::move(s), std::move(merged));
      });
}

absl::Status RouterService::MergeScattered(const v1::QueryByVectorRequest& req,
                                           const std::vector<v1::QueryByVectorResponse>& parts,
                                           v1::QueryByVectorResponse* resp) const {
  std::vector<std::string> sources;
  for (const auto& s : shards_) sources.push_back(s->address);
  const int nr = parts[0].results_size();
  for (size_t i = 0; i < parts.size(); ++i) {
    if (parts[i].results_size() != nr) {
      return absl::InternalError(absl::StrCat("shard server ", sources[i], " returned ", parts[i].results_size(),
                                              " results; ", sources[0], " returned ", nr));
    }
  }
  for (int j = 0; j < nr; ++j) {
    std::vector<const v1::QueryResult*> per_shard;
    for (const auto& p : parts) per_shard.push_back(&p.results(j));
    MergeResults(per_shard, sources, req.top_k(), req.harmful_k(), resp->add_results());
  }
  uint32_t shard = 0, batched = 0;
  double bytes = 0;
  for (size_t i = 0; i < parts.size(); ++i) {
    for (const auto& t : parts[i].shard_timings()) {
      v1::ShardTiming* o = resp->add_shard_timings();
      *o = t;
      o->set_shard(shard++);
      o->set_backend(absl::StrCat(t.backend(), "@", sources[i]));
      bytes += static_cast<double>(t.bytes_scanned());
    }
    batched = std::max(batched, parts[i].vectors_in_scan());
  }
  resp->set_vectors_in_scan(batched);
  metrics_->AddBytesScanned(bytes);
  metrics_->AddVectorsScanned(nr);
  return absl::OkStatus();
}

grpc::ServerUnaryReactor* RouterService::QueryByVector(grpc::CallbackServerContext* ctx,
                                                       const v1::QueryByVectorRequest* req,
                                                       v1::QueryByVectorResponse* resp) {
  const UnaryCall call = BeginCall(ctx, "QueryByVector", metrics_);
  absl::Status st = Authorize(tokens_, *ctx, Need::kQuery, "QueryByVector");
  if (st.ok()) st = CheckQueryVectors(*req, k_, state_id_, options_.limits.max_top_k, "the shard servers use");
  if (!st.ok()) {
    call.Finish(st);
    return call.reactor;
  }
  v1::QueryByVectorRequest fwd = *req;
  fwd.set_projection_state_id(state_id_);  // a shard server replaced by another store refuses the query
  Scatter(ctx, fwd, [call, resp](absl::Status s, v1::QueryByVectorResponse merged) {
    if (s.ok()) {
      *resp = std::move(merged);
      resp->set_total_ms(MsSince(call.t0));
    }
    call.Finish(s);
  });
  return call.reactor;
}

grpc::ServerUnaryReactor* RouterService::Query(grpc::CallbackServerContext* ctx, const v1::QueryRequest* req,
                                               v1::QueryResponse* resp) {
  auto work = [this, ctx, req, resp](const UnaryCall& call) {
    absl::Status st = CheckTextQuery(*req, featurizer_ != nullptr, options_.limits);
    if (!st.ok()) return call.Finish(st);
    auto q = std::make_shared<std::vector<float>>();
    auto gen = GenerationGradient(*featurizer_, *req, call.t0, q.get(), resp);
    if (!gen.ok()) return call.Finish(gen.status());
    if (ctx->IsCancelled()) return call.Finish(absl::CancelledError("cancelled by the client"));
    auto example = std::make_shared<model::Example>(std::move(*gen));
    v1::QueryByVectorRequest fwd;
    fwd.add_queries()->mutable_values()->Add(q->begin(), q->end());
    fwd.set_top_k(req->top_k());
    fwd.set_harmful_k(req->harmful_k());
    fwd.set_projection_state_id(state_id_);
    fwd.set_omit_text(req->omit_text());
    Scatter(ctx, fwd, [this, ctx, req, resp, call, q, example](absl::Status s, v1::QueryByVectorResponse scattered) {
      if (!s.ok()) return call.Finish(s);
      *resp->mutable_result() = std::move(*scattered.mutable_results(0));
      *resp->mutable_shard_timings() = std::move(*scattered.mutable_shard_timings());
      if (!req->attributions()) {
        resp->set_total_ms(MsSince(call.t0));
        return call.Finish(absl::OkStatus());
      }
      pool_->Schedule([this, ctx, resp, call, q, example] {  // reads records from the shard servers: blocks
        absl::Status a = Attribute(ctx, *example, *q, resp);
        if (a.ok()) resp->set_total_ms(MsSince(call.t0));
        call.Finish(a);
      });
    });
  };
  return StartOnPool(ctx, "Query", Need::kQuery, tokens_, metrics_, pool_, std::move(work));
}

absl::Status RouterService::Attribute(const grpc::ServerContextBase* ctx, const model::Example& gen,
                                      const std::vector<float>& q, v1::QueryResponse* resp) const {
  const auto ta = std::chrono::steady_clock::now();
  std::map<std::string, const Shard*> by_address;
  for (const auto& s : shards_) by_address[s->address] = s.get();
  auto fetch = [&](const v1::ScoredRecord& sr, v1::Record* rec, std::vector<float>* x) -> absl::Status {
    const Shard* shard = by_address.at(sr.source());
    v1::GetRecordRequest gr;
    gr.set_id(sr.id());
    gr.set_include_vector(true);
    v1::GetRecordResponse got;
    std::unique_ptr<grpc::ClientContext> c = grpc::ClientContext::FromServerContext(*ctx);
    client::AddToken(options_.router.shard_credentials, c.get());
    absl::Status s = ShardStatus(shard->address, shard->stub->GetRecord(c.get(), gr, &got));
    if (!s.ok()) return s;
    *rec = std::move(*got.mutable_record());
    x->assign(got.vector().begin(), got.vector().end());
    return absl::OkStatus();
  };
  absl::Status st = model::Attribute(*featurizer_, gen, q, fetch, resp->mutable_result());
  if (!st.ok()) return st;
  resp->set_attribution_ms(MsSince(ta));
  return absl::OkStatus();
}

namespace {

// A stream answered at once, before any message is read.
class RefuseStream final : public grpc::ServerReadReactor<v1::IngestRequest> {
 public:
  explicit RefuseStream(const grpc::Status& status) { Finish(status); }
  void OnDone() override { delete this; }
};

}  // namespace

grpc::ServerReadReactor<v1::IngestRequest>* RouterService::Ingest(grpc::CallbackServerContext* ctx,
                                                                 v1::IngestResponse*) {
  const auto t0 = std::chrono::steady_clock::now();
  absl::Status st = Authorize(tokens_, *ctx, Need::kIngest, "Ingest");
  if (st.ok()) {
    st = absl::UnimplementedError("a router does not take ingests: each record belongs to one shard "
                                  "server's store; send it to that shard server (GetRecord through the "
                                  "router names it in `source`)");
  }
  return new RefuseStream(Observe(metrics_, "Ingest", t0, st));
}

grpc::ServerUnaryReactor* RouterService::GetRecord(grpc::CallbackServerContext* ctx, const v1::GetRecordRequest* req,
                                                   v1::GetRecordResponse* resp) {
  const UnaryCall call = BeginCall(ctx, "GetRecord", metrics_);
  absl::Status st = Authorize(tokens_, *ctx, Need::kQuery, "GetRecord");
  if (st.ok() && req->id().empty()) st = absl::InvalidArgumentError("id is empty");
  if (!st.ok()) {
    call.Finish(st);
    return call.reactor;
  }
  FanOut<v1::GetRecordRequest, v1::GetRecordResponse>(
      ctx, *req, [](auto* a, auto* c, auto* q, auto* p, auto cb) { a->GetRecord(c, q, p, std::move(cb)); },
      [this, call, resp, id = req->id()](std::vector<absl::Status> st, std::vector<v1::GetRecordResponse> got) {
        for (size_t i = 0; i < got.size(); ++i) {  // ids are unique across shard ranges; the first holder answers
          if (st[i].ok()) {
            *resp = std::move(got[i]);
            resp->set_source(shards_[i]->address);
            return call.Finish(absl::OkStatus());
          }
        }
        for (const auto& s : st) {
          if (!absl::IsNotFound(s)) return call.Finish(s);  // a shard server that cannot answer may hold it
        }
        call.Finish(absl::NotFoundError(
            absl::StrCat("no record with id \"", id, "\" on any of the ", shards_.size(), " shard servers")));
      });
  return call.reactor;
}

void RouterService::MergeStats(const std::vector<v1::StatsResponse>& parts, v1::StatsResponse* resp) const {
  std::vector<std::string> tier_order, backends, stores;
  std::map<std::string, v1::TierStats> tiers;
  uint64_t records = 0;
  uint32_t shards = 0, workers = 0;
  for (size_t i = 0; i < parts.size(); ++i) {
    const v1::StatsResponse& p = parts[i];
    records += p.num_records();
    shards += p.num_shards();
    workers += p.num_workers();
    for (const auto& t : p.tiers()) {
      auto [it, fresh] = tiers.try_emplace(t.tier());
      if (fresh) {
        tier_order.push_back(t.tier());
        it->second.set_tier(t.tier());
      }
      it->second.set_records(it->second.records() + t.records());
      it->second.set_bytes(it->second.bytes() + t.bytes());
    }
    if (std::find(backends.begin(), backends.end(), p.backend()) == backends.end()) backends.push_back(p.backend());
    stores.push_back(absl::StrCat(shards_[i]->address, "=", p.store_path()));
    resp->add_shard_servers(shards_[i]->address);
  }
  resp->set_num_records(records);
  resp->set_k(k_);
  resp->set_dtype(dtype_);
  resp->set_projection_state_id(state_id_);
  resp->set_projection_state(state_);
  for (const auto& t : tier_order) *resp->add_tiers() = tiers[t];
  resp->set_num_shards(shards);
  resp->set_num_workers(workers);
  resp->set_backend(absl::StrCat("router over ", parts.size(), " shard servers (", absl::StrJoin(backends, ", "), ")"));
  resp->set_format_version(parts[0].format_version());
  resp->set_store_path(absl::StrJoin(stores, ","));
  resp->set_max_top_k(options_.limits.max_top_k);
  resp->set_model_loaded(featurizer_ != nullptr);
  if (featurizer_) resp->set_model_device(featurizer_->engine().device());
}

grpc::ServerUnaryReactor* RouterService::Stats(grpc::CallbackServerContext* ctx, const v1::StatsRequest*,
                                               v1::StatsResponse* resp) {
  const UnaryCall call = BeginCall(ctx, "Stats", metrics_);
  if (absl::Status a = Authorize(tokens_, *ctx, Need::kAnyRole, "Stats"); !a.ok()) {
    call.Finish(a);
    return call.reactor;
  }
  FanOut<v1::StatsRequest, v1::StatsResponse>(
      ctx, v1::StatsRequest(), [](auto* a, auto* c, auto* q, auto* p, auto cb) { a->Stats(c, q, p, std::move(cb)); },
      [this, call, resp](std::vector<absl::Status> st, std::vector<v1::StatsResponse> parts) {
        absl::Status s = First(st);
        if (s.ok()) MergeStats(parts, resp);
        call.Finish(s);
      });
  return call.reactor;
}

grpc::ServerUnaryReactor* RouterService::DeleteRecords(grpc::CallbackServerContext* ctx,
                                                       const v1::DeleteRecordsRequest* req,
                                                       v1::DeleteRecordsResponse* resp) {
  const UnaryCall call = BeginCall(ctx, "DeleteRecords", metrics_);
  if (absl::Status a = Authorize(tokens_, *ctx, Need::kAdmin, "DeleteRecords"); !a.ok()) {
    call.Finish(a);
    return call.reactor;
  }
  const size_t unique = std::set<std::string>(req->ids().begin(), req->ids().end()).size();
  FanOut<v1::DeleteRecordsRequest, v1::DeleteRecordsResponse>(
      ctx, *req, [](auto* a, auto* c, auto* q, auto* p, auto cb) { a->DeleteRecords(c, q, p, std::move(cb)); },
      [call, resp, unique](std::vector<absl::Status> st, std::vector<v1::DeleteRecordsResponse> got) {
        absl::Status s = First(st);
        if (s.ok()) {
          uint64_t deleted = 0, records = 0;
          for (const auto& g : got) {
            deleted += g.deleted();
            records += g.record_count();
          }
          resp->set_deleted(deleted);
          resp->set_not_found(unique >= deleted ? unique - deleted : 0);
          resp->set_record_count(records);
        }
        call.Finish(s);
      });
  return call.reactor;
}

}  // namespace rapidin::server::internal
