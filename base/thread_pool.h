// A fixed pool of threads with a bounded queue: the servers' handler pool. gRPC's callback API runs handlers on
// its own few threads, which must not block, so the blocking part of a request (a gradient, RocksDB reads and
// synced writes) runs here. The thread count does not grow with the number of clients, and TrySchedule refuses
// work beyond the queue's bound, which the servers answer with RESOURCE_EXHAUSTED (Triton's request limit).
//
// Thread-safe. The destructor runs every task already queued, then joins the threads.
#ifndef RAPIDIN_BASE_THREAD_POOL_H_
#define RAPIDIN_BASE_THREAD_POOL_H_

#include <deque>
#include <functional>
#include <thread>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "base/mutex.h"

namespace rapidin {

class ThreadPool {
 public:
  // threads >= 1; max_queued >= 1: TrySchedule refuses while this many tasks wait for a thread.
  ThreadPool(int threads, int max_queued) : max_queued_(max_queued) {
    for (int i = 0; i < threads; ++i) threads_.emplace_back([this] { Run(); });
  }
  ~ThreadPool() {
    {
      MutexLock l(&mu_);
      stop_ = true;
      cv_.SignalAll();
    }
    for (auto& t : threads_) t.join();
  }
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  // New work: false (and f dropped) when max_queued tasks are waiting already.
  bool TrySchedule(std::function<void()> f) {
    MutexLock l(&mu_);
    if (static_cast<int>(tasks_.size()) >= max_queued_) return false;
    tasks_.push_back(std::move(f));
    cv_.Signal();
    return true;
  }
  // The continuation of work already admitted: never refused, so an admitted request always gets its answer.
  void Schedule(std::function<void()> f) {
    MutexLock l(&mu_);
    tasks_.push_back(std::move(f));
    cv_.Signal();
  }
  int threads() const { return static_cast<int>(threads_.size()); }
  int max_queued() const { return max_queued_; }

 private:
  void Run() {
    for (;;) {
      std::function<void()> f;
      {
        MutexLock l(&mu_);
        while (!stop_ && tasks_.empty()) cv_.Wait();
        if (tasks_.empty()) return;  // stopping, and nothing left to run
        f = std::move(tasks_.front());
        tasks_.pop_front();
      }
      f();
    }
  }

  const int max_queued_;
  Mutex mu_;
  CondVar cv_{&mu_};
  std::deque<std::function<void()>> tasks_ ABSL_GUARDED_BY(mu_);
  bool stop_ ABSL_GUARDED_BY(mu_) = false;
  std::vector<std::thread> threads_;
};

}  // namespace rapidin

#endif  // RAPIDIN_BASE_THREAD_POOL_H_
