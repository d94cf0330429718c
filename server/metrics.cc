#include "server/metrics.h"

#include <httplib.h>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "prometheus/text_serializer.h"

namespace rapidin::server {

Metrics::Metrics() : registry_(std::make_shared<prometheus::Registry>()) {
  requests_ = &prometheus::BuildCounter()
                   .Name("rapidin_requests_total")
                   .Help("RPCs handled, by method and gRPC status code")
                   .Register(*registry_);
  latency_ = &prometheus::BuildHistogram()
                  .Name("rapidin_request_latency_seconds")
                  .Help("RPC latency by method")
                  .Register(*registry_);
  tier_records_ = &prometheus::BuildGauge()
                       .Name("rapidin_tier_records")
                       .Help("Records resident per storage tier")
                       .Register(*registry_);
  tier_bytes_ = &prometheus::BuildGauge()
                     .Name("rapidin_tier_bytes")
                     .Help("Bytes of vector data per storage tier")
                     .Register(*registry_);
  bytes_scanned_ = &prometheus::BuildCounter()
                        .Name("rapidin_scanned_bytes_total")
                        .Help("Bytes of compressed gradients read by scans")
                        .Register(*registry_)
                        .Add({});
  auto& scans = prometheus::BuildCounter()
                    .Name("rapidin_scans_total")
                    .Help("Scans over the store (a scan may serve several batched queries)")
                    .Register(*registry_);
  scans_ = &scans.Add({});
  vectors_ = &prometheus::BuildCounter()
                  .Name("rapidin_scanned_query_vectors_total")
                  .Help("Query vectors scored by scans")
                  .Register(*registry_)
                  .Add({});
}

Metrics::~Metrics() { Stop(); }

void Metrics::ObserveRequest(const std::string& method, const std::string& code, double seconds) {
  requests_->Add({{"method", method}, {"code", code}}).Increment();
  static const prometheus::Histogram::BucketBoundaries kBuckets = {0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025,
                                                                    0.05,   0.1,   0.25,   0.5,   1,    2.5,
                                                                    5,      10,    30};
  latency_->Add({{"method", method}}, kBuckets).Observe(seconds);
}

void Metrics::SetTier(const std::string& tier, double records, double bytes) {
  tier_records_->Add({{"tier", tier}}).Set(records);
  tier_bytes_->Add({{"tier", tier}}).Set(bytes);
}

std::string Metrics::Render() const {
  prometheus::TextSerializer serializer;
  return serializer.Serialize(registry_->Collect());
}

absl::Status Metrics::Serve(const std::string& host_port) {
  const size_t colon = host_port.rfind(':');
  int port = 0;
  if (colon == std::string::npos || !absl::SimpleAtoi(host_port.substr(colon + 1), &port) || port < 0 ||
      port > 65535) {
    return absl::InvalidArgumentError(absl::StrCat("metrics address must be HOST:PORT, got \"", host_port, "\""));
  }
  std::string host = host_port.substr(0, colon);
  if (host.size() >= 2 && host.front() == '[' && host.back() == ']') host = host.substr(1, host.size() - 2);
  http_ = std::make_unique<httplib::Server>();
  http_->Get("/metrics", [this](const httplib::Request&, httplib::Response& res) {
    res.set_content(Render(), "text/plain; version=0.0.4");
  });
  http_->Get("/healthz", [](const httplib::Request&, httplib::Response& res) { res.set_content("ok\n", "text/plain"); });
  if (port == 0) {
    port_ = http_->bind_to_any_port(host);
    if (port_ < 0) return absl::UnavailableError(absl::StrCat("cannot bind metrics listener on ", host_port));
  } else {
    if (!http_->bind_to_port(host, port)) {
      return absl::UnavailableError(absl::StrCat("cannot bind metrics listener on ", host_port));
    }
    port_ = port;
  }
  thread_ = std::thread([this] { http_->listen_after_bind(); });
  return absl::OkStatus();
}

void Metrics::Stop() {
  if (http_) http_->stop();
  if (thread_.joinable()) thread_.join();
}

}  // namespace rapidin::server
