// AVX2 + F16C + FMA scoring.
//
// Register tiles of R rows x Q queries keep R*Q independent accumulators (one 8-lane accumulator per row and
// query, which is the canonical summation order of score.h, so tiling never changes a result). The K dimension
// is walked in chunks of kChunk elements when there are several query blocks: the rows' chunk is then re-read
// from L1 by each block, and each row's bytes are loaded from memory exactly once. Accumulators are parked in a
// small scratch array between chunks.
#include <immintrin.h>

#include <cmath>
#include <vector>

#include "kernels/internal/score_impl.h"
#include "kernels/internal/score_tile.h"

namespace rapidin::kernels::internal {
namespace {

constexpr int64_t kChunk = 2048;  // 4 queries x 2048 floats = 32 KiB: fits L1


// Tile shapes per query-block size: R*Q accumulators + R row registers + 1 query register <= 16.
struct Shape {
  int r;
  ChunkFn full, one;  // R-row tile and 1-row tile (for the n % R leftover rows)
};
template <int R, int Q>
constexpr Shape MakeShape() {
  return {R, &TileChunk<R, Q>, &TileChunk<1, Q>};
}
const Shape kShapes[5] = {{}, MakeShape<4, 1>(), MakeShape<4, 2>(), MakeShape<3, 3>(), MakeShape<3, 4>()};
constexpr int kMaxQB = 4;

}  // namespace

bool g_score_before = false;  // see score_impl.h

void ScoreF16Avx2(const uint16_t* store, int64_t n, int64_t k, const float* queries, int q, float* out) {
  if (q > kMaxQB && !g_score_before && Avx512VlAvailable()) {
    if (PairsApply(q, k)) {
      ScoreF16Pairs(store, n, k, queries, PackPairs(queries, q, k).get(), q, out);
    } else {
      ScoreF16Avx2Wide(store, n, k, queries, q, out);
    }
    return;
  }
  const int nblocks = (q + kMaxQB - 1) / kMaxQB;
  std::vector<__m256> acc(static_cast<size_t>(n) * q, _mm256_setzero_ps());
  const int64_t k8 = k & ~int64_t{7};
  // One query block needs no chunking (its rows are read once anyway); several blocks re-read the rows of a
  // chunk from L1 instead of memory.
  const int64_t chunk = nblocks == 1 ? (k8 > 0 ? k8 : 8) : kChunk;
  for (int64_t c0 = 0; c0 < k8; c0 += chunk) {
    const int64_t c1 = c0 + chunk < k8 ? c0 + chunk : k8;
    for (int b = 0; b < nblocks; ++b) {
      const int j0 = b * kMaxQB;
      const int qb = q - j0 < kMaxQB ? q - j0 : kMaxQB;
      const Shape& s = kShapes[qb];
      const float* qs = queries + static_cast<int64_t>(j0) * k;
      // acc layout: row-major [row][query], so a tile's R x qb block is strided; keep a contiguous copy per tile.
      int64_t r = 0;
      for (; r + s.r <= n; r += s.r) {
        __m256 t[4 * kMaxQB];
        for (int i = 0; i < s.r; ++i)
          for (int j = 0; j < qb; ++j) t[i * qb + j] = acc[(r + i) * q + j0 + j];
        s.full(store + r * k, k, qs, c0, c1, t);
        for (int i = 0; i < s.r; ++i)
          for (int j = 0; j < qb; ++j) acc[(r + i) * q + j0 + j] = t[i * qb + j];
      }
      for (; r < n; ++r) s.one(store + r * k, k, qs, c0, c1, &acc[r * q + j0]);
    }
  }
  Finish(store, 0, n, k, k8, queries, q, acc.data(), out);
}

}  // namespace rapidin::kernels::internal
