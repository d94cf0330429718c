// Device launchers for scoring, top-k and the RapidGrad sketch.
//
// CUB-style: the caller owns every buffer (including scratch, sized by a first call with scratch == nullptr),
// every launch takes an explicit stream and is asynchronous, and errors come back as cudaError_t (launch
// configuration errors included); nothing here allocates, synchronises or aborts. Thread-safe: launches from
// several threads are ordered only by the streams they are given.
// Layouts: a store is n rows of k 16-bit values (row-major); queries are q rows of k floats; scores are
// query-major, scores[j * n + r].
#ifndef RAPIDIN_KERNELS_CUDA_LAUNCH_H_
#define RAPIDIN_KERNELS_CUDA_LAUNCH_H_

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace rapidin::gpu {

enum class StoreType { kF16, kBF16 };

// scores[j * n + r] = sum_c float(store[r * k + c]) * queries[j * k + c], fp32 accumulation.
// Any q >= 1 (tiles of up to 8 query vectors share one read of the store).
cudaError_t LaunchScore(StoreType type, const void* store, int64_t n, int64_t k, const float* queries, int q,
                        float* scores, cudaStream_t stream);

// Per query j: the top `k` rows of scores[j * n .. j * n + n), best first, ties to the smaller row, NaN never
// ranked before a number. largest = true keeps the highest scores. Writes out_key[j * k + i] (the score as an
// order-preserving key, see KeyToScore) and out_row[j * k + i] for i < min(k, n); entries past the last
// non-NaN score hold NaN keys. n * q must be below 2^31.
// Scratch: call with scratch == nullptr to get *scratch_bytes for (n, q); then pass a buffer of that size.
cudaError_t LaunchTopK(void* scratch, size_t* scratch_bytes, const float* scores, int64_t n, int q, int k,
                       bool largest, uint32_t* out_key, uint32_t* out_row, cudaStream_t stream);

// Order-preserving map between floats and unsigned keys, used by LaunchTopK's output.
inline bool KeyIsNaN(uint32_t key) { return key == 0u || key == 0xffffffffu; }
inline float KeyToScore(uint32_t key) {
  const uint32_t bits = (key & 0x80000000u) ? (key ^ 0x80000000u) : ~key;
  float f;
  __builtin_memcpy(&f, &bits, sizeof f);
  return f;
}

// RapidGrad on the device: out[b * k + bin] = sum over the bin's entries e (in order) of +/- x[b * d + (e >> 1)]
// (negative when e & 1), for b < batch. `entries` is bin_size x k, entry t of bin `bin` at entries[t * k + bin]
// (coalesced), 0xffffffff for padding. The order of each bin's entries is the CPU's summation order, so the
// result is bitwise equal to RapidGrad::Apply.
cudaError_t LaunchSketch(const uint32_t* entries, int64_t bin_size, int64_t k, const float* x, int64_t d,
                         int batch, float* out, cudaStream_t stream);

}  // namespace rapidin::gpu

#endif  // RAPIDIN_KERNELS_CUDA_LAUNCH_H_
