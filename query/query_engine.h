// The query engine: a worker pool with one worker per shard, a batcher that lets concurrent queries share one
// scan, and the merge stage that forms the global top-k.
//
// Backends (query/backend.h): "cpu" runs one worker per store shard with the CPU kernels; "cuda" runs one worker
// per GPU, each scanning the shards placed on it. Both hand per-shard candidates to the same merge stage, and the
// cold tier is scored on the CPU by the same workers for either.
//
// Search() may be called from many threads. Requests that arrive while a scan is running are queued and served
// together by the next scan (up to Options::max_batch_vectors query vectors), so the store is read once for the
// whole batch. Results are deterministic: ties are broken by the smaller row index.
#ifndef RAPIDIN_QUERY_QUERY_ENGINE_H_
#define RAPIDIN_QUERY_QUERY_ENGINE_H_

#include <atomic>
#include <deque>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "base/mutex.h"
#include "base/thread_pool.h"
#include "kernels/score.h"
#include "query/backend.h"
#include "storage/store.h"

namespace rapidin::query {

struct SearchResult {
  std::vector<std::vector<kernels::Candidate>> helpful;  // per query vector, best first
  std::vector<std::vector<kernels::Candidate>> harmful;
  std::vector<ShardTiming> shard_timings;
  int vectors_in_scan = 0;
};

class QueryEngine {
 public:
  // The backend's options (backend, impl, gpu) and the engine's own.
  struct Options : BackendOptions {
    int max_batch_vectors = 64;      // query vectors that may share one scan
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
  // The same search without a waiting thread (the servers' callback handlers): done gets the answer exactly once,
  // on the engine's dispatcher thread (so it must be quick: hand real work to another thread), or on the calling
  // thread when the engine is shutting down. A request whose deadline passes before its scan starts gets
  // DEADLINE_EXCEEDED without a scan; one whose scan has started gets its answer even if late.
  void SearchAsync(std::vector<float> queries, int q, int top_k, int harmful_k, absl::Time deadline,
                   std::function<void(absl::StatusOr<SearchResult>)> done);

  int num_workers() const { return static_cast<int>(workers_.size()); }
  std::string backend() const;
  bool uses_gpu() const { return backend_->is_gpu(); }
  kernels::TierBytes GpuUsage() const;  // zeros for the CPU backend

 private:
  struct Pending;
  QueryEngine(const storage::Store* store, Options options, std::unique_ptr<ScanBackend> backend);
  // Queues a search; null (after done(CANCELLED)) when the engine is shutting down.
  std::shared_ptr<Pending> Enqueue(std::vector<float> queries, int q, int top_k, int harmful_k, absl::Time deadline,
                                   std::function<void(absl::StatusOr<SearchResult>)> done);
  void DispatchLoop();
  struct WorkerResult;
  // One batch: Stack -> ScanAll (backend scan + ScanCold on every worker) -> Merge.
  void RunBatch(std::vector<std::shared_ptr<Pending>>& batch);
  ScanBatch Stack(const std::vector<std::shared_ptr<Pending>>& batch, std::vector<float>* all) const;
  absl::Status ScanAll(const ScanBatch& sb, std::vector<WorkerResult>* outs);
  void ScanCold(int w, const ScanBatch& sb, std::pair<uint64_t, uint64_t> cold, WorkerResult* o) const;
  void Merge(std::vector<std::shared_ptr<Pending>>& batch, const std::vector<WorkerResult>& outs,
             const absl::Status& status, int total_q);

  const storage::Store* store_;
  Options options_;
  std::unique_ptr<ScanBackend> backend_;
  std::vector<std::unique_ptr<ThreadPool>> workers_;  // one thread per backend worker: its tasks run in order
  Mutex mu_;
  CondVar cv_{&mu_};
  std::deque<std::shared_ptr<Pending>> queue_ ABSL_GUARDED_BY(mu_);
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  std::thread dispatcher_;
};

}  // namespace rapidin::query

#endif  // RAPIDIN_QUERY_QUERY_ENGINE_H_
