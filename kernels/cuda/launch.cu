// Device kernels behind launch.h.
#include "kernels/cuda/launch.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cub/block/block_radix_sort.cuh>
#include <cub/device/device_segmented_radix_sort.cuh>

namespace rapidin::gpu {
namespace {

constexpr int kThreads = 256;

struct F16 {
  __device__ static float One(uint16_t raw) { return __half2float(__ushort_as_half(raw)); }
  __device__ static void Eight(const uint4& u, float* f) {
    const __half2* h = reinterpret_cast<const __half2*>(&u);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 v = __half22float2(h[i]);
      f[2 * i] = v.x;
      f[2 * i + 1] = v.y;
    }
  }
};

struct BF16 {
  __device__ static float One(uint16_t raw) { return __uint_as_float(static_cast<uint32_t>(raw) << 16); }
  __device__ static void Eight(const uint4& u, float* f) {
    const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      f[2 * i] = __uint_as_float(w[i] << 16);
      f[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    }
  }
};

__device__ __forceinline__ float WarpSum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// One warp scores R consecutive rows against QT query vectors: each lane reads 16 bytes of every row per step
// (streaming loads: the store is read once), the query values it needs once for all R rows.
template <typename Conv, int QT, int R>
__global__ void __launch_bounds__(kThreads, QT >= 8 ? 2 : 1) ScoreVec(const uint16_t* __restrict__ store, int64_t n, int64_t k,
                                                     const float* __restrict__ queries,
                                                     float* __restrict__ scores) {
  const int lane = threadIdx.x & 31;
  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) >> 5;
  const int64_t nwarps = (static_cast<int64_t>(gridDim.x) * kThreads) >> 5;
  const int64_t chunks = k >> 3;
  const int64_t groups = (n + R - 1) / R;
  for (int64_t g = warp; g < groups; g += nwarps) {
    const int64_t r0 = g * R;
    const uint4* rows[R];
#pragma unroll
    for (int i = 0; i < R; ++i) {
      rows[i] = reinterpret_cast<const uint4*>(store + min(r0 + i, n - 1) * k);  // past n: reread, discard
    }
    float acc[R][QT];
#pragma unroll
    for (int i = 0; i < R; ++i)
#pragma unroll
      for (int j = 0; j < QT; ++j) acc[i][j] = 0.0f;
    for (int64_t c = lane; c < chunks; c += 32) {
      float x[R][8];
#pragma unroll
      for (int i = 0; i < R; ++i) Conv::Eight(__ldcs(rows[i] + c), x[i]);
#pragma unroll
      for (int j = 0; j < QT; ++j) {
        const float4* qp = reinterpret_cast<const float4*>(queries + j * k) + 2 * c;
        const float4 a = __ldg(qp), b = __ldg(qp + 1);
        const float qv[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
#pragma unroll
        for (int i = 0; i < R; ++i)
#pragma unroll
          for (int e = 0; e < 8; ++e) acc[i][j] = fmaf(x[i][e], qv[e], acc[i][j]);
      }
    }
#pragma unroll
    for (int i = 0; i < R; ++i)
#pragma unroll
      for (int j = 0; j < QT; ++j) {
        const float s = WarpSum(acc[i][j]);
        if (lane == 0 && r0 + i < n) scores[j * n + r0 + i] = s;
      }
  }
}

// Any k and alignment: one element per lane per step.
template <typename Conv>
__global__ void __launch_bounds__(kThreads) ScoreScalar(const uint16_t* __restrict__ store, int64_t n, int64_t k,
                                                        const float* __restrict__ queries, int q,
                                                        float* __restrict__ scores) {
  const int lane = threadIdx.x & 31;
  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) >> 5;
  const int64_t nwarps = (static_cast<int64_t>(gridDim.x) * kThreads) >> 5;
  for (int64_t r = warp; r < n; r += nwarps) {
    const uint16_t* row = store + r * k;
    for (int j = 0; j < q; ++j) {
      float acc = 0.0f;
      for (int64_t c = lane; c < k; c += 32) acc = fmaf(Conv::One(row[c]), queries[j * k + c], acc);
      acc = WarpSum(acc);
      if (lane == 0) scores[j * n + r] = acc;
    }
  }
}

