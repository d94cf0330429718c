#include "server/http.h"

#include <google/protobuf/util/json_util.h>
#include <httplib.h>

#include <cctype>
#include <chrono>
#include <cstdlib>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "rapidin/v1/rapidin.grpc.pb.h"
#include "spdlog/spdlog.h"

namespace rapidin::server {

// The page and the OpenAPI description (server/http/*, embedded at build time).
extern const char* const kHttpIndexHtml;
extern const char* const kHttpOpenApiJson;

namespace {

const char* CodeName(grpc::StatusCode c) {
  static const char* const kNames[] = {"OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED",
                                       "NOT_FOUND", "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED",
                                       "FAILED_PRECONDITION", "ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL",
                                       "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED"};
  const int i = static_cast<int>(c);
  return i >= 0 && i < 17 ? kNames[i] : "UNKNOWN";
}

std::string JsonEscape(const std::string& s) {
  std::string out;
  for (unsigned char c : s) {
    if (c == '"' || c == '\\') {
      out += '\\';
      out += static_cast<char>(c);
    } else if (c < 0x20) {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\u%04x", c);
      out += buf;
    } else {
      out += static_cast<char>(c);
    }
  }
  return out;
}

void SendError(httplib::Response& res, grpc::StatusCode code, const std::string& message) {
  const int http = HttpGateway::HttpStatus(code);
  res.status = http;
  res.set_content(absl::StrCat("{\"error\": {\"code\": ", http, ", \"status\": \"", CodeName(code),
                               "\", \"message\": \"", JsonEscape(message), "\"}}\n"),
                  "application/json");
}

// grpc-timeout: an integer and a unit (H, M, S, m, u, n), as gRPC's own header.
bool ParseGrpcTimeout(const std::string& v, std::chrono::nanoseconds* out) {
  if (v.size() < 2 || v.size() > 9) return false;
  int64_t n = 0;
  if (!absl::SimpleAtoi(v.substr(0, v.size() - 1), &n) || n < 0) return false;
  switch (v.back()) {
    case 'H': *out = std::chrono::hours(n); return true;
    case 'M': *out = std::chrono::minutes(n); return true;
    case 'S': *out = std::chrono::seconds(n); return true;
    case 'm': *out = std::chrono::milliseconds(n); return true;
    case 'u': *out = std::chrono::microseconds(n); return true;
    case 'n': *out = std::chrono::nanoseconds(n); return true;
    default: return false;
  }
}

// The call's context from the HTTP request: its bearer token and deadline. False (and the error sent) when the
// deadline is malformed.
bool MakeContext(const httplib::Request& req, httplib::Response& res, grpc::ClientContext* ctx) {
  if (req.has_header("Authorization")) ctx->AddMetadata("authorization", req.get_header_value("Authorization"));
  std::chrono::nanoseconds timeout{0};
  bool has = false;
  if (req.has_header("grpc-timeout")) {
    if (!ParseGrpcTimeout(req.get_header_value("grpc-timeout"), &timeout)) {
      SendError(res, grpc::StatusCode::INVALID_ARGUMENT, "grpc-timeout must be an integer and a unit (H M S m u n)");
      return false;
    }
    has = true;
  } else if (req.has_param("timeout")) {
    double s = 0;
    if (!absl::SimpleAtod(req.get_param_value("timeout"), &s) || !(s > 0) || s > 86400) {
      SendError(res, grpc::StatusCode::INVALID_ARGUMENT, "timeout must be seconds in (0, 86400]");
      return false;
    }
    timeout = std::chrono::nanoseconds(static_cast<int64_t>(s * 1e9));
    has = true;
  }
  if (has) ctx->set_deadline(std::chrono::system_clock::now() + timeout);
  return true;
}

void SendMessage(httplib::Response& res, const google::protobuf::Message& m) {
  google::protobuf::util::JsonPrintOptions o;
  std::string out;
  const auto st = google::protobuf::util::MessageToJsonString(m, &out, o);
  if (!st.ok()) {
    SendError(res, grpc::StatusCode::INTERNAL, absl::StrCat("cannot encode the answer: ", st.ToString()));
    return;
  }
  res.status = 200;
  res.set_content(out + "\n", "application/json");
}

bool ParseBody(const httplib::Request& req, httplib::Response& res, google::protobuf::Message* m) {
  const std::string& body = req.body.empty() ? std::string("{}") : req.body;
  google::protobuf::util::JsonParseOptions o;  // unknown fields are errors: a typo is not silently ignored
  const auto st = google::protobuf::util::JsonStringToMessage(body, m, o);
  if (!st.ok()) {
    SendError(res, grpc::StatusCode::INVALID_ARGUMENT,
              absl::StrCat("the body is not a ", m->GetDescriptor()->name(), " in JSON: ", st.message().as_string()));
    return false;
  }
  return true;
}

void SendStatus(httplib::Response& res, const grpc::Status& st, const google::protobuf::Message& m) {
  if (st.ok()) {
    SendMessage(res, m);
  } else {
    SendError(res, st.error_code(), st.error_message().empty() ? CodeName(st.error_code()) : st.error_message());
  }
}

}  // namespace

int HttpGateway::HttpStatus(grpc::StatusCode code) {
  switch (code) {
    case grpc::StatusCode::OK: return 200;
    case grpc::StatusCode::CANCELLED: return 499;
    case grpc::StatusCode::INVALID_ARGUMENT:
    case grpc::StatusCode::FAILED_PRECONDITION:
    case grpc::StatusCode::OUT_OF_RANGE: return 400;
    case grpc::StatusCode::UNAUTHENTICATED: return 401;
    case grpc::StatusCode::PERMISSION_DENIED: return 403;
    case grpc::StatusCode::NOT_FOUND: return 404;
    case grpc::StatusCode::ALREADY_EXISTS:
    case grpc::StatusCode::ABORTED: return 409;
    case grpc::StatusCode::RESOURCE_EXHAUSTED: return 429;
    case grpc::StatusCode::UNIMPLEMENTED: return 501;
    case grpc::StatusCode::UNAVAILABLE: return 503;
    case grpc::StatusCode::DEADLINE_EXCEEDED: return 504;
    default: return 500;  // UNKNOWN, INTERNAL, DATA_LOSS
  }
}

absl::StatusOr<std::unique_ptr<HttpGateway>> HttpGateway::Start(const ServerOptions& options,
                                                                std::shared_ptr<grpc::Channel> channel) {
  const auto& net = options.net;
  std::unique_ptr<HttpGateway> g(new HttpGateway());
  if (!net.tls_cert.empty()) {
    auto ssl = std::make_unique<httplib::SSLServer>(net.tls_cert.c_str(), net.tls_key.c_str(),
                                                    net.tls_client_ca.empty() ? nullptr : net.tls_client_ca.c_str());
    if (!ssl->is_valid()) {
      return absl::InvalidArgumentError("--http-listen: the TLS certificate, key or client CA does not load");
    }
    g->http_ = std::move(ssl);
  } else {
    g->http_ = std::make_unique<httplib::Server>();
  }
  httplib::Server& s = *g->http_;
  s.set_payload_max_length(static_cast<size_t>(net.max_message_bytes));
  s.new_task_queue = [] { return new httplib::ThreadPool(8); };
  auto stub = std::shared_ptr<v1::InfluenceService::Stub>(v1::InfluenceService::NewStub(channel));

  s.Post("/v1/query", [stub](const httplib::Request& req, httplib::Response& res) {
    v1::QueryRequest in;
    v1::QueryResponse out;
    grpc::ClientContext ctx;
    if (!ParseBody(req, res, &in) || !MakeContext(req, res, &ctx)) return;
    SendStatus(res, stub->Query(&ctx, in, &out), out);
  });
  s.Post("/v1/query-by-vector", [stub](const httplib::Request& req, httplib::Response& res) {
    v1::QueryByVectorRequest in;
    v1::QueryByVectorResponse out;
    grpc::ClientContext ctx;
    if (!ParseBody(req, res, &in) || !MakeContext(req, res, &ctx)) return;
    SendStatus(res, stub->QueryByVector(&ctx, in, &out), out);
  });
  s.Get(R"(/v1/records/(.+))", [stub](const httplib::Request& req, httplib::Response& res) {
    v1::GetRecordRequest in;
    v1::GetRecordResponse out;
    grpc::ClientContext ctx;
    in.set_id(req.matches[1]);
    if (req.has_param("include_vector")) {
      const std::string v = req.get_param_value("include_vector");
      if (v != "true" && v != "false") {
        SendError(res, grpc::StatusCode::INVALID_ARGUMENT, "include_vector must be true or false");
        return;
      }
      in.set_include_vector(v == "true");
    }
    if (!MakeContext(req, res, &ctx)) return;
    SendStatus(res, stub->GetRecord(&ctx, in, &out), out);
  });
  s.Get("/v1/stats", [stub](const httplib::Request& req, httplib::Response& res) {
    v1::StatsRequest in;
    v1::StatsResponse out;
    grpc::ClientContext ctx;
    if (!MakeContext(req, res, &ctx)) return;
    SendStatus(res, stub->Stats(&ctx, in, &out), out);
  });
  s.Post("/v1/records:delete", [stub](const httplib::Request& req, httplib::Response& res) {
    v1::DeleteRecordsRequest in;
    v1::DeleteRecordsResponse out;
    grpc::ClientContext ctx;
    if (!ParseBody(req, res, &in) || !MakeContext(req, res, &ctx)) return;
    SendStatus(res, stub->DeleteRecords(&ctx, in, &out), out);
  });
  s.Get("/openapi.json", [](const httplib::Request&, httplib::Response& res) {
    res.set_content(kHttpOpenApiJson, "application/json");
  });
  s.Get("/healthz", [](const httplib::Request&, httplib::Response& res) { res.set_content("ok\n", "text/plain"); });
  s.Get("/", [](const httplib::Request&, httplib::Response& res) {
    // The page is self-contained; it may not load anything from elsewhere.
    res.set_header("Content-Security-Policy",
                   "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; "
                   "img-src data:");
    res.set_header("X-Content-Type-Options", "nosniff");
    res.set_content(kHttpIndexHtml, "text/html; charset=utf-8");
  });
  // Anything else, or a known path with another method: a JSON 404 / 405.
  s.set_error_handler([](const httplib::Request& req, httplib::Response& res) {
    if (!res.body.empty()) return;  // a handler's own error
    if (res.status == 404) {
      SendError(res, grpc::StatusCode::NOT_FOUND, absl::StrCat("no route ", req.method, " ", req.path));
    } else if (res.status == 413) {
      SendError(res, grpc::StatusCode::RESOURCE_EXHAUSTED, "the request body exceeds --max-message-mb");
      res.status = 413;
    } else if (res.status == 400) {
      SendError(res, grpc::StatusCode::INVALID_ARGUMENT, "malformed HTTP request");
    } else {
      const int http = res.status;
      SendError(res, grpc::StatusCode::UNKNOWN, absl::StrCat("HTTP ", http));
      res.status = http;
    }
  });

  std::string host = net.http_listen;
  int port = 0;
  const size_t colon = host.rfind(':');
  if (colon == std::string::npos || !absl::SimpleAtoi(host.substr(colon + 1), &port) || port < 0 || port > 65535) {
    return absl::InvalidArgumentError(absl::StrCat("--http-listen wants HOST:PORT, not \"", host, "\""));
  }
  host = host.substr(0, colon);
  if (host.size() > 2 && host.front() == '[' && host.back() == ']') host = host.substr(1, host.size() - 2);
  if (port == 0) {
    port = s.bind_to_any_port(host);
  } else if (!s.bind_to_port(host, port)) {
    port = -1;
  }
  if (port <= 0) return absl::UnavailableError(absl::StrCat("cannot listen on ", net.http_listen, " (HTTP)"));
  g->port_ = port;
  g->thread_ = std::thread([srv = g->http_.get()] { srv->listen_after_bind(); });
  spdlog::info("serving HTTP/JSON and the page on port {} ({})", port, net.tls_cert.empty() ? "plaintext" : "TLS");
  return g;
}

void HttpGateway::Stop() {
  if (http_) http_->stop();
  if (thread_.joinable()) thread_.join();
}

HttpGateway::~HttpGateway() { Stop(); }

}  // namespace rapidin::server
