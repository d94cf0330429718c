// What the router costs, side by side in one run: the same N random rows served by one rapidin-server (loopback
// gRPC, S scan shards) and by a router over R shard servers holding contiguous ranges of them (S/R scan shards
// each, so the same number of scan threads). One query vector per request, top-10 at both ends, text omitted;
// serial requests, then `--clients` concurrent ones. Reports median and p90 latency, and GB/s of store scanned per
// second of wall time next to the machine's read bandwidth (concurrent requests share scans, so it can exceed it).
// The rows are written straight into the stores (storage::Store), not through gRPC.
// Usage: router_bench [--rows N] [--k K] [--servers R] [--shards S] [--reps N] [--clients C] [--json]
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "bench/bench_util.h"
#include "client/client.h"
#include "server/server.h"
#include "storage/store.h"
#include "tests/test_util.h"

namespace {

namespace v1 = rapidin::v1;
using rapidin::server::Server;
using rapidin::server::ServerOptions;

void Die(const absl::Status& st, const char* what) {
  std::fprintf(stderr, "router_bench: %s: %s\n", what, st.ToString().c_str());
  std::exit(1);
}

void WriteStore(const std::string& path, int64_t begin, int64_t end, int k) {
  rapidin::storage::StoreOptions o;
  o.create_if_missing = true;
  o.k = static_cast<uint32_t>(k);
  auto s = rapidin::storage::Store::Open(path, o);
  if (!s.ok()) Die(s.status(), "store");
  for (int64_t b = begin; b < end; b += 2048) {
    std::vector<rapidin::storage::IngestItem> batch;
    for (int64_t i = b; i < std::min(end, b + 2048); ++i) {
      batch.push_back(rapidin::testing::Item("r" + std::to_string(i), rapidin::testing::SeededVector(i, k)));
    }
    if (auto r = (*s)->Ingest(batch); !r.ok()) Die(r.status(), "ingest");
  }
}

std::unique_ptr<Server> Start(ServerOptions o) {
  o.net.listen = "127.0.0.1:0";
  o.net.metrics_listen = "";
  auto s = Server::Create(o);
  if (!s.ok()) Die(s.status(), "server");
  return std::move(*s);
}

struct Row {
  std::string what;
  int clients = 0;
  double median_ms = 0, p90_ms = 0, gbs = 0;
};

// reps requests per client, `clients` at once; latency per request, throughput over the whole run.
Row Measure(const std::string& what, const std::string& address, int k, int reps, int clients, double store_bytes) {
  std::vector<std::vector<double>> ms(clients);
  const auto t0 = std::chrono::steady_clock::now();
  rapidin::bench::Parallel(clients, [&](int c) {
    auto client = rapidin::client::Client::Connect(address, 60, 64 << 20);
    std::mt19937_64 rng(c + 1);
    std::normal_distribution<float> g;
    for (int r = 0; r < reps + 2; ++r) {
      v1::QueryByVectorRequest req;
      auto* q = req.add_queries();
      for (int i = 0; i < k; ++i) q->add_values(g(rng));
      req.set_top_k(10);
      req.set_harmful_k(10);
      req.set_omit_text(true);
      const auto t = std::chrono::steady_clock::now();
      auto resp = client->QueryByVector(req);
      if (!resp.ok()) Die(resp.status(), what.c_str());
      if (r >= 2) ms[c].push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t).count());
    }
  });
  const double wall = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::vector<double> all;
  for (const auto& v : ms) all.insert(all.end(), v.begin(), v.end());
  std::sort(all.begin(), all.end());
  Row row{what, clients, all[all.size() / 2], all[all.size() * 9 / 10], 0};
  row.gbs = store_bytes * (reps + 2) * clients / wall / 1e9;  // every request scans the whole store
  return row;
}

}  // namespace

