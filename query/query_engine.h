// The query engine: a worker pool with one worker per shard, a batcher that lets concurrent queries share one
// scan, and the merge stage that forms the global top-k.
//
// Backends: "cpu" runs one worker per store shard with the CPU kernels; "cuda" runs one worker per GPU, each
// scanning the shards placed on it (hot in device memory, or warm: streamed from host memory), through
// gpu::Scanner. Both hand per-shard candidates to the same merge stage.
//
// Search() may be called from many threads. Requests that arrive while a scan is running are queued and served
// together by the next scan (up to Options::max_batch_vectors query vectors), so the store is read once for the
// whole batch. Results are deterministic: ties are broken by the smaller row index.
#ifndef RAPIDIN_QUERY_QUERY_ENGINE_H_
#define RAPIDIN_QUERY_QUERY_ENGINE_H_

#include <atomic>
#include <condition_variable>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "kernels/score.h"
#include "storage/store.h"

namespace rapidin::query {

struct ShardTiming {
  int shard = 0;
  std::string backend;
  int64_t rows = 0;
  double scan_ms = 0;
  uint64_t bytes_scanned = 0;
  int64_t cold_rows = 0;             // of `rows`, read from the cold tier (disk) for this scan
};

struct SearchResult {
  std::vector<std::vector<kernels::Candidate>> helpful;  // per query vector, best first
  std::vector<std::vector<kernels::Candidate>> harmful;
  std::vector<ShardTiming> shard_timings;
  int vectors_in_scan = 0;
};

struct GpuOptions {
  std::vector<int> devices;                    // empty: every visible device
  double memory_fraction = 0.85;               // share of free device memory the hot tier may take
  uint64_t hot_limit_bytes = ~uint64_t{0};     // per-device cap on the hot tier (0: stream everything)
  uint64_t chunk_bytes = uint64_t{128} << 20;  // streamed chunk size for warm shards
};

// Bytes of the store per GPU tier (zero for the CPU backend).
struct GpuTierUsage {
  uint64_t hot_bytes = 0;     // resident in device memory
  uint64_t warm_bytes = 0;    // streamed from host memory at each scan
};

// True when this build has the CUDA backend (RAPIDIN_ENABLE_CUDA).
bool CudaBackendBuilt();
// Usable GPUs for the CUDA backend; UNAVAILABLE with the driver's reason when there are none.
absl::Status CudaBackendUsable(std::string* description = nullptr);
// Host-tier allocator for the CUDA backend: page-locked memory when it can be had (falls back to plain memory).
storage::internal::HostAllocator CudaHostAllocator();

class QueryEngine {
 public:
  struct Options {
    int max_batch_vectors = 64;      // query vectors that may share one scan
    kernels::ScoreImpl impl = kernels::ScoreImpl::kAuto;
    std::string backend = "cpu";     // "cpu" | "cuda"
    GpuOptions gpu;
    // Cold tier (rows not resident in host memory): read from RocksDB in chunks of this many bytes, spread over
    // the workers, and scored on the CPU for either backend (disk, not scoring, bounds that tier).
    uint64_t cold_chunk_bytes = 32u << 20;
  };

  // store must outlive the engine. For "cuda", places the shards on the GPUs and uploads the hot ones.
  // Errors: INVALID_ARGUMENT (unknown backend), UNAVAILABLE (no usable GPU, or a build without CUDA), GPU errors.
  static absl::StatusOr<std::unique_ptr<QueryEngine>> Create(const storage::Store* store, Options options);

  // CPU backend only. Starts one worker per store shard plus a dispatcher thread.
  QueryEngine(const storage::Store* store, Options options);
  ~QueryEngine();  // stops the threads; pending searches fail with CANCELLED

  // queries: q rows of store->k() floats (validated by the caller). Blocks until the answer or the deadline.
  // Errors: DEADLINE_EXCEEDED, CANCELLED (shutdown), or a scan error.
  absl::StatusOr<SearchResult> Search(std::vector<float> queries, int q, int top_k, int harmful_k,
                                      absl::Time deadline = absl::InfiniteFuture());

  int num_workers() const { return static_cast<int>(workers_.size()); }
  std::string backend() const;
  bool uses_gpu() const { return gpu_ != nullptr; }
  GpuTierUsage GpuUsage() const;  // zeros for the CPU backend

 private:
  struct Pending;
  struct Worker;
  struct Gpu;
  QueryEngine(const storage::Store* store, Options options, std::unique_ptr<Gpu> gpu);
  void DispatchLoop();
  void RunBatch(std::vector<std::shared_ptr<Pending>>& batch);

  const storage::Store* store_;
  Options options_;
  std::unique_ptr<Gpu> gpu_;
  std::vector<std::unique_ptr<Worker>> workers_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::shared_ptr<Pending>> queue_;
  bool stopping_ = false;
  std::thread dispatcher_;
};

}  // namespace rapidin::query

#endif  // RAPIDIN_QUERY_QUERY_ENGINE_H_
