#include "query/query_engine.h"

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <future>

#include "absl/strings/str_cat.h"

namespace rapidin::query {

struct QueryEngine::Pending {
  std::vector<float> queries;
  int q = 0;
  int top_k = 0;
  int harmful_k = 0;
  absl::Time deadline = absl::InfiniteFuture();
  std::atomic<bool> abandoned{false};  // a blocking Search() gave up waiting: skip it
  std::function<void(absl::StatusOr<SearchResult>)> done;
};

namespace {

// The CPU backend cannot fail.
std::unique_ptr<ScanBackend> CpuBackendOf(const storage::Store* store, BackendOptions o) {
  o.backend = "cpu";
  return std::move(*MakeScanBackend(store, o));
}

}  // namespace

QueryEngine::QueryEngine(const storage::Store* store, Options options)
    : QueryEngine(store, options, CpuBackendOf(store, options)) {}

QueryEngine::QueryEngine(const storage::Store* store, Options options, std::unique_ptr<ScanBackend> backend)
    : store_(store), options_(std::move(options)), backend_(std::move(backend)) {
  options_.impl = kernels::ResolveImpl(options_.impl);
  // One thread per worker, its tasks run in order (Schedule only: the bound applies to TrySchedule).
  for (int w = 0; w < backend_->num_workers(); ++w) workers_.push_back(std::make_unique<ThreadPool>(1, 1));
  dispatcher_ = std::thread([this] { DispatchLoop(); });
}

absl::StatusOr<std::unique_ptr<QueryEngine>> QueryEngine::Create(const storage::Store* store, Options options) {
  auto backend = MakeScanBackend(store, options);
  if (!backend.ok()) return backend.status();
  return std::unique_ptr<QueryEngine>(new QueryEngine(store, std::move(options), std::move(*backend)));
}

std::string QueryEngine::backend() const { return backend_->Describe(); }

kernels::TierBytes QueryEngine::GpuUsage() const { return backend_->Usage(); }

QueryEngine::~QueryEngine() {
  {
    MutexLock l(&mu_);
    stopping_ = true;
    cv_.SignalAll();
  }
  dispatcher_.join();
  std::deque<std::shared_ptr<Pending>> left;
  {
    MutexLock l(&mu_);
    left.swap(queue_);
  }
  for (auto& p : left) p->done(absl::CancelledError("server is shutting down"));
  workers_.clear();
}

absl::StatusOr<SearchResult> QueryEngine::Search(std::vector<float> queries, int q, int top_k, int harmful_k,
                                                 absl::Time deadline) {
  auto promise = std::make_shared<std::promise<absl::StatusOr<SearchResult>>>();
  auto fut = promise->get_future();
  std::shared_ptr<Pending> p = Enqueue(std::move(queries), q, top_k, harmful_k, deadline,
                                       [promise](absl::StatusOr<SearchResult> r) { promise->set_value(std::move(r)); });
  if (p != nullptr && deadline != absl::InfiniteFuture()) {
    if (fut.wait_until(absl::ToChronoTime(deadline)) != std::future_status::ready) {
      p->abandoned = true;  // the dispatcher skips it if it has not started yet
      return absl::DeadlineExceededError("deadline exceeded while waiting for the scan");
    }
  }
  return fut.get();
}

void QueryEngine::SearchAsync(std::vector<float> queries, int q, int top_k, int harmful_k, absl::Time deadline,
                              std::function<void(absl::StatusOr<SearchResult>)> done) {
  Enqueue(std::move(queries), q, top_k, harmful_k, deadline, std::move(done));
}

std::shared_ptr<QueryEngine::Pending> QueryEngine::Enqueue(std::vector<float> queries, int q, int top_k,
                                                           int harmful_k, absl::Time deadline,
                                                           std::function<void(absl::StatusOr<SearchResult>)> done) {
  auto p = std::make_shared<Pending>();
  p->queries = std::move(queries);
  p->q = q;
  p->top_k = top_k;
  p->harmful_k = harmful_k;
  p->deadline = deadline;
  p->done = std::move(done);
  {
    MutexLock l(&mu_);
    if (!stopping_) {
      queue_.push_back(p);
      cv_.Signal();
      return p;
    }
  }
  p->done(absl::CancelledError("server is shutting down"));
  return nullptr;
}

void QueryEngine::DispatchLoop() {
  for (;;) {
    std::vector<std::shared_ptr<Pending>> batch, expired;
    {
      MutexLock l(&mu_);
      while (!stopping_ && queue_.empty()) cv_.Wait();
      if (stopping_) return;
      const absl::Time now = absl::Now();
      int vectors = 0;
      while (!queue_.empty()) {
        auto& p = queue_.front();
        if (p->abandoned) {
          queue_.pop_front();
          continue;
        }
        if (p->deadline <= now) {  // an asynchronous caller's deadline passed while it waited: answer, do not scan
          expired.push_back(std::move(p));
          queue_.pop_front();
          continue;
        }
        if (!batch.empty() && vectors + p->q > options_.max_batch_vectors) break;
        vectors += p->q;
        batch.push_back(std::move(p));
        queue_.pop_front();
      }
    }
    for (auto& p : expired) p->done(absl::DeadlineExceededError("deadline exceeded while waiting for the scan"));
    if (!batch.empty()) RunBatch(batch);
  }
}

// Per worker: for each query vector of the batch, candidate lists (several per vector when a GPU worker scans
// several shards, plus its cold-tier chunks), merged by the same code for every backend.
struct QueryEngine::WorkerResult {
  WorkerScan scan;
  absl::Status status;
};

// Step 1: every request's vectors stacked into one matrix, so each shard reads its rows once for all of them.
// Each vector keeps its request's k; the largest k of the batch bounds what the GPU and cold scans keep.
ScanBatch QueryEngine::Stack(const std::vector<std::shared_ptr<Pending>>& batch, std::vector<float>* all) const {
  ScanBatch sb;
  for (const auto& p : batch) {
    all->insert(all->end(), p->queries.begin(), p->queries.end());
    sb.q += p->q;
    for (int j = 0; j < p->q; ++j) {
      sb.top_k.push_back(p->top_k);
      sb.harmful_k.push_back(p->harmful_k);
    }
    sb.max_top_k = std::max(sb.max_top_k, p->top_k);
    sb.max_harmful_k = std::max(sb.max_harmful_k, p->harmful_k);
  }
  sb.queries = all->data();
  return sb;
}

// Step 2b: cold rows (not resident in host memory), the range as of now, read in chunks dealt round-robin to the
// workers after their resident rows, and scored on the CPU for every backend.
void QueryEngine::ScanCold(int w, const ScanBatch& sb, std::pair<uint64_t, uint64_t> cold, WorkerResult* o) const {
  const int64_t k = store_->k();
  const int S = static_cast<int>(workers_.size());
  const auto [cold_begin, cold_end] = cold;
  const int64_t chunk_rows = std::max<int64_t>(1, static_cast<int64_t>(options_.cold_chunk_bytes / (k * 2)));
  const int64_t cold_chunks = static_cast<int64_t>((cold_end - cold_begin + chunk_rows - 1) / chunk_rows);
  if (w >= cold_chunks) return;
  std::vector<kernels::TopK> hp, hm;
  for (int j = 0; j < sb.q; ++j) {
    hp.emplace_back(sb.max_top_k, true);
    hm.emplace_back(sb.max_harmful_k, false);
  }
  storage::internal::AlignedRows buf(k);
  for (int64_t c = w; c < cold_chunks && o->status.ok(); c += S) {
    const uint64_t begin = cold_begin + static_cast<uint64_t>(c * chunk_rows);
    const int64_t n = static_cast<int64_t>(std::min<uint64_t>(chunk_rows, cold_end - begin));
    o->status = store_->ReadRows(begin, n, &buf);
    if (!o->status.ok()) break;
    o->status = kernels::ScanTopK(buf.data(), n, k, sb.queries, sb.q, static_cast<int64_t>(begin), 1, &hp, &hm,
                                  options_.impl);
    o->scan.timing.rows += n;
    o->scan.timing.cold_rows += n;
    o->scan.timing.bytes_scanned += static_cast<uint64_t>(n) * k * sizeof(uint16_t);
  }
  for (int j = 0; j < sb.q && o->status.ok(); ++j) {
    o->scan.helpful[j].push_back(hp[j].Sorted());
    o->scan.harmful[j].push_back(hm[j].Sorted());
  }
}

// Step 2: every worker scans its resident rows through the backend, then its share of the cold chunks; waits for
// all. Returns the first error.
absl::Status QueryEngine::ScanAll(const ScanBatch& sb, std::vector<WorkerResult>* outs) {
  absl::Status setup = backend_->SetQueries(sb);
  if (!setup.ok()) return setup;
  const auto cold = store_->ColdRange();
  const int S = static_cast<int>(workers_.size());
  outs->resize(S);
  BlockingCounter remaining(S);
  for (int s = 0; s < S; ++s) {
    workers_[s]->Schedule([&, s] {
      WorkerResult& o = (*outs)[s];
      const auto t0 = std::chrono::steady_clock::now();
      o.scan.helpful.resize(sb.q);
      o.scan.harmful.resize(sb.q);
      o.scan.timing.shard = s;
      o.status = backend_->Scan(s, sb, &o.scan);
      if (o.status.ok()) ScanCold(s, sb, cold, &o);
      o.scan.timing.scan_ms =
          std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
      remaining.DecrementCount();
    });
  }
  remaining.Wait();
  for (const auto& o : *outs) {
    if (!o.status.ok()) return o.status;
  }
  return absl::OkStatus();
}

// Step 3: per query vector, the global top-k of the workers' lists, with each request's own k; every request of
// the batch gets its answer (or the batch's error).
void QueryEngine::Merge(std::vector<std::shared_ptr<Pending>>& batch, const std::vector<WorkerResult>& outs,
                        const absl::Status& status, int total_q) {
  std::vector<ShardTiming> timings;
  for (const auto& o : outs) timings.push_back(o.scan.timing);
  int base = 0;
  for (auto& p : batch) {
    if (!status.ok()) {
      p->done(status);
      continue;
    }
    SearchResult r;
    r.shard_timings = timings;
    r.vectors_in_scan = total_q;
    for (int j = 0; j < p->q; ++j) {
      std::vector<std::vector<kernels::Candidate>> hp, hm;
      for (const auto& o : outs) {
        for (const auto& c : o.scan.helpful[base + j]) hp.push_back(c);
        for (const auto& c : o.scan.harmful[base + j]) hm.push_back(c);
      }
      r.helpful.push_back(kernels::MergeTopK(hp, p->top_k, true));
      r.harmful.push_back(kernels::MergeTopK(hm, p->harmful_k, false));
    }
    base += p->q;
    p->done(std::move(r));
  }
}

void QueryEngine::RunBatch(std::vector<std::shared_ptr<Pending>>& batch) {
  std::vector<float> all;
  const ScanBatch sb = Stack(batch, &all);
  std::vector<WorkerResult> outs;
  const absl::Status status = ScanAll(sb, &outs);
  Merge(batch, outs, status, sb.q);
}

}  // namespace rapidin::query
