#include "query/internal/cuda_backend.h"

#include <algorithm>
#include <cstdlib>
#include <unordered_set>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "base/mutex.h"
#include "kernels/cuda/absl_status.h"
#include "kernels/cuda/scanner.h"

namespace rapidin::query::internal {
namespace {

// Pinned memory when the driver gives it, plain aligned memory otherwise; the set says which to free how.
Mutex plain_mu;
std::unordered_set<void*>* plain_blocks ABSL_PT_GUARDED_BY(plain_mu) = new std::unordered_set<void*>();

void* HostTierAlloc(size_t bytes) {
  if (void* p = gpu::PinnedAlloc(bytes)) return p;
  void* p = std::aligned_alloc(64, (bytes + 63) / 64 * 64);
  if (p != nullptr) {
    MutexLock l(&plain_mu);
    plain_blocks->insert(p);
  }
  return p;
}

void HostTierFree(void* p) {
  {
    MutexLock l(&plain_mu);
    if (plain_blocks->erase(p) > 0) {
      std::free(p);
      return;
    }
  }
  gpu::PinnedFree(p);
}

class CudaBackend : public ScanBackend {
 public:
  CudaBackend(const storage::Store* store, std::unique_ptr<gpu::Scanner> scanner,
              std::vector<std::vector<int>> shards_of_device)
      : store_(store), scanner_(std::move(scanner)), shards_of_device_(std::move(shards_of_device)) {}

  int num_workers() const override { return scanner_->num_devices(); }
  std::string Describe() const override { return scanner_->Describe(); }
  bool is_gpu() const override { return true; }
  kernels::TierBytes Usage() const override { return scanner_->Usage(); }
  absl::Status SetQueries(const ScanBatch& b) override { return gpu::ToAbsl(scanner_->SetQueries(b.queries, b.q)); }

  // One GPU: scan each shard placed on it in turn.
  absl::Status Scan(int w, const ScanBatch& b, WorkerScan* o) override {
    const gpu::DeviceInfo& dev = scanner_->device(w);
    o->timing.backend = absl::StrCat("cuda:", dev.ordinal);
    absl::Status status;
    for (int shard : shards_of_device_[w]) {
      if (!status.ok()) break;
      status = store_->WithShard(shard, [&](const storage::ShardView& v) {
        o->timing.rows += v.n;
        o->timing.bytes_scanned += static_cast<uint64_t>(v.n) * v.k * sizeof(uint16_t);
        std::vector<std::vector<kernels::Candidate>> hp, hm;
        absl::Status st =
            gpu::ToAbsl(scanner_->ScanShard(shard, v, b.max_top_k, b.max_harmful_k, &hp, &hm));
        for (int j = 0; j < b.q && st.ok(); ++j) {
          o->helpful[j].push_back(std::move(hp[j]));
          o->harmful[j].push_back(std::move(hm[j]));
        }
        return st;
      });
    }
    return status;
  }

 private:
  const storage::Store* store_;
  std::unique_ptr<gpu::Scanner> scanner_;
  std::vector<std::vector<int>> shards_of_device_;
};

}  // namespace

absl::StatusOr<std::unique_ptr<ScanBackend>> MakeCudaBackend(const storage::Store* store, const BackendOptions& o) {
  kernels::GpuOptions so = o.gpu;
  so.chunk_bytes = std::max<uint64_t>(o.gpu.chunk_bytes, uint64_t{store->k()} * 2);
  std::unique_ptr<gpu::Scanner> scanner;
  absl::Status st = gpu::ToAbsl(gpu::Scanner::Create(store->k(), so, &scanner));
  if (!st.ok()) return absl::Status(st.code(), absl::StrCat("CUDA backend: ", st.message()));
  // Place every shard by its current size, then upload the hot ones.
  std::vector<uint64_t> bytes(store->num_shards());
  for (int s = 0; s < store->num_shards(); ++s) {
    st = store->WithShard(s, [&](const storage::ShardView& v) {
      bytes[s] = static_cast<uint64_t>(v.n) * v.k * 2;
      return absl::OkStatus();
    });
    if (!st.ok()) return st;
  }
  if (!(st = gpu::ToAbsl(scanner->Place(bytes))).ok()) return st;
  std::vector<std::vector<int>> shards_of_device(scanner->num_devices());
  for (int s = 0; s < store->num_shards(); ++s) {
    shards_of_device[scanner->shard_device(s)].push_back(s);
    st = store->WithShard(s, [&](const storage::ShardView& v) { return gpu::ToAbsl(scanner->Sync(s, v)); });
    if (!st.ok()) return st;
  }
  return std::unique_ptr<ScanBackend>(new CudaBackend(store, std::move(scanner), std::move(shards_of_device)));
}

absl::Status CudaDevices(std::string* description) {
  std::vector<gpu::DeviceInfo> devs;
  const gpu::Status st = gpu::ListDevices(&devs);
  if (!st.ok()) return gpu::ToAbsl(st);
  if (description != nullptr) {
    std::vector<std::string> names;
    for (const auto& d : devs) names.push_back(absl::StrCat(d.ordinal, ": ", d.name));
    *description = absl::StrJoin(names, ", ");
  }
  return absl::OkStatus();
}

storage::internal::HostAllocator PinnedHostAllocator() { return {&HostTierAlloc, &HostTierFree}; }

}  // namespace rapidin::query::internal
