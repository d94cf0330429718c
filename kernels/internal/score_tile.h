// Private to kernels/: the 8-lane register tile shared by the AVX2 kernels (score_avx2.cc, and score_avx512.cc, which
// compiles the same tile with 32 vector registers). Everything here has internal linkage, so each translation unit
// keeps its own code for its own instruction set.
#ifndef RAPIDIN_KERNELS_INTERNAL_SCORE_TILE_H_
#define RAPIDIN_KERNELS_INTERNAL_SCORE_TILE_H_

#include <immintrin.h>

#include <cmath>
#include <cstdint>

namespace rapidin::kernels::internal {
namespace {

inline float Reduce8(__m256 v) {
  // Canonical order: (l0+l4, l1+l5, l2+l6, l3+l7) -> (s0+s2, s1+s3) -> sum.
  __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
  __m128 s1 = _mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1));
  return _mm_cvtss_f32(s1);
}

// acc[r * Q + j] += rows[r][c0:c1] * queries[j][c0:c1], lane-wise.
template <int R, int Q>
void TileChunk(const uint16_t* rows, int64_t k, const float* queries, int64_t c0, int64_t c1, __m256* acc) {
  __m256 a[R][Q];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < Q; ++j) a[r][j] = acc[r * Q + j];
  for (int64_t c = c0; c < c1; c += 8) {
    __m256 x[R];
    for (int r = 0; r < R; ++r) {
      x[r] = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(rows + r * k + c)));
    }
    for (int j = 0; j < Q; ++j) {
      const __m256 qv = _mm256_loadu_ps(queries + j * k + c);
      for (int r = 0; r < R; ++r) a[r][j] = _mm256_fmadd_ps(x[r], qv, a[r][j]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < Q; ++j) acc[r * Q + j] = a[r][j];
}

// acc[(r - r0) * q + j] -> out[r * q + j], with the K tail.
void Finish(const uint16_t* store, int64_t r0, int64_t r1, int64_t k, int64_t k8, const float* queries, int q,
            const __m256* acc, float* out) {
  for (int64_t r = r0; r < r1; ++r) {
    for (int j = 0; j < q; ++j) {
      float s = Reduce8(acc[(r - r0) * q + j]);
      for (int64_t c = k8; c < k; ++c) {
        const float xv = _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(store[r * k + c])));
        s = std::fma(xv, queries[static_cast<int64_t>(j) * k + c], s);
      }
      out[r * q + j] = s;
    }
  }
}

using ChunkFn = void (*)(const uint16_t*, int64_t, const float*, int64_t, int64_t, __m256*);

}  // namespace
}  // namespace rapidin::kernels::internal

#endif  // RAPIDIN_KERNELS_INTERNAL_SCORE_TILE_H_
