#include "server/query_engine.h"

#include <chrono>
#include <future>

#include "absl/strings/str_cat.h"

namespace rapidin::server {

struct QueryEngine::Pending {
  std::vector<float> queries;
  int q = 0;
  int top_k = 0;
  int harmful_k = 0;
  std::atomic<bool> abandoned{false};
  std::promise<absl::StatusOr<SearchResult>> promise;
};

// One thread that runs the tasks given to its shard, in order.
struct QueryEngine::Worker {
  std::mutex mu;
  std::condition_variable cv;
  std::deque<std::function<void()>> tasks;
  bool stop = false;
  std::thread thread;

  Worker() {
    thread = std::thread([this] {
      for (;;) {
        std::function<void()> task;
        {
          std::unique_lock<std::mutex> l(mu);
          cv.wait(l, [this] { return stop || !tasks.empty(); });
          if (tasks.empty()) return;
          task = std::move(tasks.front());
          tasks.pop_front();
        }
        task();
      }
    });
  }
  ~Worker() {
    {
      std::lock_guard<std::mutex> l(mu);
      stop = true;
    }
    cv.notify_one();
    thread.join();
  }
  void Post(std::function<void()> task) {
    {
      std::lock_guard<std::mutex> l(mu);
      tasks.push_back(std::move(task));
    }
    cv.notify_one();
  }
};

QueryEngine::QueryEngine(const storage::Store* store, Options options) : store_(store), options_(options) {
  options_.impl = kernels::ResolveImpl(options_.impl);
  for (int s = 0; s < store_->num_shards(); ++s) workers_.push_back(std::make_unique<Worker>());
  dispatcher_ = std::thread([this] { DispatchLoop(); });
}

QueryEngine::~QueryEngine() {
  {
    std::lock_guard<std::mutex> l(mu_);
    stopping_ = true;
  }
  cv_.notify_all();
  dispatcher_.join();
  for (auto& p : queue_) p->promise.set_value(absl::CancelledError("server is shutting down"));
  workers_.clear();
}

absl::StatusOr<SearchResult> QueryEngine::Search(std::vector<float> queries, int q, int top_k, int harmful_k,
                                                 absl::Time deadline) {
  auto p = std::make_shared<Pending>();
  p->queries = std::move(queries);
  p->q = q;
  p->top_k = top_k;
  p->harmful_k = harmful_k;
  auto fut = p->promise.get_future();
  {
    std::lock_guard<std::mutex> l(mu_);
    if (stopping_) return absl::CancelledError("server is shutting down");
    queue_.push_back(p);
  }
  cv_.notify_one();
  if (deadline != absl::InfiniteFuture()) {
    if (fut.wait_until(absl::ToChronoTime(deadline)) != std::future_status::ready) {
      p->abandoned = true;  // the dispatcher skips it if it has not started yet
      return absl::DeadlineExceededError("deadline exceeded while waiting for the scan");
    }
  }
  return fut.get();
}

void QueryEngine::DispatchLoop() {
  for (;;) {
    std::vector<std::shared_ptr<Pending>> batch;
    {
      std::unique_lock<std::mutex> l(mu_);
      cv_.wait(l, [this] { return stopping_ || !queue_.empty(); });
      if (stopping_) return;
      int vectors = 0;
      while (!queue_.empty()) {
        auto& p = queue_.front();
        if (p->abandoned) {
          queue_.pop_front();
          continue;
        }
        if (!batch.empty() && vectors + p->q > options_.max_batch_vectors) break;
        vectors += p->q;
        batch.push_back(std::move(p));
        queue_.pop_front();
      }
    }
    if (!batch.empty()) RunBatch(batch);
  }
}

void QueryEngine::RunBatch(std::vector<std::shared_ptr<Pending>>& batch) {
  const int64_t k = store_->k();
  // Stack every request's vectors into one matrix so each shard reads its rows once for all of them.
  int total_q = 0;
  for (const auto& p : batch) total_q += p->q;
  std::vector<float> all(static_cast<size_t>(total_q) * k);
  {
    size_t off = 0;
    for (const auto& p : batch) {
      std::copy(p->queries.begin(), p->queries.end(), all.begin() + off);
      off += p->queries.size();
    }
  }
  const int S = static_cast<int>(workers_.size());
  struct ShardOut {
    std::vector<kernels::TopK> helpful, harmful;
    ShardTiming timing;
    absl::Status status;
  };
  std::vector<ShardOut> outs(S);
  std::mutex done_mu;
  std::condition_variable done_cv;
  int remaining = S;
  for (int s = 0; s < S; ++s) {
    workers_[s]->Post([&, s] {
      ShardOut& o = outs[s];
      for (const auto& p : batch) {
        for (int j = 0; j < p->q; ++j) {
          o.helpful.emplace_back(p->top_k, true);
          o.harmful.emplace_back(p->harmful_k, false);
        }
      }
      const auto t0 = std::chrono::steady_clock::now();
      o.status = store_->WithShard(s, [&](const storage::ShardView& v) {
        o.timing.rows = v.n;
        o.timing.bytes_scanned = static_cast<uint64_t>(v.n) * v.k * sizeof(uint16_t);
        return kernels::ScanTopK(v.rows, v.n, v.k, all.data(), total_q, v.first_index, v.index_stride,
                                 &o.helpful, &o.harmful, options_.impl);
      });
      o.timing.shard = s;
      o.timing.backend = kernels::ImplName(options_.impl);
      o.timing.scan_ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
      std::lock_guard<std::mutex> l(done_mu);
      if (--remaining == 0) done_cv.notify_one();
    });
  }
  {
    std::unique_lock<std::mutex> l(done_mu);
    done_cv.wait(l, [&] { return remaining == 0; });
  }
  absl::Status status;
  std::vector<ShardTiming> timings;
  for (auto& o : outs) {
    if (!o.status.ok() && status.ok()) status = o.status;
    timings.push_back(o.timing);
  }
  // Merge stage: per query vector, the global top-k of the shards' local top-k lists.
  int base = 0;
  for (auto& p : batch) {
    if (!status.ok()) {
      p->promise.set_value(status);
      continue;
    }
    SearchResult r;
    r.shard_timings = timings;
    r.vectors_in_scan = total_q;
    for (int j = 0; j < p->q; ++j) {
      std::vector<std::vector<kernels::Candidate>> hp, hm;
      for (auto& o : outs) {
        hp.push_back(o.helpful[base + j].Sorted());
        hm.push_back(o.harmful[base + j].Sorted());
      }
      r.helpful.push_back(kernels::MergeTopK(hp, p->top_k, true));
      r.harmful.push_back(kernels::MergeTopK(hm, p->harmful_k, false));
    }
    base += p->q;
    p->promise.set_value(std::move(r));
  }
}

}  // namespace rapidin::server
