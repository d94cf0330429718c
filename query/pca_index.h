// The PCA index (`rapidin-server --index pca`): a short code per row scanned in full, then the best candidates at
// both ends re-scored exactly from the store. FAISS terms: "PCA<dim>,Flat" refined by the exact rows.
//
// Build: FAISS PCA (faiss::PCAMatrix, inside a subspace found by randomised subspace iteration) on a sample of
// the rows gives the top `dim` principal directions of the centred rows; every row's code is its projection,
// A (x - mean), quantised to int8 per direction (dim bytes a row: 256 at dim 256 against 8 KB for K = 4096; fp16
// codes, measured first, gave the same recall for twice the bytes: 8.6x instead of 19.5x at 1M rows).
// Query: q' = A q; since q.x = q.mean + q.(x - mean) and q.mean is the same for every row, q'.code ranks rows
// nearly as q.x does. The codes' scan reads 1/32 of the store's bytes at dim 256, keeps `candidates` rows per
// end, and those rows are scored exactly. Every returned score is exact; a row is missed only if the codes rank
// it below the candidates (recall: bench/ann_bench).
// Why this and not only IVF: gradients are not clustered enough for IVF's lists (bench/results/ann.md), while
// their spectrum decays (the top 256 of 4096 directions of the demo's gradients carry half the energy).
//
// Persistence, staleness and updates as for the IVF index (ivf_index.h): <store>/rapidin-pca.bin holds the
// projection, the codes and the store's write sequence, behind a checksum; a stale file is reprojected, a damaged
// or foreign one rebuilt; ApplyIngest/ApplyDelete keep the codes in step with writes made through the server.
//
// Thread-safety: ScanCodes may run concurrently with each other and with Apply*/Reproject (a reader/writer lock).
#ifndef RAPIDIN_QUERY_PCA_INDEX_H_
#define RAPIDIN_QUERY_PCA_INDEX_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "base/mutex.h"
#include "kernels/topk.h"
#include "query/backend.h"
#include "storage/internal/host_shard.h"
#include "storage/store.h"

namespace faiss {
struct LinearTransform;
}

namespace rapidin::query {

struct PcaOptions {
  int dim = 256;                   // code length (principal directions kept); at most K
  // Rows re-scored exactly per end and scan worker: max(min_candidates, candidates_per_k * k) for a k of top_k
  // or harmful_k.
  int candidates_per_k = 10;
  int min_candidates = 1024;  // recall@10 0.967 at 1M rows of real-derived data (bench/results/ann.md)
  int64_t max_train_points = 0;    // rows sampled for the PCA; 0: min(rows, max(16384, 4 * dim))
  uint64_t seed = 1234;
  // Long work reports here: stage "sample" | "train" | "project".
  std::function<void(const char* stage, uint64_t done, uint64_t total)> progress;
};

class PcaIndex {
 public:
  ~PcaIndex();
  PcaIndex(const PcaIndex&) = delete;
  PcaIndex& operator=(const PcaIndex&) = delete;

  static std::string DefaultPath(const std::string& store_path);  // <store>/rapidin-pca.bin

  // Errors: FAILED_PRECONDITION (no live rows, dim outside [1, K]), INTERNAL (FAISS), the store's read errors.
  static absl::StatusOr<std::unique_ptr<PcaIndex>> Build(const storage::Store& store, const PcaOptions& options);
  // Errors: NOT_FOUND, DATA_LOSS (naming what is wrong), FAILED_PRECONDITION (another K or projection state). A
  // file older than the store loads with stale() true.
  static absl::StatusOr<std::unique_ptr<PcaIndex>> Load(const std::string& path, const storage::Store& store);
  // Load, Reproject when stale, Build when missing, damaged, foreign, of another dim, or rebuild; Save if changed.
  static absl::StatusOr<std::unique_ptr<PcaIndex>> Open(const storage::Store& store, const PcaOptions& options,
                                                        bool rebuild, std::string* how);
  absl::Status Save(const std::string& path) const;
  // Computes every row's code again with the current projection.
  absl::Status Reproject(const storage::Store& store, const PcaOptions& options);
  void ApplyIngest(const storage::IngestResult& result, const std::vector<storage::IngestItem>& items);
  void ApplyDelete(const storage::DeleteResult& result);

  // out (dim floats) = A q for one query vector q (k floats).
  void Project(const float* q, float* out) const;
  // Scores the codes of rows [begin, end) (clipped to code_rows()) against q projected query vectors (q x dim),
  // pushing each row's approximate score into (*helpful)[j] and (*harmful)[j].
  absl::Status ScanCodes(uint64_t begin, uint64_t end, const float* projected, int q,
                         std::vector<kernels::TopK>* helpful, std::vector<kernels::TopK>* harmful) const;

  int dim() const { return dim_; }
  const std::vector<float>& scale() const { return scale_; }  // a code unit, per direction
  int64_t k() const { return k_; }
  uint64_t code_rows() const;     // rows with a code (deleted ones included, as NaN codes)
  uint64_t rows() const;          // live rows with a code
  uint64_t sequence() const;
  bool stale() const;
  std::string Describe() const;   // "pca dim=D"

 private:
  PcaIndex(int64_t k, int dim, std::vector<float> a, std::vector<float> b, std::vector<float> scale,
           std::string projection_id);
  // int8 codes of n float rows, each in pitch16_ uint16 words; a deleted row's code starts with -128.
  void Encode(const float* rows, int64_t n, uint16_t* codes) const;
  void SetCode(uint64_t row, const uint16_t* code) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  const int8_t* CodeRow(int64_t r) const ABSL_SHARED_LOCKS_REQUIRED(mu_) {
    return reinterpret_cast<const int8_t*>(codes_.row(r));
  }
  bool Live(int64_t r) const ABSL_SHARED_LOCKS_REQUIRED(mu_);

  const int64_t k_;
  const int dim_;
  const int pitch16_;              // a code row's length in the uint16 words of codes_
  const std::vector<float> a_;     // dim x k, row-major: the principal directions
  const std::vector<float> b_;     // dim: -A mean
  const std::vector<float> scale_;  // dim: code = round(A (x - mean) / scale), clamped to [-127, 127]
  const std::string projection_id_;
  // x -> A x + b as one sgemm, built once (A is dim x K floats: 4 MB at 256 x 4096, too much to copy per block).
  std::unique_ptr<faiss::LinearTransform> transform_;
  mutable SharedMutex mu_;
  storage::internal::AlignedRows codes_ ABSL_GUARDED_BY(mu_);  // row g's int8 code at position g
  uint64_t live_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t sequence_ ABSL_GUARDED_BY(mu_) = 0;
  bool stale_ ABSL_GUARDED_BY(mu_) = false;
};

// The ScanBackend of `--index pca`: worker w scans its share of the codes, then re-scores its candidates exactly
// from the store's shards. index and store must outlive it.
std::unique_ptr<ScanBackend> MakePcaBackend(const storage::Store* store, const PcaIndex* index,
                                            const PcaOptions& options, kernels::ScoreImpl impl);

}  // namespace rapidin::query

#endif  // RAPIDIN_QUERY_PCA_INDEX_H_