int SmCount() {
  int dev = 0, sms = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) !=
                                                 cudaSuccess) {
    return 80;
  }
  return sms;
}

template <typename Conv, int QT, int R>
void LaunchVec(const uint16_t* store, int64_t n, int64_t k, const float* queries, float* scores,
               cudaStream_t stream) {
  const int64_t warps_needed = (n + R - 1) / R;
  const int64_t blocks = std::min<int64_t>((warps_needed + kThreads / 32 - 1) / (kThreads / 32),
                                           static_cast<int64_t>(SmCount()) * 16);
  ScoreVec<Conv, QT, R><<<static_cast<unsigned>(std::max<int64_t>(blocks, 1)), kThreads, 0, stream>>>(
      store, n, k, queries, scores);
}

template <typename Conv>
cudaError_t ScoreTyped(const uint16_t* store, int64_t n, int64_t k, const float* queries, int q, float* scores,
                       cudaStream_t stream) {
  const bool vec = k % 8 == 0 && reinterpret_cast<uintptr_t>(store) % 16 == 0 &&
                   reinterpret_cast<uintptr_t>(queries) % 16 == 0;
  if (!vec) {
    const int64_t blocks = std::min<int64_t>((n + 7) / 8, static_cast<int64_t>(SmCount()) * 16);
    ScoreScalar<Conv><<<static_cast<unsigned>(std::max<int64_t>(blocks, 1)), kThreads, 0, stream>>>(
        store, n, k, queries, q, scores);
    return cudaGetLastError();
  }
  // Tiles of 8, 4, 2, 1 query vectors; each tile is one pass over the store.
  for (int j0 = 0; j0 < q;) {
    const int left = q - j0;
    const float* qj = queries + static_cast<int64_t>(j0) * k;
    float* sj = scores + static_cast<int64_t>(j0) * n;
    int t;
    if (left >= 8) {
      LaunchVec<Conv, 8, 4>(store, n, k, qj, sj, stream);
      t = 8;
    } else if (left >= 4) {
      LaunchVec<Conv, 4, 4>(store, n, k, qj, sj, stream);
      t = 4;
    } else if (left >= 2) {
      LaunchVec<Conv, 2, 4>(store, n, k, qj, sj, stream);
      t = 2;
    } else {
      LaunchVec<Conv, 1, 4>(store, n, k, qj, sj, stream);
      t = 1;
    }
    const cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess) return e;
    j0 += t;
  }
  return cudaSuccess;
}

// Keys that sort like the scores; NaN gets the key that sorts last in the requested direction.
__global__ void PrepareKeys(const float* __restrict__ scores, int64_t n, int q, bool largest,
                            uint32_t* __restrict__ keys, uint32_t* __restrict__ rows, int* __restrict__ offsets) {
  const int64_t total = n * q;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float s = scores[i];
    const uint32_t bits = __float_as_uint(s);
    uint32_t key = (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
    if (s != s) key = largest ? 0u : 0xffffffffu;
    keys[i] = key;
    rows[i] = static_cast<uint32_t>(i % n);
  }
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i <= q;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    offsets[i] = static_cast<int>(i * n);
  }
}

// Tiled top-k: one block sorts a tile of kTile (key, row) pairs of one segment in shared memory and keeps its
// best kk. Repeated over the kept candidates until one tile is left. Block radix sort is stable and the tiles
// keep their order, so among equal keys the smaller row still comes first.
constexpr int kTileThreads = 256, kTileItems = 16, kTile = kTileThreads * kTileItems;

