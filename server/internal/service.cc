#include "server/internal/service.h"

#include <spdlog/spdlog.h>

#include <filesystem>

#include "absl/strings/str_cat.h"
#include "model/engine.h"

namespace rapidin::server::internal {

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

absl::Time DeadlineOf(const grpc::ServerContextBase* ctx) {
  const auto d = ctx->deadline();
  if (d == std::chrono::system_clock::time_point::max()) return absl::InfiniteFuture();
  return absl::FromChrono(d);
}

grpc::Status Observe(Metrics* metrics, const char* method, std::chrono::steady_clock::time_point t0,
                     const absl::Status& st) {
  grpc::Status g = ToGrpc(st);
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  metrics->ObserveRequest(method, CodeName(g.error_code()), secs);
  if (!st.ok()) spdlog::debug("{} -> {}: {}", method, CodeName(g.error_code()), std::string(st.message()));
  return g;
}

UnaryCall BeginCall(grpc::CallbackServerContext* ctx, const char* method, Metrics* metrics) {
  return UnaryCall{ctx->DefaultReactor(), method, std::chrono::steady_clock::now(), metrics};
}

void RunOnPool(ThreadPool* pool, grpc::CallbackServerContext* ctx, const UnaryCall& call,
               std::function<void(const UnaryCall&)> work) {
  const bool admitted = pool->TrySchedule([ctx, call, work = std::move(work)] {
    if (ctx->IsCancelled()) return call.Finish(absl::CancelledError("cancelled by the client"));
    if (absl::Now() >= DeadlineOf(ctx)) {
      return call.Finish(absl::DeadlineExceededError("deadline exceeded while waiting for a handler thread"));
    }
    work(call);
  });
  if (!admitted) {
    call.Finish(absl::ResourceExhaustedError(absl::StrCat("server busy: ", pool->max_queued(),
                                                          " requests are waiting for a handler thread; retry later")));
  }
}

grpc::ServerUnaryReactor* StartOnPool(grpc::CallbackServerContext* ctx, const char* method, Need need,
                                      const TokenTable* tokens, Metrics* metrics, ThreadPool* pool,
                                      std::function<void(const UnaryCall&)> work) {
  const UnaryCall call = BeginCall(ctx, method, metrics);
  if (absl::Status a = Authorize(tokens, *ctx, need, method); !a.ok()) {
    call.Finish(a);
  } else {
    RunOnPool(pool, ctx, call, std::move(work));
  }
  return call.reactor;
}

double MsSince(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
}

absl::Status CheckK(uint32_t top_k, uint32_t harmful_k, uint32_t max_top_k) {
  if (top_k == 0 || top_k > max_top_k) {
    return absl::InvalidArgumentError(absl::StrCat("top_k must be 1..", max_top_k, ", got ", top_k));
  }
  if (harmful_k > max_top_k) {
    return absl::InvalidArgumentError(absl::StrCat("harmful_k must be 0..", max_top_k, ", got ", harmful_k));
  }
  return absl::OkStatus();
}

absl::Status CheckQueryVectors(const v1::QueryByVectorRequest& req, uint32_t k, const std::string& state_id,
                               uint32_t max_top_k, const char* holder) {
  if (req.queries_size() == 0) return absl::InvalidArgumentError("no query vectors");
  absl::Status st = CheckK(req.top_k(), req.harmful_k(), max_top_k);
  if (!st.ok()) return st;
  if (!req.projection_state_id().empty() && req.projection_state_id() != state_id) {
    return absl::FailedPreconditionError(absl::StrCat("query vectors were compressed with projection state ",
                                                      req.projection_state_id(), " but ", holder, " ", state_id,
                                                      "; scores would be meaningless"));
  }
  for (int j = 0; j < req.queries_size(); ++j) {
    if (static_cast<uint32_t>(req.queries(j).values_size()) != k) {
      return absl::InvalidArgumentError(absl::StrCat("query vector ", j, " has ", req.queries(j).values_size(),
                                                     " values; the store's K is ", k));
    }
  }
  return absl::OkStatus();
}

absl::Status CheckModelExists(const ServerOptions::Model& model) {
  if (!model.path.empty() && !std::filesystem::exists(model.path)) {
    return absl::NotFoundError(absl::StrCat("model not found: ", model.path));
  }
  return absl::OkStatus();
}

absl::Status CheckTextQuery(const v1::QueryRequest& req, bool have_model, const ServerOptions::Limits& limits) {
  if (!have_model) {
    return absl::FailedPreconditionError(
        "Query by text needs a model: this server was started without --model; use QueryByVector with "
        "precomputed compressed gradients");
  }
  if (req.messages_size() > 0) {  // a chat: its last message is the assistant's generation
    if (!req.instruction().empty() || !req.input().empty() || !req.generation().empty()) {
      return absl::InvalidArgumentError("give either messages or instruction/input/generation, not both");
    }
    const auto& last = req.messages(req.messages_size() - 1);
    if (last.role() != "assistant" || last.content().empty()) {
      return absl::InvalidArgumentError("the last message must be the assistant's generation (non-empty)");
    }
  } else {
    if (req.generation().empty()) return absl::InvalidArgumentError("generation is empty");
    if (req.instruction().empty()) return absl::InvalidArgumentError("instruction is empty");
  }
  absl::Status st = CheckK(req.top_k(), req.harmful_k(), limits.max_top_k);
  if (!st.ok()) return st;
  if (req.attributions() && req.top_k() + req.harmful_k() > limits.max_attributed_records) {
    return absl::InvalidArgumentError(absl::StrCat("token attributions are computed for at most ",
                                                   limits.max_attributed_records, " records per query; asked for ",
                                                   req.top_k() + req.harmful_k(), " (top_k + harmful_k)"));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<model::Featurizer>> LoadFeaturizer(const std::string& state,
                                                                  const ServerOptions::Model& model,
                                                                  const std::string& what) {
  model::EngineOptions mo;
  mo.model_path = model.path;
  mo.tokenizer_path = model.tokenizer_path;
  mo.chat_template = model.chat_template;
  mo.adapter_path = model.adapter_path;
  mo.param_pattern = model.param_pattern;
  mo.preconditioner_path = model.preconditioner_path;
  mo.device = model.device;
  mo.grad_path = model.grad_path;
  auto fo = model::OptionsFromState(state, mo, model.checkpoints_path);
  if (!fo.ok()) return fo.status();
  fo->token_method = model.token_method;
  model::SetComputeThreads(1);
  auto f = model::Featurizer::Create(*fo);
  if (!f.ok()) return f.status();
  const std::string diff = model::DescribeStateDifference(state, (*f)->projection_state());
  if (!diff.empty()) {
    return absl::FailedPreconditionError(
        absl::StrCat(what, " was not built with this model and parameter selection: ", diff));
  }
  return f;
}

absl::StatusOr<model::Example> GenerationGradient(const model::Featurizer& featurizer, const v1::QueryRequest& req,
                                                  std::chrono::steady_clock::time_point t0, std::vector<float>* q,
                                                  v1::QueryResponse* resp) {
  model::Example gen{req.instruction(), req.input(), req.generation(), {req.hotwords().begin(), req.hotwords().end()}};
  if (req.messages_size() > 0) {
    gen.format = model::RecordFormat::kChat;
    gen.last_turn_only = true;
    for (const auto& m : req.messages()) gen.messages.push_back({m.role(), m.content()});
  }
  auto info = featurizer.Compress(gen, q);
  if (!info.ok()) return info.status();
  resp->set_gradient_ms(MsSince(t0));
  resp->set_generation_tokens(info->response_tokens);
  resp->set_truncated(info->truncated);
  resp->set_generation_loss(info->loss);
  return gen;
}

}  // namespace rapidin::server::internal
