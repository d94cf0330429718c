// Pieces shared by the shard service (server.cc) and the router (router.cc): status mapping, request checks,
// loading the query model for a store's projection state (token attributions: model/attribution.h).
#ifndef RAPIDIN_SERVER_INTERNAL_SERVICE_H_
#define RAPIDIN_SERVER_INTERNAL_SERVICE_H_

#include <grpcpp/grpcpp.h>

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
#include "rapidin/v1/rapidin.pb.h"
#include "server/internal/auth.h"
#include "server/metrics.h"
#include "server/options.h"

namespace rapidin::server::internal {

// The one place absl::Status becomes grpc::Status (the codes map one to one).
grpc::Status ToGrpc(const absl::Status& s);
const char* CodeName(grpc::StatusCode c);
absl::Time DeadlineOf(const grpc::ServerContextBase* ctx);
// Counts the request in metrics (method, status code, latency), logs a failure at debug level, and returns st.
grpc::Status Observe(Metrics* metrics, const char* method, std::chrono::steady_clock::time_point t0,
                     const absl::Status& st);

// One unary call on the callback API: its reactor, and the method and start time its metrics need.
struct UnaryCall {
  grpc::ServerUnaryReactor* reactor;
  const char* method;
  std::chrono::steady_clock::time_point t0;
  Metrics* metrics;
  // Counts the call (Observe) and answers it. Exactly once per call.
  void Finish(const absl::Status& st) const { reactor->Finish(Observe(metrics, method, t0, st)); }
};
UnaryCall BeginCall(grpc::CallbackServerContext* ctx, const char* method, Metrics* metrics);

// Runs work(call) on the handler pool; work must end with call.Finish (at once or from a continuation). When the
// pool's queue is full the call is answered RESOURCE_EXHAUSTED; when it was cancelled, or its deadline passed, by
// the time a thread takes it, it is answered without running work.
void RunOnPool(ThreadPool* pool, grpc::CallbackServerContext* ctx, const UnaryCall& call,
               std::function<void(const UnaryCall&)> work);

// A unary call whose work runs on the pool: BeginCall, the token check (auth.h; tokens null: none required) on
// gRPC's thread, answered at once when it fails, else RunOnPool. Returns the call's reactor.
grpc::ServerUnaryReactor* StartOnPool(grpc::CallbackServerContext* ctx, const char* method, Need need,
                                      const TokenTable* tokens, Metrics* metrics, ThreadPool* pool,
                                      std::function<void(const UnaryCall&)> work);

// Milliseconds since t0 (response timings).
double MsSince(std::chrono::steady_clock::time_point t0);

// top_k in 1..max_top_k, harmful_k in 0..max_top_k.
absl::Status CheckK(uint32_t top_k, uint32_t harmful_k, uint32_t max_top_k);

// The checks every QueryByVector gets before any scan: at least one vector, top_k/harmful_k (CheckK), the
// projection state id when the request names one (FAILED_PRECONDITION; `holder` names who uses `state_id` in the
// message), and K values per vector.
absl::Status CheckQueryVectors(const v1::QueryByVectorRequest& req, uint32_t k, const std::string& state_id,
                               uint32_t max_top_k, const char* holder);

// NOT_FOUND when `model` names a model file that does not exist (checked before slow start-up work).
absl::Status CheckModelExists(const ServerOptions::Model& model);

// Checks a text query's fields and limits (model loaded, non-empty texts, attribution count).
absl::Status CheckTextQuery(const v1::QueryRequest& req, bool have_model, const ServerOptions::Limits& limits);

// The query model for a store whose projection state is `state`: the sketch parameters come from the state, and a
// model, adapter, parameter selection or max_length that gives another state is refused (FAILED_PRECONDITION
// naming the differences). `what` names the store in messages.
absl::StatusOr<std::unique_ptr<model::Featurizer>> LoadFeaturizer(const std::string& state,
                                                                  const ServerOptions::Model& model,
                                                                  const std::string& what);

// The generation of a text query (already checked by CheckTextQuery) and its compressed gradient in *q; fills the
// response's gradient time (since t0), token count, truncation and loss.
absl::StatusOr<model::Example> GenerationGradient(const model::Featurizer& featurizer, const v1::QueryRequest& req,
                                                  std::chrono::steady_clock::time_point t0, std::vector<float>* q,
                                                  v1::QueryResponse* resp);

}  // namespace rapidin::server::internal

#endif  // RAPIDIN_SERVER_INTERNAL_SERVICE_H_
