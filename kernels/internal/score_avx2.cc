// AVX2 + F16C + FMA scoring. Tiles of R rows x Q queries keep R*Q independent accumulators in registers so the
// FMA latency is hidden while each row's bytes are loaded once per tile.
#include <immintrin.h>

#include <cmath>

#include "kernels/internal/score_impl.h"

namespace rapidin::kernels::internal {
namespace {

inline float Reduce8(__m256 v) {
  // Canonical order: (l0+l4, l1+l5, l2+l6, l3+l7) -> (s0+s2, s1+s3) -> sum.
  __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
  __m128 s1 = _mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1));
  return _mm_cvtss_f32(s1);
}

template <int R, int Q>
void Tile(const uint16_t* rows, int64_t k, const float* queries, int q_stride_rows, float* out, int out_stride) {
  (void)q_stride_rows;
  __m256 acc[R][Q];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < Q; ++j) acc[r][j] = _mm256_setzero_ps();
  const int64_t k8 = k & ~int64_t{7};
  for (int64_t c = 0; c < k8; c += 8) {
    __m256 x[R];
    for (int r = 0; r < R; ++r) {
      x[r] = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(rows + r * k + c)));
    }
    for (int j = 0; j < Q; ++j) {
      const __m256 qv = _mm256_loadu_ps(queries + j * k + c);
      for (int r = 0; r < R; ++r) acc[r][j] = _mm256_fmadd_ps(x[r], qv, acc[r][j]);
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int j = 0; j < Q; ++j) {
      float s = Reduce8(acc[r][j]);
      for (int64_t c = k8; c < k; ++c) {
        const float xv = _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(rows[r * k + c])));
        s = std::fma(xv, queries[j * k + c], s);
      }
      out[r * out_stride + j] = s;
    }
  }
}

template <int Q>
void RowsForQ(const uint16_t* store, int64_t n, int64_t k, const float* queries, float* out, int q) {
  constexpr int R = Q == 1 ? 4 : (Q == 2 ? 2 : 1);
  int64_t r = 0;
  for (; r + R <= n; r += R) Tile<R, Q>(store + r * k, k, queries, 0, out + r * q, q);
  for (; r < n; ++r) Tile<1, Q>(store + r * k, k, queries, 0, out + r * q, q);
}

}  // namespace

void ScoreF16Avx2(const uint16_t* store, int64_t n, int64_t k, const float* queries, int q, float* out) {
  // Query blocks of up to 8; within a block every row is read once (later blocks re-read it from cache when
  // the caller scores rows in small chunks, as ScanTopK does).
  for (int j0 = 0; j0 < q; j0 += 8) {
    const int qb = q - j0 < 8 ? q - j0 : 8;
    const float* qs = queries + static_cast<int64_t>(j0) * k;
    float* o = out + j0;
    switch (qb) {
      case 1: RowsForQ<1>(store, n, k, qs, o, q); break;
      case 2: RowsForQ<2>(store, n, k, qs, o, q); break;
      case 3: RowsForQ<3>(store, n, k, qs, o, q); break;
      case 4: RowsForQ<4>(store, n, k, qs, o, q); break;
      case 5: RowsForQ<5>(store, n, k, qs, o, q); break;
      case 6: RowsForQ<6>(store, n, k, qs, o, q); break;
      case 7: RowsForQ<7>(store, n, k, qs, o, q); break;
      default: RowsForQ<8>(store, n, k, qs, o, q); break;
    }
  }
}

}  // namespace rapidin::kernels::internal
