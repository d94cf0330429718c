// The router's InfluenceService (rapidin-server --shard-servers): see "Router mode" in server/server.h.
#ifndef RAPIDIN_SERVER_INTERNAL_ROUTER_H_
#define RAPIDIN_SERVER_INTERNAL_ROUTER_H_

#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
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

class RouterService final : public v1::InfluenceService::Service {
 public:
  // Connects to options.router.shard_servers and checks that their stores agree (see Server::Create for the errors).
  // With options.model.path, loads the query model for their projection state. metrics must outlive the service.
  // tokens (null: none required) must outlive the service; options.router.shard_credentials reach the shards.
  static absl::StatusOr<std::unique_ptr<RouterService>> Create(const ServerOptions& options, Metrics* metrics,
                                                               const TokenTable* tokens = nullptr);
  ~RouterService() override;

  const model::Featurizer* featurizer() const { return featurizer_.get(); }

  grpc::Status Query(grpc::ServerContext* ctx, const v1::QueryRequest* req, v1::QueryResponse* resp) override;
  grpc::Status QueryByVector(grpc::ServerContext* ctx, const v1::QueryByVectorRequest* req,
                             v1::QueryByVectorResponse* resp) override;
  grpc::Status Ingest(grpc::ServerContext* ctx, grpc::ServerReader<v1::IngestRequest>* reader,
                      v1::IngestResponse* resp) override;
  grpc::Status GetRecord(grpc::ServerContext* ctx, const v1::GetRecordRequest* req,
                         v1::GetRecordResponse* resp) override;
  grpc::Status Stats(grpc::ServerContext* ctx, const v1::StatsRequest* req, v1::StatsResponse* resp) override;
  // Forwarded to every shard server (each deletes the ids it holds); the counts are summed.
  grpc::Status DeleteRecords(grpc::ServerContext* ctx, const v1::DeleteRecordsRequest* req,
                             v1::DeleteRecordsResponse* resp) override;

 private:
  struct Shard;
  RouterService(const ServerOptions& options, Metrics* metrics, const TokenTable* tokens);

  // Sends req to every shard server at once and waits for all answers. Child calls inherit the deadline and
  // cancellation of parent (when given). A failure names the shard server.
  template <typename Req, typename Resp, typename Call>
  std::vector<absl::Status> FanOut(const grpc::ServerContext* parent, const Req& req, std::vector<Resp>* out,
                                   Call call, absl::Time deadline = absl::InfiniteFuture(),
                                   bool wait_for_ready = false) const;
  // The query vectors (q rows of K) scored on every shard server and merged into resp.
  absl::Status Scatter(const grpc::ServerContext* ctx, const v1::QueryByVectorRequest& req,
                       v1::QueryByVectorResponse* resp) const;
  absl::Status DoQuery(grpc::ServerContext* ctx, const v1::QueryRequest& req, v1::QueryResponse* resp,
                       std::chrono::steady_clock::time_point t0);
  absl::Status DoGetRecord(grpc::ServerContext* ctx, const v1::GetRecordRequest& req, v1::GetRecordResponse* resp);
  absl::Status DoStats(grpc::ServerContext* ctx, v1::StatsResponse* resp);

  ServerOptions options_;  // max_top_k lowered to the smallest of the shard servers'
  Metrics* metrics_;
  const TokenTable* tokens_;
  std::vector<std::unique_ptr<Shard>> shards_;
  uint32_t k_ = 0;
  v1::VectorDType dtype_ = v1::VECTOR_DTYPE_UNSPECIFIED;
  std::string state_id_, state_;
  std::unique_ptr<model::Featurizer> featurizer_;
};

}  // namespace rapidin::server::internal

#endif  // RAPIDIN_SERVER_INTERNAL_ROUTER_H_
