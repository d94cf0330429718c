// The cold tier against the host tier, side by side in one run: one store of N random rows, scanned by the CPU
// query engine (top-10 at both ends, one query vector) with every row resident, and again with a host budget of
// zero rows (every row read from RocksDB per scan), against the machine's read bandwidth. The first cold scan after
// opening and the median of the next ones are reported apart. With --drop-caches (needs root) the page cache is
// dropped before each open, so the first cold scan reads the disk; the later ones read through the page cache.
// Usage: cold_bench [--rows N] [--k K] [--dir DIR] [--reps R] [--drop-caches]
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <random>
#include <fstream>
#include <string>
#include <unistd.h>

#include "bench/bench_util.h"
#include "query/query_engine.h"
#include "storage/store.h"

namespace {

using rapidin::storage::Store;
using rapidin::storage::StoreOptions;

double Scan(rapidin::query::QueryEngine* e, const std::vector<float>& q, int64_t* cold_rows) {
  const auto t0 = std::chrono::steady_clock::now();
  auto r = e->Search(q, 1, 10, 10);
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  if (!r.ok()) {
    std::fprintf(stderr, "%s\n", r.status().ToString().c_str());
    std::exit(1);
  }
  *cold_rows = 0;
  for (const auto& t : r->shard_timings) *cold_rows += t.cold_rows;
  return s;
}

bool DropPageCache() {
  ::sync();
  std::ofstream f("/proc/sys/vm/drop_caches");
  f << "1\n";
  f.flush();
  return static_cast<bool>(f);
}

// Sequential read of every file of the store with 4 MB reads: the disk's rate when the page cache was dropped.
double ReadFilesGBs(const std::string& dir) {
  std::vector<char> buf(4 << 20);
  double bytes = 0;
  const auto t0 = std::chrono::steady_clock::now();
  for (const auto& e : std::filesystem::directory_iterator(dir)) {
    std::ifstream in(e.path(), std::ios::binary);
    while (in.read(buf.data(), buf.size()) || in.gcount() > 0) bytes += in.gcount();
  }
  return bytes / std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / 1e9;
}

}  // namespace

int main(int argc, char** argv) {
  int64_t rows = 100000;
  uint32_t k = 4096;
  int reps = 5;
  std::string dir = "build/cold_bench_store";
  bool drop = false;
  for (int i = 1; i < argc; ++i) {
    if (!std::strcmp(argv[i], "--drop-caches")) drop = true;
  }
  for (int i = 1; i + 1 < argc; i += 2) {
    if (!std::strcmp(argv[i], "--drop-caches")) --i;
    if (!std::strcmp(argv[i], "--rows")) rows = std::atoll(argv[i + 1]);
    else if (!std::strcmp(argv[i], "--k")) k = static_cast<uint32_t>(std::atoi(argv[i + 1]));
    else if (!std::strcmp(argv[i], "--dir")) dir = argv[i + 1];
    else if (!std::strcmp(argv[i], "--reps")) reps = std::atoi(argv[i + 1]);
  }
  const int threads = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  std::filesystem::remove_all(dir);
  {
    StoreOptions o;
    o.create_if_missing = true;
    o.k = k;
    o.sync_writes = false;
    o.host_budget_bytes = 1;  // nothing resident while filling it
    auto s = Store::Open(dir, o);
    if (!s.ok()) {
      std::fprintf(stderr, "%s\n", s.status().ToString().c_str());
      return 1;
    }
    std::mt19937 rng(1);
    std::normal_distribution<float> g;
    for (int64_t b = 0; b < rows; b += 1000) {
      std::vector<rapidin::storage::IngestItem> batch;
      for (int64_t i = b; i < std::min(rows, b + 1000); ++i) {
        rapidin::storage::IngestItem it;
        it.record.set_id("r" + std::to_string(i));
        it.vector.resize(k);
        for (auto& x : it.vector) x = g(rng);
        batch.push_back(std::move(it));
      }
      if (auto r = (*s)->Ingest(batch); !r.ok()) {
        std::fprintf(stderr, "%s\n", r.status().ToString().c_str());
        return 1;
      }
    }
  }
  std::vector<float> q(k);
  std::mt19937 rng(2);
  for (auto& x : q) x = std::normal_distribution<float>()(rng);
  const double bytes = static_cast<double>(rows) * k * 2;
  const double bw = rapidin::bench::ReadBandwidth(threads, size_t{1} << 30, 5);
  std::printf("Store: %lld rows x K=%u fp16 (%.0f MB), %d shards/workers; read bandwidth (STREAM-like) %.1f GB/s\n",
              static_cast<long long>(rows), k, bytes / 1e6, threads, bw);
  if (drop && DropPageCache()) {
    std::printf("Sequential read of the store's files after dropping the page cache: %.2f GB/s\n", ReadFilesGBs(dir));
  }
  std::printf("\n");
  std::printf("| tier | scan | ms | GB/s of vectors | share of read bandwidth | rows read from disk |\n");
  std::printf("|---|---|---|---|---|---|\n");
  for (bool cold : {false, true}) {
    StoreOptions o;
    o.num_shards = threads;
    o.host_budget_bytes = cold ? 1 : 0;
    const bool dropped = drop && DropPageCache();
    if (drop && !dropped) std::fprintf(stderr, "could not drop the page cache (not root?)\n");
    auto s = Store::Open(dir, o);
    if (!s.ok()) return 1;
    rapidin::query::QueryEngine e(s->get(), {});
    int64_t cold_rows = 0;
    const double first = Scan(&e, q, &cold_rows);
    std::vector<double> t;
    for (int r = 0; r < reps; ++r) t.push_back(Scan(&e, q, &cold_rows));
    const double med = rapidin::bench::Median(t);
    const char* name = cold ? "cold (RocksDB, per scan)" : "host (resident)";
    std::printf("| %s | first after open%s | %.1f | %.2f | %.0f%% | %lld |\n", name,
                dropped ? " (page cache dropped)" : "", first * 1e3, bytes / first / 1e9,
                100 * bytes / first / 1e9 / bw, static_cast<long long>(cold_rows));
    std::printf("| %s | median of %d | %.1f | %.2f | %.0f%% | %lld |\n", name, reps, med * 1e3, bytes / med / 1e9,
                100 * bytes / med / 1e9 / bw, static_cast<long long>(cold_rows));
  }
  std::filesystem::remove_all(dir);
  return 0;
}
