// The service over HTTP/JSON for dashboards and notebooks, with the audit page at "/".
//
// Routes (gRPC transcoding style; bodies and answers in protobuf's canonical JSON mapping, lowerCamelCase names,
// 64-bit integers as strings; both field-name styles are accepted in requests):
//   POST /v1/query              QueryRequest          -> QueryResponse
//   POST /v1/query-by-vector    QueryByVectorRequest  -> QueryByVectorResponse
//   GET  /v1/records/{id}       ?include_vector=true  -> GetRecordResponse
//   GET  /v1/stats                                    -> StatsResponse
//   POST /v1/records:delete     DeleteRecordsRequest  -> DeleteRecordsResponse
//   GET  /openapi.json (the routes' OpenAPI 3 description), GET / (the page), GET /healthz
// Every call goes to the gRPC service through an in-process channel, so validation, limits, bearer tokens
// ("Authorization: Bearer TOKEN", passed on as the gRPC metadata) and metrics are the gRPC port's own. A deadline
// comes from a grpc-timeout header ("500m", "2S") or ?timeout=SECONDS. Errors are a gRPC code mapped to an HTTP
// status (google.rpc's table: INVALID_ARGUMENT 400, UNAUTHENTICATED 401, PERMISSION_DENIED 403, NOT_FOUND 404,
// RESOURCE_EXHAUSTED 429, UNAVAILABLE 503, DEADLINE_EXCEEDED 504, ...) with the body
// {"error": {"code": HTTP, "status": "GRPC_CODE", "message": "..."}}. With a TLS certificate the listener speaks
// HTTPS only, with the gRPC port's certificate and client CA (mutual TLS).
// Thread-safety: handlers run on the listener's own threads; Stop once.
#ifndef RAPIDIN_SERVER_HTTP_H_
#define RAPIDIN_SERVER_HTTP_H_

#include <grpcpp/grpcpp.h>

#include <memory>
#include <string>
#include <thread>

#include "absl/status/statusor.h"
#include "server/options.h"

namespace httplib {
class Server;
}

namespace rapidin::server {

class HttpGateway {
 public:
  // Listens on options.net.http_listen (port 0 picks one). Errors: UNAVAILABLE when it cannot bind,
  // INVALID_ARGUMENT when the TLS files do not load.
  static absl::StatusOr<std::unique_ptr<HttpGateway>> Start(const ServerOptions& options,
                                                            std::shared_ptr<grpc::Channel> channel);
  ~HttpGateway();

  int port() const { return port_; }
  void Stop();

  // The HTTP status for a gRPC status code (google.rpc.Code's mapping; CANCELLED is 499).
  static int HttpStatus(grpc::StatusCode code);

 private:
  HttpGateway() = default;
  std::unique_ptr<httplib::Server> http_;
  std::thread thread_;
  int port_ = 0;
};

}  // namespace rapidin::server

#endif  // RAPIDIN_SERVER_HTTP_H_
