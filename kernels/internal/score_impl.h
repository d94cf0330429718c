// Per-ISA scoring kernels behind kernels/score.h. Each computes out[r*q+j] for r < n, j < q in the canonical
// summation order documented in score.h.
#ifndef RAPIDIN_KERNELS_INTERNAL_SCORE_IMPL_H_
#define RAPIDIN_KERNELS_INTERNAL_SCORE_IMPL_H_

#include <cstdint>

namespace rapidin::kernels::internal {

void ScoreF16Portable(const uint16_t* store, int64_t n, int64_t k, const float* queries, int q, float* out);
// Only call when Avx2Available(); compiled with -mavx2 -mf16c -mfma.
void ScoreF16Avx2(const uint16_t* store, int64_t n, int64_t k, const float* queries, int q, float* out);

}  // namespace rapidin::kernels::internal

#endif  // RAPIDIN_KERNELS_INTERNAL_SCORE_IMPL_H_
