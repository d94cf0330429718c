// Metrics: defined here, in one place, named rapidin_<what>_<unit>, served as Prometheus text on their own
// port by a small HTTP listener (prometheus-cpp's TextSerializer; civetweb's Exposer is avoided because its
// fixed thread stacks are too small inside a LibTorch process, see BUILD-NOTES). Thread-safety: every recording
// method may be called from any thread (prometheus-cpp's metrics are atomic); call Serve once.
#ifndef RAPIDIN_SERVER_METRICS_H_
#define RAPIDIN_SERVER_METRICS_H_

#include <memory>
#include <string>
#include <thread>

#include "absl/status/status.h"
#include "prometheus/counter.h"
#include "prometheus/family.h"
#include "prometheus/gauge.h"
#include "prometheus/histogram.h"
#include "prometheus/registry.h"

namespace httplib {
class Server;
}

namespace rapidin::server {

class Metrics {
 public:
  Metrics();
  ~Metrics();

  // Serves GET /metrics on host:port (port 0 picks one; see port()). Errors: UNAVAILABLE when it cannot bind.
  absl::Status Serve(const std::string& host_port);
  void Stop();
  int port() const { return port_; }
  std::string Render() const;  // the text exposition

  // code is the gRPC status code name ("OK", "INVALID_ARGUMENT", ...).
  void ObserveRequest(const std::string& method, const std::string& code, double seconds);
  void AddBytesScanned(double bytes) { bytes_scanned_->Increment(bytes); }
  void AddVectorsScanned(double n) { scans_->Increment(); vectors_->Increment(n); }
  void SetTier(const std::string& tier, double records, double bytes);

 private:
  std::shared_ptr<prometheus::Registry> registry_;
  prometheus::Family<prometheus::Counter>* requests_;
  prometheus::Family<prometheus::Histogram>* latency_;
  prometheus::Family<prometheus::Gauge>* tier_records_;
  prometheus::Family<prometheus::Gauge>* tier_bytes_;
  prometheus::Counter* bytes_scanned_;
  prometheus::Counter* scans_;
  prometheus::Counter* vectors_;
  std::unique_ptr<httplib::Server> http_;
  std::thread thread_;
  int port_ = 0;
};

}  // namespace rapidin::server

#endif  // RAPIDIN_SERVER_METRICS_H_
