// rapidin-server: start here for the service.
//
// Server::Create opens the store, starts the query engine (one worker per shard), the gRPC server
// (InfluenceService, grpc.health.v1, reflection) and the metrics listener. All of it is torn down by Shutdown or
// the destructor. Thread-safety: Wait and Shutdown may be called from different threads.
//
// Router mode (ServerOptions::shard_servers instead of store_path): the same service over several shard servers,
// each serving one range of the records (`rapidin cache --shard-index I --shard-count N`). The router computes a
// text query's gradient once, sends the compressed vector to every shard server at once, and merges their top-k
// lists into the global one (ties go to the earlier shard server); token attributions fetch each record's vector
// from the server that holds it. Ingest goes to the shard servers directly.
#ifndef RAPIDIN_SERVER_SERVER_H_
#define RAPIDIN_SERVER_SERVER_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "kernels/score.h"
#include "model/engine.h"
#include "query/query_engine.h"

namespace rapidin::server {

struct ServerOptions {
  std::string store_path;
  std::string listen = "127.0.0.1:50051";          // port 0 picks a free port (see Server::port)
  std::string metrics_listen = "127.0.0.1:9464";   // empty disables /metrics
  int shards = 0;                                  // 0: one per hardware thread
  uint32_t create_k = 0;                           // create the store with this K when it does not exist
  uint32_t max_top_k = 1000;                       // limit on top_k and harmful_k
  int max_query_vectors = 64;                      // per request
  int max_message_bytes = 64 << 20;                // larger requests get RESOURCE_EXHAUSTED
  int max_batch_vectors = 64;                      // query vectors that may share one scan
  uint64_t host_budget_bytes = 0;                  // vectors kept in host memory; 0: all; the rest is the cold tier
  uint64_t cold_chunk_bytes = 32u << 20;           // cold rows are read from disk and scored in chunks this large
  uint32_t max_attributed_records = 10;            // top_k + harmful_k allowed with token attributions
  std::string backend = "auto";                    // auto (CUDA when a GPU is usable) | cpu | cuda
  kernels::GpuOptions gpu;                           // CUDA backend: devices, hot-tier budget, chunk size
  kernels::ScoreImpl impl = kernels::ScoreImpl::kAuto;
  std::function<void(uint64_t, uint64_t)> load_progress;
  // Query by text: the model whose gradients the store holds. The sketch parameters come from the store's
  // projection state; a model, parameter selection or max_length that differs is refused at start-up.
  std::string model_path;
  std::string adapter_path;
  std::string tokenizer_path;
  std::string param_pattern;
  std::string preconditioner_path;  // Adam second moments the store was cached with (`rapidin cache --preconditioner`)
  std::string checkpoints_path;     // TracIn-CP: the fine-tuning summary the store was cached with (`--checkpoints`)
  std::string model_device = "auto";  // model::EngineOptions::device
  model::TokenGradMethod token_method = model::TokenGradMethod::kShared;  // token attributions' gradients
  // Router mode: the shard servers' HOST:PORT (store_path must be empty). Their stores must share one projection
  // state; start-up waits up to shard_connect_timeout for all of them to answer.
  std::vector<std::string> shard_servers;
  absl::Duration shard_connect_timeout = absl::Seconds(60);
};

class Server {
 public:
  // Errors: those of storage::Store::Open, INVALID_ARGUMENT for bad options, UNAVAILABLE when a port is taken.
  // Router mode: UNAVAILABLE when a shard server does not answer in time, FAILED_PRECONDITION when their stores
  // differ in projection state, K or dtype.
  static absl::StatusOr<std::unique_ptr<Server>> Create(const ServerOptions& options);
  ~Server();

  int port() const;          // the gRPC port actually bound
  int metrics_port() const;  // 0 when metrics are disabled
  void Wait();               // until Shutdown
  // Stops accepting RPCs, lets in-flight ones finish until `grace`, then cancels the rest.
  void Shutdown(absl::Duration grace = absl::Seconds(5));

 private:
  struct Impl;
  explicit Server(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace rapidin::server

#endif  // RAPIDIN_SERVER_SERVER_H_
