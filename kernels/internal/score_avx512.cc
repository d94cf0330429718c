// ScoreF16Avx2's arithmetic with 3-row x 8-query tiles (24 accumulators + 3 rows + 1 query = 28 of AVX-512VL's 32
// ymm registers). Every accumulator takes the same FMAs in the same order as in score_avx2.cc, so the results are
// bitwise those of the AVX2 and portable kernels (kernels_test).
//
// Pairs (even q): one 16-lane zmm accumulator holds two queries' 8-lane accumulators of one row. The row's 8
// converted values are duplicated into both halves and the two queries' 8 values sit side by side (queries packed
// in pairs once per scan, PackPairs), so every lane still takes the FMAs of the 8-lane kernel in the same order
// (bitwise equal results) at half the FMA instructions; tiles grow to 6 rows x 4 pairs (24 + 6 + 1 registers).
//
// Loop order: when the query vectors of one K chunk fit in L2 next to the rows (q * k * 4 bytes <= 1 MiB), rows
// are outermost: a 3-row tile walks K in chunks and every query block runs over the chunk while the rows' bytes are
// in L1, so each row is read from memory and converted once per 8 query vectors. Otherwise (very long rows) the
// chunk is outermost and the query chunk stays in L2 while every row streams past it, the accumulators parked in
// between.
#include <algorithm>
#include <cstdlib>
#include <vector>

#include "kernels/internal/score_impl.h"
#include "kernels/internal/score_tile.h"

