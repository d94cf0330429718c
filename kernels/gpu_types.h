// Plain types shared by the GPU scanner (kernels/cuda/) and the backend seam (query/backend.h), so that neither
// copies the other's fields. No CUDA here: every build includes this header, with or without the toolkit.
// Plain values: thread-compatible.
#ifndef RAPIDIN_KERNELS_GPU_TYPES_H_
#define RAPIDIN_KERNELS_GPU_TYPES_H_

#include <cstdint>
#include <vector>

namespace rapidin::kernels {

// How the CUDA backend uses its devices.
struct GpuOptions {
  std::vector<int> devices;                     // empty: every visible device
  double memory_fraction = 0.85;                // share of a device's free memory the hot tier may take
  uint64_t hot_limit_bytes = ~uint64_t{0};      // per-device cap on the hot tier (0: stream everything)
  uint64_t chunk_bytes = uint64_t{128} << 20;   // store bytes per streamed chunk (two buffers per device)
  int64_t max_chunk_scores = int64_t{1} << 22;  // rows x query vectors per top-k pass
  bool force_nccl = false;                      // broadcast through NCCL even with one device (tests)
  bool bf16_rows = false;                       // rows are bfloat16, not fp16 (kernel tests; the store is fp16)
};

// Bytes of the store per GPU tier (zero for the CPU backend).
struct TierBytes {
  uint64_t hot = 0;   // resident in device memory
  uint64_t warm = 0;  // streamed from host memory at each scan
};

// A block of a store shard's rows in host memory, as the store lends it (storage::ShardView adds the shard number).
struct ShardRows {
  const uint16_t* rows = nullptr;   // n x k, 64-byte aligned
  int64_t n = 0;
  int64_t k = 0;
  int64_t first_index = 0;          // global index of local row r = first_index + r * index_stride
  int64_t index_stride = 1;
  uint64_t generation = 0;          // bumped by every change to the shard's rows
  uint64_t rewrite_generation = 0;  // generation of the last in-place overwrite (appends leave it)
};

}  // namespace rapidin::kernels

#endif  // RAPIDIN_KERNELS_GPU_TYPES_H_
