// Per-ISA scoring kernels behind kernels/score.h. Each computes out[r*q+j] for r < n, j < q in the canonical
// summation order documented in score.h.
#ifndef RAPIDIN_KERNELS_INTERNAL_SCORE_IMPL_H_
#define RAPIDIN_KERNELS_INTERNAL_SCORE_IMPL_H_

#include <cstdint>
#include <memory>

namespace rapidin::kernels::internal {

void ScoreF16Portable(const uint16_t* store, int64_t n, int64_t k, const float* queries, int q, float* out);
// Only call when Avx2Available(); compiled with -mavx2 -mf16c -mfma.
void ScoreF16Avx2(const uint16_t* store, int64_t n, int64_t k, const float* queries, int q, float* out);
// The same arithmetic (8-lane accumulators, canonical order: bitwise equal results) with tiles of 3 rows x 8 query
// vectors, which need AVX-512VL's 32 vector registers: each row is converted once per 8 query vectors instead of
// once per 4. ScoreF16Avx2 calls it for more than 4 query vectors when Avx512VlAvailable(). Compiled with
// -mavx512f -mavx512vl (and the AVX2 flags).
void ScoreF16Avx2Wide(const uint16_t* store, int64_t n, int64_t k, const float* queries, int q, float* out);
bool Avx512VlAvailable();
// The wide kernel's pair form, for an even q (> 4): two query vectors per 16-lane accumulator, bitwise equal again.
// PairsApply: whether ScoreF16Avx2 takes it (the CPU has AVX-512VL, g_score_before is off). packed: PackPairs's
// buffer; queries are still read for the K % 8 tail.
bool PairsApply(int q, int64_t k);
using PackedQueries = std::unique_ptr<float, void (*)(void*)>;
PackedQueries PackPairs(const float* queries, int q, int64_t k);  // q * (k / 8) * 8 floats, 64-byte aligned
void ScoreF16Pairs(const uint16_t* store, int64_t n, int64_t k, const float* queries, const float* packed, int q,
                   float* out);
// Benchmarks only (bench/scan_bench --kernel-only): true selects the AVX2 kernel as it was before the wide tiles,
// for a side-by-side run. Results are equal either way.
extern bool g_score_before;

}  // namespace rapidin::kernels::internal

#endif  // RAPIDIN_KERNELS_INTERNAL_SCORE_IMPL_H_
