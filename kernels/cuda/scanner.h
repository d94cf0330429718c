// The GPU side of the scan: device tiers for the store and top-k scans of shards on their devices.
//
// Start here for the GPU backend. A Scanner owns one set of streams and buffers per device. Each host shard is
// placed on one device (largest shards first, on the device with the most free memory left):
//   hot   the shard's rows live in device memory (kept in sync with the host shard by generation numbers);
//   warm  the rows stay in host memory (pinned when the store was opened with PinnedAlloc) and each scan
//         streams them through two device buffers, the copy of chunk c+1 overlapping the scoring of chunk c.
// Query vectors reach every device once per batch (an NCCL broadcast from device 0 when there are several).
// Results are per-query top-k candidates with global indices, merged with kernels::MergeTopK, as on the CPU.
//
// Thread-safety: ScanShard / Sync for shards on different devices may run concurrently (one worker per device);
// calls for the same device are serialised. SetQueries must not overlap a scan.
#ifndef RAPIDIN_KERNELS_CUDA_SCANNER_H_
#define RAPIDIN_KERNELS_CUDA_SCANNER_H_

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "kernels/cuda/launch.h"
#include "kernels/cuda/status.h"
#include "kernels/gpu_types.h"
#include "kernels/topk.h"

namespace rapidin::gpu {

struct DeviceInfo {
  int ordinal = 0;
  std::string name;
  uint64_t free_bytes = 0;
  uint64_t total_bytes = 0;
  int sm_count = 0;
};

// Usable devices. kUnavailable, with the runtime's reason, when there is no driver or no device.
Status ListDevices(std::vector<DeviceInfo>* out);

// Page-locked host memory for the warm tier; nullptr when it cannot be had (callers fall back to malloc).
void* PinnedAlloc(size_t bytes);
void PinnedFree(void* p);

// True when this build can broadcast with NCCL.
bool HaveNccl();

class Scanner {
 public:
  // Errors: kUnavailable (no usable device), kInvalidArgument (k < 1, unknown device), NCCL failures.
  static Status Create(int64_t k, const kernels::GpuOptions& options, std::unique_ptr<Scanner>* out);
  ~Scanner();
  Scanner(const Scanner&) = delete;
  Scanner& operator=(const Scanner&) = delete;

  // Places shards by their expected size in bytes (replaces any earlier placement).
  Status Place(const std::vector<uint64_t>& shard_bytes);
  // rows.k must be the scanner's k (kInvalidArgument otherwise), here and in ScanShard.
  // Brings a hot shard's device copy up to date (uploads appended rows, or all rows after an overwrite).
  // A hot shard that has outgrown its device memory becomes warm. No-op for warm shards.
  Status Sync(int shard, const kernels::ShardRows& rows);
  // Copies q query vectors (q x k floats, host memory) to every device.
  Status SetQueries(const float* queries, int q);
  // Scans one shard on its device against the last queries: per query vector, the shard's best top_k
  // (highest scores) and harmful_k (lowest), best first, with global indices. Syncs hot shards first.
  Status ScanShard(int shard, const kernels::ShardRows& rows, int top_k, int harmful_k,
                   std::vector<std::vector<kernels::Candidate>>* helpful,
                   std::vector<std::vector<kernels::Candidate>>* harmful);

  int num_devices() const;
  const DeviceInfo& device(int i) const;
  int shard_device(int shard) const;   // index into the scanner's devices
  bool shard_hot(int shard) const;
  kernels::TierBytes Usage() const;
  bool uses_nccl() const;
  std::string Describe() const;        // e.g. "cuda x1 (NVIDIA H100 80GB HBM3)"

 private:
  struct Impl;
  explicit Scanner(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace rapidin::gpu

#endif  // RAPIDIN_KERNELS_CUDA_SCANNER_H_