namespace rapidin::kernels::internal {
namespace {

constexpr int kRows = 3, kQ = 8;
const ChunkFn kFull[kQ + 1] = {nullptr,          &TileChunk<3, 1>, &TileChunk<3, 2>, &TileChunk<3, 3>, &TileChunk<3, 4>,
                               &TileChunk<3, 5>, &TileChunk<3, 6>, &TileChunk<3, 7>, &TileChunk<3, 8>};
const ChunkFn kOne[kQ + 1] = {nullptr,          &TileChunk<1, 1>, &TileChunk<1, 2>, &TileChunk<1, 3>, &TileChunk<1, 4>,
                              &TileChunk<1, 5>, &TileChunk<1, 6>, &TileChunk<1, 7>, &TileChunk<1, 8>};

// acc[r * 2P + j] += rows[r][c0:c1] * queries[j][c0:c1] lane-wise, as TileChunk<R, 2P>, from pair-packed queries
// (packed + (p * G + c / 8) * 16: pair p's two 8-value groups at column c).
template <int R, int P>
void PairChunk(const uint16_t* rows, int64_t k, const float* packed, int64_t G, int64_t c0, int64_t c1, __m256* acc) {
  __m512 a[R][P];
  for (int r = 0; r < R; ++r)
    for (int p = 0; p < P; ++p) a[r][p] = _mm512_loadu_ps(reinterpret_cast<const float*>(acc + r * 2 * P + 2 * p));
  for (int64_t c = c0; c < c1; c += 8) {
    if ((c & 31) == 0) {
      // These columns of the next tile's rows into L1: streaming from memory, the FMAs otherwise waited on rows the
      // hardware prefetchers had not brought yet (8 vectors over 100k x 4096 on 2 threads: 38.4 -> 34.6 ms,
      // alternating in one process; no change at K = 65536; prefetching 4-8 tiles further into L2 too added
      // nothing there and evicted the query chunk at K = 65536). A prefetch past the store does not fault.
      for (int r = 0; r < R; ++r) _mm_prefetch(reinterpret_cast<const char*>(rows + (r + R) * k + c), _MM_HINT_T0);
    }
    __m512 x[R];
    for (int r = 0; r < R; ++r) {
      const __m512 h = _mm512_castps256_ps512(
          _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(rows + r * k + c))));
      x[r] = _mm512_shuffle_f32x4(h, h, 0x44);  // low 256 bits into both halves
    }
    for (int p = 0; p < P; ++p) {
      const __m512 qv = _mm512_load_ps(packed + (p * G + c / 8) * 16);
      for (int r = 0; r < R; ++r) a[r][p] = _mm512_fmadd_ps(x[r], qv, a[r][p]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int p = 0; p < P; ++p) _mm512_storeu_ps(reinterpret_cast<float*>(acc + r * 2 * P + 2 * p), a[r][p]);
}

using PairFn = void (*)(const uint16_t*, int64_t, const float*, int64_t, int64_t, int64_t, __m256*);
constexpr int kPairRows = 6;
const PairFn kPairFull[kQ / 2 + 1] = {nullptr, &PairChunk<6, 1>, &PairChunk<6, 2>, &PairChunk<6, 3>, &PairChunk<6, 4>};
const PairFn kPairOne[kQ / 2 + 1] = {nullptr, &PairChunk<1, 1>, &PairChunk<1, 2>, &PairChunk<1, 3>, &PairChunk<1, 4>};

// The two loop orders, for tiles of kTileRows rows x up to kQ query vectors. tile(full, qb, j0, rows, c0, c1, acc)
// adds columns [c0, c1) of a full tile (or of one row) against query vectors [j0, j0 + qb) into acc, laid out
// [row][query] with qb queries per row.
template <int kTileRows, class Tile>
void WideScore(const uint16_t* store, int64_t n, int64_t k, const float* queries, int q, float* out, const Tile& tile) {
  const int nblocks = (q + kQ - 1) / kQ;
  const int64_t k8 = k & ~int64_t{7};
  auto block = [&](int b, int* j0, int* qb) {
    *j0 = b * kQ;
    *qb = q - *j0 < kQ ? q - *j0 : kQ;
  };
  if (static_cast<int64_t>(q) * k * 4 <= (int64_t{1} << 20)) {
    // Rows outermost. buf: block b's kTileRows x qb accumulators at kTileRows * j0 (rows x qb for a short tile).
    constexpr int64_t kChunk = 2048;
    std::vector<__m256> buf(static_cast<size_t>(kTileRows) * q), acc(static_cast<size_t>(kTileRows) * q);
    for (int64_t r = 0; r < n; r += kTileRows) {
      const int rows = n - r < kTileRows ? static_cast<int>(n - r) : kTileRows;
      std::fill(buf.begin(), buf.end(), _mm256_setzero_ps());
      for (int64_t c0 = 0; c0 < k8; c0 += kChunk) {
        const int64_t c1 = std::min(c0 + kChunk, k8);
        for (int b = 0; b < nblocks; ++b) {
          int j0, qb;
          block(b, &j0, &qb);
          if (rows == kTileRows) {
            tile(true, qb, j0, store + r * k, c0, c1, &buf[static_cast<size_t>(kTileRows) * j0]);
          } else {
            for (int i = 0; i < rows; ++i) tile(false, qb, j0, store + (r + i) * k, c0, c1, &buf[rows * j0 + i * qb]);
          }
        }
      }
      for (int b = 0; b < nblocks; ++b) {
        int j0, qb;
        block(b, &j0, &qb);
        for (int i = 0; i < rows; ++i)
          for (int j = 0; j < qb; ++j) acc[static_cast<size_t>(i) * q + j0 + j] = buf[rows * j0 + i * qb + j];
      }
      Finish(store, r, r + rows, k, k8, queries, q, acc.data(), out);
    }
    return;
  }
  // Chunk outermost: 8 query vectors x 8192 floats = 256 KiB of queries stay in L2 while the rows stream past in
  // 16 KiB pieces (1024-float chunks kept the queries in L1 but cut each row into 2 KiB pieces, which the
  // prefetchers follow poorly, and parked every accumulator 8x as often: 8 vectors at K = 65536 took 65-72 ms
  // against 56-62 ms with 8192, alternating in one session, bench/scan_bench --kernel-only).
  constexpr int64_t kChunk = 8192;
  std::vector<__m256> acc(static_cast<size_t>(n) * q, _mm256_setzero_ps());
  for (int64_t c0 = 0; c0 < k8; c0 += kChunk) {
    const int64_t c1 = std::min(c0 + kChunk, k8);
    for (int b = 0; b < nblocks; ++b) {
      int j0, qb;
      block(b, &j0, &qb);
      int64_t r = 0;
      __m256 t[kTileRows * kQ];
      for (; r + kTileRows <= n; r += kTileRows) {
        for (int i = 0; i < kTileRows; ++i)
          for (int j = 0; j < qb; ++j) t[i * qb + j] = acc[(r + i) * q + j0 + j];
        tile(true, qb, j0, store + r * k, c0, c1, t);
        for (int i = 0; i < kTileRows; ++i)
          for (int j = 0; j < qb; ++j) acc[(r + i) * q + j0 + j] = t[i * qb + j];
      }
      for (; r < n; ++r) tile(false, qb, j0, store + r * k, c0, c1, &acc[r * q + j0]);
    }
  }
  Finish(store, 0, n, k, k8, queries, q, acc.data(), out);
}

}  // namespace

bool PairsApply(int q, int64_t k) { return q > kQ / 2 && q % 2 == 0 && k >= 8 && !g_score_before && Avx512VlAvailable(); }

PackedQueries PackPairs(const float* queries, int q, int64_t k) {
  const int64_t G = k / 8;
  const size_t bytes = static_cast<size_t>(q) * G * 8 * sizeof(float);
  PackedQueries out(static_cast<float*>(std::aligned_alloc(64, (bytes + 63) / 64 * 64)), &std::free);
  float* packed = out.get();
  for (int p = 0; p < q / 2; ++p) {
    for (int64_t g = 0; g < G; ++g) {
      float* o = packed + (p * G + g) * 16;
      std::copy_n(queries + (2 * p) * k + g * 8, 8, o);
      std::copy_n(queries + (2 * p + 1) * k + g * 8, 8, o + 8);
    }
  }
  return out;
}

bool Avx512VlAvailable() {
  static const bool available = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl");
  }();
  return available;
}

void ScoreF16Avx2Wide(const uint16_t* store, int64_t n, int64_t k, const float* queries, int q, float* out) {
  WideScore<kRows>(store, n, k, queries, q, out,
                   [&](bool full, int qb, int j0, const uint16_t* rows, int64_t c0, int64_t c1, __m256* acc) {
                     const ChunkFn* table = full ? kFull : kOne;
                     table[qb](rows, k, queries + static_cast<int64_t>(j0) * k, c0, c1, acc);
                   });
}

void ScoreF16Pairs(const uint16_t* store, int64_t n, int64_t k, const float* queries, const float* packed, int q,
                   float* out) {
  const int64_t G = k / 8;
  WideScore<kPairRows>(store, n, k, queries, q, out,
                       [&](bool full, int qb, int j0, const uint16_t* rows, int64_t c0, int64_t c1, __m256* acc) {
                         const PairFn* table = full ? kPairFull : kPairOne;
                         table[qb / 2](rows, k, packed + (j0 / 2) * G * 16, G, c0, c1, acc);
                       });
}

}  // namespace rapidin::kernels::internal