__device__ __forceinline__ uint32_t ScoreKey(float s, bool largest) {
  const uint32_t bits = __float_as_uint(s);
  if (s != s) return largest ? 0u : 0xffffffffu;
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

template <bool kLargest, bool kFromScores>
__global__ void __launch_bounds__(kTileThreads) TileTopK(const float* __restrict__ scores,
                                                         const uint32_t* __restrict__ keys_in,
                                                         const uint32_t* __restrict__ rows_in, int64_t count,
                                                         int kk, uint32_t* __restrict__ keys_out,
                                                         uint32_t* __restrict__ rows_out, int64_t out_stride) {
  using Sort = cub::BlockRadixSort<uint32_t, kTileThreads, kTileItems, uint32_t>;
  __shared__ typename Sort::TempStorage temp;
  const int64_t seg = blockIdx.y;
  const int64_t base = static_cast<int64_t>(blockIdx.x) * kTile;
  uint32_t key[kTileItems], row[kTileItems];
#pragma unroll
  for (int i = 0; i < kTileItems; ++i) {
    const int64_t idx = base + threadIdx.x * kTileItems + i;  // blocked arrangement: input order = rank order
    if (idx < count) {
      if (kFromScores) {
        key[i] = ScoreKey(scores[seg * count + idx], kLargest);
        row[i] = static_cast<uint32_t>(idx);
      } else {
        key[i] = keys_in[seg * count + idx];
        row[i] = rows_in[seg * count + idx];
      }
    } else {
      key[i] = kLargest ? 0u : 0xffffffffu;  // padding sorts after every real score, like NaN
      row[i] = 0xffffffffu;
    }
  }
  if (kLargest) {
    Sort(temp).SortDescending(key, row);
  } else {
    Sort(temp).Sort(key, row);
  }
#pragma unroll
  for (int i = 0; i < kTileItems; ++i) {
    const int rank = threadIdx.x * kTileItems + i;
    if (rank < kk) {
      const int64_t o = seg * out_stride + static_cast<int64_t>(blockIdx.x) * kk + rank;
      keys_out[o] = key[i];
      rows_out[o] = row[i];
    }
  }
}

template <bool kLargest>
cudaError_t TiledTopK(void* scratch, const float* scores, int64_t n, int q, int k, uint32_t* out_key,
                      uint32_t* out_row, size_t half, cudaStream_t stream) {
  const int kk = std::min(k, kTile);
  char* p = static_cast<char*>(scratch);
  uint32_t* buf[2][2];
  for (int b = 0; b < 2; ++b) {
    buf[b][0] = reinterpret_cast<uint32_t*>(p + 2 * b * half);
    buf[b][1] = reinterpret_cast<uint32_t*>(p + (2 * b + 1) * half);
  }
  int64_t count = n;
  int cur = -1;  // -1: read the scores
  while (count > kTile) {
    const int64_t tiles = (count + kTile - 1) / kTile;
    const int next = cur == 0 ? 1 : 0;
    const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(q));
    if (cur < 0) {
      TileTopK<kLargest, true><<<grid, kTileThreads, 0, stream>>>(scores, nullptr, nullptr, count, kk,
                                                                   buf[next][0], buf[next][1], tiles * kk);
    } else {
      TileTopK<kLargest, false><<<grid, kTileThreads, 0, stream>>>(nullptr, buf[cur][0], buf[cur][1], count, kk,
                                                                    buf[next][0], buf[next][1], tiles * kk);
    }
    const cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess) return e;
    count = tiles * kk;
    cur = next;
  }
  const dim3 grid(1, static_cast<unsigned>(q));
  if (cur < 0) {
    TileTopK<kLargest, true><<<grid, kTileThreads, 0, stream>>>(scores, nullptr, nullptr, count, k, out_key,
                                                                 out_row, k);
  } else {
    TileTopK<kLargest, false><<<grid, kTileThreads, 0, stream>>>(nullptr, buf[cur][0], buf[cur][1], count, k,
                                                                  out_key, out_row, k);
  }
  return cudaGetLastError();
}

