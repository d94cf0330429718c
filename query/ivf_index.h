// The IVF index: an optional way to answer a query without reading every row, for stores too large to scan at
// interactive speed (`rapidin-server --index ivf`). The exact scan stays the default and the reference.
//
// Build: FAISS k-means (spherical: rows are layer-wise normalised gradients, so their norms are nearly equal and
// the inner product ranks like the cosine) on a sample of the rows gives `nlist` centroids; every row is assigned
// to the centroid with the largest inner product (faiss::IndexFlatIP). The lists hold row numbers only: the rows
// themselves stay in the store.
// Query: the `nprobe` lists whose centroids score highest (for the helpful end) and the `nprobe` that score lowest
// (for the harmful end) give the candidate rows, which are scored *exactly* from the store by the scan kernel and
// ranked with the same top-k as the full scan. So every returned score is exact; what the index can miss is a
// row outside the probed lists (recall, measured by bench/ann_bench).
//
// Persistence: Save writes <store>/rapidin-ivf.bin (centroids, each row's list, the store's K, projection state and
// write sequence, a checksum) through a temporary file and a rename. Open loads it and checks it against the
// store: a store written since (another process ingested or deleted) gets its rows reassigned to the saved
// centroids; a missing, damaged or foreign file is rebuilt. The index is derived data: losing it loses nothing.
//
// Thread-safety: Candidates may run concurrently with each other and with Apply*/Reassign (a reader/writer lock).
#ifndef RAPIDIN_QUERY_IVF_INDEX_H_
#define RAPIDIN_QUERY_IVF_INDEX_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "base/mutex.h"
#include "query/backend.h"
#include "storage/store.h"

namespace faiss {
struct IndexFlatIP;
}

namespace rapidin::query {

struct IvfOptions {
  int nlist = 0;                   // lists (centroids); 0: about sqrt(rows), at least 1
  int nprobe = 0;                  // lists probed at each end; 0: the default, max(1, nlist / 16)
  int train_iterations = 10;       // k-means iterations
  int64_t max_train_points = 0;    // rows sampled for k-means; 0: min(rows, 64 * nlist, 1 GiB of fp32)
  uint64_t seed = 1234;            // the sample and k-means start
  // Long work (training, assigning every row) reports here: stage "sample" | "train" | "assign".
  std::function<void(const char* stage, uint64_t done, uint64_t total)> progress;
};

class IvfIndex {
 public:
  ~IvfIndex();
  IvfIndex(const IvfIndex&) = delete;
  IvfIndex& operator=(const IvfIndex&) = delete;

  // Where Open and Save keep the index of the store at store_path.
  static std::string DefaultPath(const std::string& store_path);

  // Trains centroids on a sample of the store's rows and assigns every row. Deleted rows are left out.
  // Errors: FAILED_PRECONDITION (no live rows, or more than 2^32 rows), INTERNAL (FAISS), the store's read errors.
  static absl::StatusOr<std::unique_ptr<IvfIndex>> Build(const storage::Store& store, const IvfOptions& options);

  // Reads an index file. Errors: NOT_FOUND (no file), DATA_LOSS (truncated or damaged: it names what),
  // FAILED_PRECONDITION (made for a store of another K or projection state). A file older than the store (its
  // write sequence differs) loads with stale() true.
  static absl::StatusOr<std::unique_ptr<IvfIndex>> Load(const std::string& path, const storage::Store& store);

  // The server's start-up: Load the default file; if it is stale, Reassign; if it is missing, damaged or foreign
  // (or rebuild is set, or options.nlist asks for another list count), Build; then Save when anything changed.
  // *how says which, in words, for the log.
  static absl::StatusOr<std::unique_ptr<IvfIndex>> Open(const storage::Store& store, const IvfOptions& options,
                                                        bool rebuild, std::string* how);

  // Writes the index atomically (temporary file, fsync, rename). Errors: the file system's, as INTERNAL.
  absl::Status Save(const std::string& path) const;

  // Assigns every row of the store again to the current centroids (after writes this index did not see).
  absl::Status Reassign(const storage::Store& store, const IvfOptions& options);

  // Keeps the lists in step with a store write made through the server: rows written by an ingest batch are
  // (re)assigned from the batch's vectors; deleted rows leave their lists. result.sequence becomes sequence().
  void ApplyIngest(const storage::IngestResult& result, const std::vector<storage::IngestItem>& items);
  void ApplyDelete(const storage::DeleteResult& result);

  // The candidate rows for one query vector (k() floats): the rows of the nprobe lists with the highest centroid
  // scores and of the nprobe lists with the lowest, distinct and in increasing order.
  std::vector<uint64_t> Candidates(const float* query, int nprobe) const;

  int nlist() const { return nlist_; }
  int64_t k() const { return k_; }
  int default_nprobe() const { return nprobe_; }
  uint64_t rows() const;          // rows assigned to a list
  uint64_t sequence() const;      // the store write sequence this index reflects
  bool stale() const;             // Load found the store written since the file was saved
  std::string Describe() const;   // "ivf nlist=N nprobe=P"

 private:
  IvfIndex(int64_t k, int nlist, std::vector<float> mean, std::vector<float> centroids, std::string projection_id);
  // Assigns n fp16 rows (row-major) to lists; -1 for deleted (NaN) rows.
  void AssignF16(const uint16_t* rows, int64_t n, int32_t* out) const;
  // The same for n float rows, which it centres in place (the callers' own buffers: no copy per block).
  void AssignCentred(float* rows, int64_t n, int32_t* out) const;
  void SetList(uint64_t row, int32_t list) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const int64_t k_;
  const int nlist_;
  int nprobe_ = 1;
  const std::vector<float> mean_;                 // k: the sample's mean, taken off every row before assignment
  const std::vector<float> centroids_;            // nlist x k, unit norm, of the centred rows
  std::vector<uint16_t> centroids_f16_;           // the same in fp16, for the probe's scan kernel
  const std::string projection_id_;
  std::unique_ptr<faiss::IndexFlatIP> quantizer_;  // assignment
  mutable SharedMutex mu_;
  std::vector<int32_t> assign_ ABSL_GUARDED_BY(mu_);            // row -> list, -1 for none
  std::vector<std::vector<uint32_t>> lists_ ABSL_GUARDED_BY(mu_);
  uint64_t sequence_ ABSL_GUARDED_BY(mu_) = 0;
  bool stale_ ABSL_GUARDED_BY(mu_) = false;
};

// The ScanBackend of `--index ivf`: one worker per store shard, each scoring exactly (CPU kernels) its shard's
// share of every query vector's candidate rows. index and store must outlive it.
std::unique_ptr<ScanBackend> MakeIvfBackend(const storage::Store* store, const IvfIndex* index, int nprobe,
                                            kernels::ScoreImpl impl);

}  // namespace rapidin::query

#endif  // RAPIDIN_QUERY_IVF_INDEX_H_
