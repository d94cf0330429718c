// base/: the handler pool's admission bound and its shutdown.
#include "base/thread_pool.h"

#include <gtest/gtest.h>

#include <atomic>

#include "base/mutex.h"

namespace rapidin {
namespace {

TEST(ThreadPool, RefusesNewWorkBeyondItsQueueButNeverAContinuation) {
  std::atomic<int> ran{0};
  BlockingCounter started(1), release(1);
  {
    ThreadPool pool(1, 2);
    ASSERT_TRUE(pool.TrySchedule([&] {  // holds the only thread
      started.DecrementCount();
      release.Wait();
      ++ran;
    }));
    started.Wait();
    EXPECT_TRUE(pool.TrySchedule([&] { ++ran; }));
    EXPECT_TRUE(pool.TrySchedule([&] { ++ran; }));
    EXPECT_FALSE(pool.TrySchedule([&] { ran += 100; }));  // two wait already: refused, never run
    pool.Schedule([&] { ++ran; });                         // a continuation: queued anyway
    release.DecrementCount();
  }  // the destructor runs what is queued, then joins
  EXPECT_EQ(ran.load(), 4);
}

TEST(ThreadPool, ManyThreadsRunEveryTaskOnce) {
  std::atomic<int> sum{0};
  {
    ThreadPool pool(4, 100000);
    for (int i = 1; i <= 1000; ++i) ASSERT_TRUE(pool.TrySchedule([&sum, i] { sum += i; }));
  }
  EXPECT_EQ(sum.load(), 1000 * 1001 / 2);
}

}  // namespace
}  // namespace rapidin
