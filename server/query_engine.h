// The query engine: a worker pool with one worker per shard, a batcher that lets concurrent queries share one
// scan, and the merge stage that forms the global top-k.
//
// Search() may be called from many threads. Requests that arrive while a scan is running are queued and served
// together by the next scan (up to Options::max_batch_vectors query vectors), so the store is read once for the
// whole batch. Results are deterministic: ties are broken by the smaller row index.
#ifndef RAPIDIN_SERVER_QUERY_ENGINE_H_
#define RAPIDIN_SERVER_QUERY_ENGINE_H_

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

namespace rapidin::server {

struct ShardTiming {
  int shard = 0;
  std::string backend;
  int64_t rows = 0;
  double scan_ms = 0;
  uint64_t bytes_scanned = 0;
};

struct SearchResult {
  std::vector<std::vector<kernels::Candidate>> helpful;  // per query vector, best first
  std::vector<std::vector<kernels::Candidate>> harmful;
  std::vector<ShardTiming> shard_timings;
  int vectors_in_scan = 0;
};

class QueryEngine {
 public:
  struct Options {
    int max_batch_vectors = 64;      // query vectors that may share one scan
    kernels::ScoreImpl impl = kernels::ScoreImpl::kAuto;
  };

  // store must outlive the engine. Starts one worker per store shard plus a dispatcher thread.
  QueryEngine(const storage::Store* store, Options options);
  ~QueryEngine();  // stops the threads; pending searches fail with CANCELLED

  // queries: q rows of store->k() floats (validated by the caller). Blocks until the answer or the deadline.
  // Errors: DEADLINE_EXCEEDED, CANCELLED (shutdown), or a scan error.
  absl::StatusOr<SearchResult> Search(std::vector<float> queries, int q, int top_k, int harmful_k,
                                      absl::Time deadline = absl::InfiniteFuture());

  int num_workers() const { return static_cast<int>(workers_.size()); }
  const char* backend() const { return kernels::ImplName(options_.impl); }

 private:
  struct Pending;
  struct Worker;
  void DispatchLoop();
  void RunBatch(std::vector<std::shared_ptr<Pending>>& batch);

  const storage::Store* store_;
  Options options_;
  std::vector<std::unique_ptr<Worker>> workers_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::shared_ptr<Pending>> queue_;
  bool stopping_ = false;
  std::thread dispatcher_;
};

}  // namespace rapidin::server

#endif  // RAPIDIN_SERVER_QUERY_ENGINE_H_
