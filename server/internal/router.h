// The router's InfluenceService (rapidin-server --shard-servers): see "Router mode" in server/server.h.
#ifndef RAPIDIN_SERVER_INTERNAL_ROUTER_H_
#define RAPIDIN_SERVER_INTERNAL_ROUTER_H_

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "base/thread_pool.h"
#include "model/featurizer.h"
#include "rapidin/v1/rapidin.grpc.pb.h"
#include "server/internal/auth.h"
#include "server/metrics.h"
#include "server/options.h"

namespace rapidin::server::internal {

// The global top-k of per-shard top-k lists (parts[i] from sources[i]): helpful by descending score, harmful by
// ascending score; equal scores go to the earlier shard, then to the smaller row (kernels::MergeParts, the merge the
// query engine uses, with the shard server's position as the source). Sets rank and source.
void MergeResults(const std::vector<const v1::QueryResult*>& parts, const std::vector<std::string>& sources,
                  uint32_t top_k, uint32_t harmful_k, v1::QueryResult* out);

// The router on gRPC's callback API: no thread waits for a shard server. Fan-outs are asynchronous calls whose
// last answer merges and finishes the request; a text query's gradient and token attributions run on the handler
// pool.
class RouterService final : public v1::InfluenceService::CallbackService {
 public:
  // Connects to options.router.shard_servers and checks that their stores agree (see Server::Create for the errors).
  // With options.model.path, loads the query model for their projection state. metrics must outlive the service.
  // tokens (null: none required) must outlive the service; options.router.shard_credentials reach the shards.
  // pool (the handlers' blocking work) must outlive every call.
  static absl::StatusOr<std::unique_ptr<RouterService>> Create(const ServerOptions& options, Metrics* metrics,
                                                               const TokenTable* tokens, ThreadPool* pool);
  ~RouterService() override;

  const model::Featurizer* featurizer() const { return featurizer_.get(); }

  grpc::ServerUnaryReactor* Query(grpc::CallbackServerContext* ctx, const v1::QueryRequest* req,
                                  v1::QueryResponse* resp) override;
  grpc::ServerUnaryReactor* QueryByVector(grpc::CallbackServerContext* ctx, const v1::QueryByVectorRequest* req,
                                          v1::QueryByVectorResponse* resp) override;
  // Refused (UNIMPLEMENTED): each record belongs to one shard server's store.
  grpc::ServerReadReactor<v1::IngestRequest>* Ingest(grpc::CallbackServerContext* ctx,
                                                     v1::IngestResponse* resp) override;
  grpc::ServerUnaryReactor* GetRecord(grpc::CallbackServerContext* ctx, const v1::GetRecordRequest* req,
                                      v1::GetRecordResponse* resp) override;
  grpc::ServerUnaryReactor* Stats(grpc::CallbackServerContext* ctx, const v1::StatsRequest* req,
                                  v1::StatsResponse* resp) override;
  // Forwarded to every shard server (each deletes the ids it holds); the counts are summed.
  grpc::ServerUnaryReactor* DeleteRecords(grpc::CallbackServerContext* ctx, const v1::DeleteRecordsRequest* req,
                                          v1::DeleteRecordsResponse* resp) override;

 private:
  struct Shard;
  template <typename Resp>
  using Answers = std::function<void(std::vector<absl::Status>, std::vector<Resp>)>;
  RouterService(const ServerOptions& options, Metrics* metrics, const TokenTable* tokens, ThreadPool* pool);

  // Sends req to every shard server at once; done(statuses, answers) runs once, when the last has answered (on a
  // gRPC thread: done must not block). Child calls inherit the deadline and cancellation of parent (when given).
  // A failure names the shard server.
  template <typename Req, typename Resp, typename Call>
  void FanOut(const grpc::ServerContextBase* parent, const Req& req, Call call, Answers<Resp> done,
              absl::Time deadline = absl::InfiniteFuture(), bool wait_for_ready = false) const;
  // The query vectors (q rows of K) scored on every shard server and merged: done(status, merged answer).
  void Scatter(const grpc::ServerContextBase* ctx, const v1::QueryByVectorRequest& req,
               std::function<void(absl::Status, v1::QueryByVectorResponse)> done) const;
  absl::Status MergeScattered(const v1::QueryByVectorRequest& req, const std::vector<v1::QueryByVectorResponse>& parts,
                              v1::QueryByVectorResponse* resp) const;
  // A text query after its scatter: the token attributions (the records fetched from their shard servers).
  absl::Status Attribute(const grpc::ServerContextBase* ctx, const model::Example& gen, const std::vector<float>& q,
                         v1::QueryResponse* resp) const;
  void MergeStats(const std::vector<v1::StatsResponse>& parts, v1::StatsResponse* resp) const;

  ServerOptions options_;  // max_top_k lowered to the smallest of the shard servers'
  Metrics* metrics_;
  const TokenTable* tokens_;
  ThreadPool* pool_;
  std::vector<std::unique_ptr<Shard>> shards_;
  uint32_t k_ = 0;
  v1::VectorDType dtype_ = v1::VECTOR_DTYPE_UNSPECIFIED;
  std::string state_id_, state_;
  std::unique_ptr<model::Featurizer> featurizer_;
};

}  // namespace rapidin::server::internal

#endif  // RAPIDIN_SERVER_INTERNAL_ROUTER_H_
