// The CPU ScanBackend and the factory: the only place in query/ that knows whether this build has CUDA.
#include "query/backend.h"

#include "absl/strings/str_cat.h"
#include "query/ivf_index.h"
#include "query/pca_index.h"

#if RAPIDIN_HAVE_CUDA
#include "query/internal/cuda_backend.h"
#endif

namespace rapidin::query {
namespace {

// One worker per store shard, the CPU kernels (each query vector keeps its own k).
class CpuBackend : public ScanBackend {
 public:
  CpuBackend(const storage::Store* store, kernels::ScoreImpl impl) : store_(store), impl_(impl) {}

  int num_workers() const override { return store_->num_shards(); }
  std::string Describe() const override { return kernels::ImplName(impl_); }
  bool is_gpu() const override { return false; }

  absl::Status Scan(int w, const ScanBatch& b, WorkerScan* o) override {
    std::vector<kernels::TopK> hp, hm;
    for (int j = 0; j < b.q; ++j) {
      hp.emplace_back(b.top_k[j], true);
      hm.emplace_back(b.harmful_k[j], false);
    }
    absl::Status st = store_->WithShard(w, [&](const storage::ShardView& v) {
      o->timing.rows = v.n;
      o->timing.bytes_scanned = static_cast<uint64_t>(v.n) * v.k * sizeof(uint16_t);
      return kernels::ScanTopK(v.rows, v.n, v.k, b.queries, b.q, v.first_index, v.index_stride, &hp, &hm, impl_);
    });
    for (int j = 0; j < b.q; ++j) {
      o->helpful[j].push_back(hp[j].Sorted());
      o->harmful[j].push_back(hm[j].Sorted());
    }
    o->timing.backend = kernels::ImplName(impl_);
    return st;
  }

 private:
  const storage::Store* store_;
  const kernels::ScoreImpl impl_;
};

}  // namespace

absl::StatusOr<std::unique_ptr<ScanBackend>> MakeScanBackend(const storage::Store* store,
                                                             const BackendOptions& options) {
  if (options.ivf != nullptr || options.pca != nullptr) {
    if (options.backend != "cpu") {
      return absl::InvalidArgumentError(
          absl::StrCat("the indexes score their candidates on the CPU; backend \"", options.backend,
                       "\" cannot serve them (use the cpu backend, or no index)"));
    }
    if (options.ivf != nullptr && options.pca != nullptr) {
      return absl::InvalidArgumentError("one index at a time: ivf or pca");
    }
    if (options.ivf != nullptr) return MakeIvfBackend(store, options.ivf, options.nprobe, options.impl);
    PcaOptions po;
    po.candidates_per_k = options.candidates_per_k;
    po.min_candidates = options.min_candidates;
    return MakePcaBackend(store, options.pca, po, options.impl);
  }
  if (options.backend == "cpu") {
    return std::unique_ptr<ScanBackend>(new CpuBackend(store, kernels::ResolveImpl(options.impl)));
  }
  if (options.backend != "cuda") {
    return absl::InvalidArgumentError(absl::StrCat("unknown backend \"", options.backend, "\" (cpu|cuda)"));
  }
#if RAPIDIN_HAVE_CUDA
  return internal::MakeCudaBackend(store, options);
#else
  return CudaBackendUsable();
#endif
}

#if RAPIDIN_HAVE_CUDA
bool CudaBackendBuilt() { return true; }
absl::Status CudaBackendUsable(std::string* description) { return internal::CudaDevices(description); }
storage::internal::HostAllocator CudaHostAllocator() { return internal::PinnedHostAllocator(); }
#else
bool CudaBackendBuilt() { return false; }
absl::Status CudaBackendUsable(std::string*) {
  return absl::UnavailableError("this build has no CUDA backend (configure with -DRAPIDIN_ENABLE_CUDA=ON)");
}
storage::internal::HostAllocator CudaHostAllocator() { return {}; }
#endif

}  // namespace rapidin::query