__global__ void TakeFirst(const uint32_t* __restrict__ keys, const uint32_t* __restrict__ rows, int64_t n, int q,
                          int k, bool largest, uint32_t* __restrict__ out_key, uint32_t* __restrict__ out_row) {
  const int64_t total = static_cast<int64_t>(q) * k;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t j = i / k, t = i % k;
    if (t < n) {
      out_key[i] = keys[j * n + t];
      out_row[i] = rows[j * n + t];
    } else {
      out_key[i] = largest ? 0u : 0xffffffffu;
      out_row[i] = 0xffffffffu;
    }
  }
}

size_t Align256(size_t x) { return (x + 255) / 256 * 256; }

__global__ void SketchKernel(const uint32_t* __restrict__ entries, int64_t bin_size, int64_t k,
                             const float* __restrict__ x, int64_t d, float* __restrict__ out) {
  const int64_t bin = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (bin >= k) return;
  const float* xb = x + static_cast<int64_t>(blockIdx.y) * d;
  float acc = 0.0f;
  for (int64_t t = 0; t < bin_size; ++t) {
    const uint32_t e = entries[t * k + bin];
    if (e == 0xffffffffu) break;  // padding is sorted after every real entry of the bin
    // Negation as a sign-bit flip, exactly as the CPU path; __fadd_rn keeps the CPU's rounding and order.
    acc = __fadd_rn(acc, __uint_as_float(__float_as_uint(__ldg(xb + (e >> 1))) ^ (e << 31)));
  }
  out[static_cast<int64_t>(blockIdx.y) * k + bin] = acc;
}

}  // namespace

cudaError_t LaunchScore(StoreType type, const void* store, int64_t n, int64_t k, const float* queries, int q,
                        float* scores, cudaStream_t stream) {
  if (n < 0 || k < 1 || q < 1 || (n > 0 && (store == nullptr || queries == nullptr || scores == nullptr))) {
    return cudaErrorInvalidValue;
  }
  if (n == 0) return cudaSuccess;
  const auto* s = static_cast<const uint16_t*>(store);
  return type == StoreType::kF16 ? ScoreTyped<F16>(s, n, k, queries, q, scores, stream)
                                 : ScoreTyped<BF16>(s, n, k, queries, q, scores, stream);
}

