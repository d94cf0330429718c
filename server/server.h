// rapidin-server: start here for the service.
//
// Server::Create opens the store, starts the query engine (one worker per shard), the gRPC server
// (InfluenceService on gRPC's callback API, grpc.health.v1, reflection), the handler pool (the requests' blocking
// work: ServerOptions::limits.handler_threads, max_queued_requests) and the metrics listener. All of it is torn
// down by Shutdown or the destructor. Thread-safety: Wait and Shutdown may be called from different threads.
//
// Router mode (ServerOptions::router.shard_servers instead of store.path): the same service over several shard servers,
// each serving one range of the records (`rapidin cache --shard-index I --shard-count N`). The router computes a
// text query's gradient once, sends the compressed vector to every shard server at once, and merges their top-k
// lists into the global one (ties go to the earlier shard server); token attributions fetch each record's vector
// from the server that holds it. Ingest goes to the shard servers directly.
#ifndef RAPIDIN_SERVER_SERVER_H_
#define RAPIDIN_SERVER_SERVER_H_

#include <memory>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "server/options.h"

namespace rapidin::server {

class Server {
 public:
  // Errors: those of storage::Store::Open, INVALID_ARGUMENT for bad options, UNAVAILABLE when a port is taken.
  // Router mode: UNAVAILABLE when a shard server does not answer in time, FAILED_PRECONDITION when their stores
  // differ in projection state, K or dtype.
  static absl::StatusOr<std::unique_ptr<Server>> Create(const ServerOptions& options);
  ~Server();

  int port() const;          // the gRPC port actually bound
  int metrics_port() const;  // 0 when metrics are disabled
  int http_port() const;     // the HTTP/JSON port (server/http.h); 0 without --http-listen
  void Wait();               // until Shutdown
  // Re-reads ServerOptions::net.auth_tokens (rapidin-server does on SIGHUP); on an error the old tokens stay.
  // FAILED_PRECONDITION when the server has no token file.
  absl::Status ReloadTokens();
  // Stops accepting RPCs, lets in-flight ones finish until `grace`, then cancels the rest.
  void Shutdown(absl::Duration grace = absl::Seconds(5));

 private:
  struct Impl;
  explicit Server(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace rapidin::server

#endif  // RAPIDIN_SERVER_SERVER_H_
