// The backend seam (Faiss-style): a ScanBackend scores the store's resident rows for a batch of query vectors,
// one worker at a time; the query engine drives every backend the same way (batching, cold-tier chunks, merge).
// "cpu": one worker per store shard, the CPU kernels. "cuda": one worker per GPU, each scanning the shards placed
// on it (hot in device memory, or warm: streamed from host memory). MakeScanBackend, in backend.cc, is the one
// place that knows whether this build has CUDA.
#ifndef RAPIDIN_QUERY_BACKEND_H_
#define RAPIDIN_QUERY_BACKEND_H_

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "kernels/gpu_types.h"
#include "kernels/score.h"
#include "kernels/topk.h"
#include "storage/store.h"

namespace rapidin::query {

class IvfIndex;
class PcaIndex;

struct ShardTiming {
  int shard = 0;
  std::string backend;
  int64_t rows = 0;
  double scan_ms = 0;
  uint64_t bytes_scanned = 0;
  int64_t cold_rows = 0;             // of `rows`, read from the cold tier (disk) for this scan
};

// One scan's query vectors: q rows of store->k() floats, each with its own k at both ends.
struct ScanBatch {
  const float* queries = nullptr;
  int q = 0;
  std::vector<int> top_k, harmful_k;  // per query vector
  int max_top_k = 0, max_harmful_k = 0;
};

// What one worker found: per query vector, one or more candidate lists (best first), merged by the engine.
struct WorkerScan {
  std::vector<std::vector<std::vector<kernels::Candidate>>> helpful, harmful;
  ShardTiming timing;
};

// Thread-safety: SetQueries runs alone, before the batch's Scan calls; Scan(w, ...) runs on worker w's thread,
// concurrently with the other workers' calls.
class ScanBackend {
 public:
  virtual ~ScanBackend() = default;
  virtual int num_workers() const = 0;
  virtual std::string Describe() const = 0;  // e.g. the CPU kernels' name, or the GPUs
  virtual bool is_gpu() const = 0;
  virtual kernels::TierBytes Usage() const { return {}; }  // zeros for the CPU backend
  virtual absl::Status SetQueries(const ScanBatch& batch) { return absl::OkStatus(); }
  // Worker w's resident rows against every query vector of batch; out->helpful/harmful have batch.q entries.
  virtual absl::Status Scan(int w, const ScanBatch& batch, WorkerScan* out) = 0;
};

struct BackendOptions {
  std::string backend = "cpu";  // "cpu" | "cuda"
  kernels::ScoreImpl impl = kernels::ScoreImpl::kAuto;
  kernels::GpuOptions gpu;     // "cuda" only
  // With an index (query/ivf_index.h), only its candidate rows are scored (exactly); "cpu" only. Must outlive the
  // backend. nprobe 0: the index's default.
  const IvfIndex* ivf = nullptr;
  int nprobe = 0;
  // Or with the PCA index (query/pca_index.h): codes scanned, then max(min_candidates, candidates_per_k * k)
  // rows per end and worker scored exactly; "cpu" only.
  const PcaIndex* pca = nullptr;
  int candidates_per_k = 10;
  int min_candidates = 1024;
};

// store must outlive the backend. For "cuda", places the shards on the GPUs and uploads the hot ones.
// Errors: INVALID_ARGUMENT (unknown backend, or an index with "cuda"), UNAVAILABLE (no usable GPU, or a build
// without CUDA), GPU errors.
absl::StatusOr<std::unique_ptr<ScanBackend>> MakeScanBackend(const storage::Store* store,
                                                             const BackendOptions& options);

// True when this build has the CUDA backend (RAPIDIN_ENABLE_CUDA).
bool CudaBackendBuilt();
// Usable GPUs for the CUDA backend; UNAVAILABLE with the driver's reason when there are none.
absl::Status CudaBackendUsable(std::string* description = nullptr);
// Host-tier allocator for the CUDA backend: page-locked memory when it can be had (falls back to plain memory).
storage::internal::HostAllocator CudaHostAllocator();

}  // namespace rapidin::query

#endif  // RAPIDIN_QUERY_BACKEND_H_