cudaError_t LaunchTopK(void* scratch, size_t* scratch_bytes, const float* scores, int64_t n, int q, int k,
                       bool largest, uint32_t* out_key, uint32_t* out_row, cudaStream_t stream) {
  if (scratch_bytes == nullptr || n < 1 || q < 1 || k < 0 || n * q >= (int64_t{1} << 31)) {
    return cudaErrorInvalidValue;
  }
  if (k <= kTile / 2) {
    // Each pass keeps at most half of what it reads, so the candidates shrink geometrically.
    const int64_t tiles = (n + kTile - 1) / kTile;
    const size_t half = Align256(static_cast<size_t>(q) * tiles * std::max(std::min(k, kTile), 1) *
                                 sizeof(uint32_t));
    if (scratch == nullptr) {
      *scratch_bytes = 4 * half;
      return cudaSuccess;
    }
    if (*scratch_bytes < 4 * half || scores == nullptr || (k > 0 && (out_key == nullptr || out_row == nullptr))) {
      return cudaErrorInvalidValue;
    }
    if (k == 0) return cudaSuccess;
    return largest ? TiledTopK<true>(scratch, scores, n, q, k, out_key, out_row, half, stream)
                   : TiledTopK<false>(scratch, scores, n, q, k, out_key, out_row, half, stream);
  }
  // Large k: a full segmented radix sort per query.
  const size_t items = static_cast<size_t>(n) * q;
  size_t sort_bytes = 0;
  cudaError_t e = cub::DeviceSegmentedRadixSort::SortPairs(
      nullptr, sort_bytes, static_cast<const uint32_t*>(nullptr), static_cast<uint32_t*>(nullptr),
      static_cast<const uint32_t*>(nullptr), static_cast<uint32_t*>(nullptr), static_cast<int>(items), q,
      static_cast<const int*>(nullptr), static_cast<const int*>(nullptr), 0, 32, stream);
  if (e != cudaSuccess) return e;
  size_t desc_bytes = 0;
  e = cub::DeviceSegmentedRadixSort::SortPairsDescending(
      nullptr, desc_bytes, static_cast<const uint32_t*>(nullptr), static_cast<uint32_t*>(nullptr),
      static_cast<const uint32_t*>(nullptr), static_cast<uint32_t*>(nullptr), static_cast<int>(items), q,
      static_cast<const int*>(nullptr), static_cast<const int*>(nullptr), 0, 32, stream);
  if (e != cudaSuccess) return e;
  sort_bytes = std::max(sort_bytes, desc_bytes);
  const size_t arr = Align256(items * sizeof(uint32_t));
  const size_t offs = Align256((q + 1) * sizeof(int));
  const size_t need = 4 * arr + offs + Align256(sort_bytes);
  if (scratch == nullptr) {
    *scratch_bytes = need;
    return cudaSuccess;
  }
  if (*scratch_bytes < need || scores == nullptr || (k > 0 && (out_key == nullptr || out_row == nullptr))) {
    return cudaErrorInvalidValue;
  }
  if (k == 0) return cudaSuccess;
  char* p = static_cast<char*>(scratch);
  auto* keys_in = reinterpret_cast<uint32_t*>(p);
  auto* rows_in = reinterpret_cast<uint32_t*>(p + arr);
  auto* keys_out = reinterpret_cast<uint32_t*>(p + 2 * arr);
  auto* rows_out = reinterpret_cast<uint32_t*>(p + 3 * arr);
  auto* offsets = reinterpret_cast<int*>(p + 4 * arr);
  void* temp = p + 4 * arr + offs;
  const unsigned blocks = static_cast<unsigned>(std::min<size_t>((items + kThreads - 1) / kThreads, 4096));
  PrepareKeys<<<blocks, kThreads, 0, stream>>>(scores, n, q, largest, keys_in, rows_in, offsets);
  if ((e = cudaGetLastError()) != cudaSuccess) return e;
  // Radix sort is stable and rows start ascending, so equal scores stay ordered by row (the CPU tie-break).
  if (largest) {
    e = cub::DeviceSegmentedRadixSort::SortPairsDescending(temp, sort_bytes, keys_in, keys_out, rows_in, rows_out,
                                                           static_cast<int>(items), q, offsets, offsets + 1, 0,
                                                           32, stream);
  } else {
    e = cub::DeviceSegmentedRadixSort::SortPairs(temp, sort_bytes, keys_in, keys_out, rows_in, rows_out,
                                                 static_cast<int>(items), q, offsets, offsets + 1, 0, 32, stream);
  }
  if (e != cudaSuccess) return e;
  const int64_t outs = static_cast<int64_t>(q) * k;
  TakeFirst<<<static_cast<unsigned>(std::min<int64_t>((outs + kThreads - 1) / kThreads, 4096)), kThreads, 0,
              stream>>>(keys_out, rows_out, n, q, k, largest, out_key, out_row);
  return cudaGetLastError();
}

cudaError_t LaunchSketch(const uint32_t* entries, int64_t bin_size, int64_t k, const float* x, int64_t d,
                         int batch, float* out, cudaStream_t stream) {
  if (entries == nullptr || x == nullptr || out == nullptr || bin_size < 1 || k < 1 || d < 1 || batch < 1 ||
      batch > 65535) {
    return cudaErrorInvalidValue;
  }
  const dim3 grid(static_cast<unsigned>((k + 127) / 128), static_cast<unsigned>(batch));
  SketchKernel<<<grid, 128, 0, stream>>>(entries, bin_size, k, x, d, out);
  return cudaGetLastError();
}

}  // namespace rapidin::gpu