int main(int argc, char** argv) {
  int64_t rows = 200000;
  int k = 4096, servers = 2, shards = 2, reps = 30, clients = 4;
  bool json = false;
  for (int i = 1; i < argc; ++i) {
    auto next = [&] { return i + 1 < argc ? argv[++i] : (std::fprintf(stderr, "missing value\n"), std::exit(2), ""); };
    if (!std::strcmp(argv[i], "--rows")) rows = std::atoll(next());
    else if (!std::strcmp(argv[i], "--k")) k = std::atoi(next());
    else if (!std::strcmp(argv[i], "--servers")) servers = std::atoi(next());
    else if (!std::strcmp(argv[i], "--shards")) shards = std::atoi(next());
    else if (!std::strcmp(argv[i], "--reps")) reps = std::atoi(next());
    else if (!std::strcmp(argv[i], "--clients")) clients = std::atoi(next());
    else if (!std::strcmp(argv[i], "--json")) json = true;
    else {
      std::fprintf(stderr, "usage: router_bench [--rows N] [--k K] [--servers R] [--shards S] [--reps N] "
                           "[--clients C] [--json]\n");
      return 2;
    }
  }
  if (rows < servers || servers < 1 || shards < servers || reps < 1 || clients < 1 || k < 1) {
    std::fprintf(stderr, "router_bench: need rows >= servers >= 1, shards >= servers, reps, clients, k >= 1\n");
    return 2;
  }
  rapidin::testing::TempDir dir;
  const auto tw = std::chrono::steady_clock::now();
  WriteStore(dir.path("whole"), 0, rows, k);
  std::vector<std::string> addresses;
  std::vector<std::unique_ptr<Server>> shard_servers;
  for (int s = 0; s < servers; ++s) {
    const std::string path = dir.path("range" + std::to_string(s));
    WriteStore(path, rows * s / servers, rows * (s + 1) / servers, k);
  }
  std::fprintf(stderr, "router_bench: wrote %lld rows twice in %.1f s\n", static_cast<long long>(rows),
               std::chrono::duration<double>(std::chrono::steady_clock::now() - tw).count());
  ServerOptions o;
  o.store.path = dir.path("whole");
  o.store.shards = shards;
  o.scan.backend = "cpu";
  auto whole = Start(o);
  for (int s = 0; s < servers; ++s) {
    o.store.path = dir.path("range" + std::to_string(s));
    o.store.shards = shards / servers;
    shard_servers.push_back(Start(o));
    addresses.push_back("127.0.0.1:" + std::to_string(shard_servers.back()->port()));
  }
  ServerOptions ro;
  ro.router.shard_servers = addresses;
  auto router = Start(ro);
  const double bytes = static_cast<double>(rows) * k * 2;
  const std::string one = "127.0.0.1:" + std::to_string(whole->port());
  const std::string via = "127.0.0.1:" + std::to_string(router->port());
  std::vector<Row> out;
  for (int c : {1, clients}) {  // interleaved, so both see the same machine state
    out.push_back(Measure("one server", one, k, reps, c, bytes));
    out.push_back(Measure("router over " + std::to_string(servers), via, k, reps, c, bytes));
  }
  if (json) {
    std::printf("[");
    for (size_t i = 0; i < out.size(); ++i) {
      std::printf("%s{\"what\":\"%s\",\"clients\":%d,\"median_ms\":%.3f,\"p90_ms\":%.3f,\"gb_per_s\":%.3f}",
                  i ? "," : "", out[i].what.c_str(), out[i].clients, out[i].median_ms, out[i].p90_ms, out[i].gbs);
    }
    std::printf("]\n");
    return 0;
  }
  const int hw = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  const double read_gbs = rapidin::bench::ReadBandwidth(hw, size_t{1} << 30, 3);
  std::printf("%lld rows x K=%d fp16 (%.0f MB), %d scan shards in all, %d shard servers; top-10 both ends, "
              "one vector per request, text omitted; read bandwidth (%d threads, STREAM-like): %.1f GB/s\n\n",
              static_cast<long long>(rows), k, bytes / 1e6, shards, servers, hw, read_gbs);
  std::printf("| served by | concurrent clients | median ms | p90 ms | store GB/s (wall) |\n|---|---|---|---|---|\n");
  for (const auto& r : out) {
    std::printf("| %s | %d | %.2f | %.2f | %.2f |\n", r.what.c_str(), r.clients, r.median_ms, r.p90_ms, r.gbs);
  }
  return 0;
}
