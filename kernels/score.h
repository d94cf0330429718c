// Scoring: inner products of an fp16 store with fp32 query vectors, fp32 accumulation.
//
// Start here for the compute contract. Every implementation sums in the same fixed order (8 lanes over the
// element index modulo 8, a fixed pairwise reduction of the lanes, then the K % 8 tail with fused multiply-adds),
// so the AVX2 and portable paths return bitwise-identical scores. That makes results reproducible across
// machines and lets tests compare implementations exactly.
//
// Thread-safety: all functions are pure; callers may run them concurrently on disjoint outputs.
#ifndef RAPIDIN_KERNELS_SCORE_H_
#define RAPIDIN_KERNELS_SCORE_H_

#include <cstdint>
#include <vector>

#include "absl/status/status.h"
#include "kernels/topk.h"

namespace rapidin::kernels {

enum class ScoreImpl { kAuto, kPortable, kAvx2 };

// True when the CPU supports AVX2, F16C and FMA (checked once, at run time).
bool Avx2Available();
// kAuto resolves to the fastest implementation this CPU supports.
ScoreImpl ResolveImpl(ScoreImpl impl);
const char* ImplName(ScoreImpl impl);  // "cpu-avx2" / "cpu-portable"

// out[r * q + j] = sum_c float(store[r * k + c]) * queries[j * k + c], for r < n, j < q.
// store: n rows of k fp16 values (row-major, contiguous); queries: q rows of k floats.
// Errors: INVALID_ARGUMENT for negative sizes, FAILED_PRECONDITION when kAvx2 is asked for on a CPU without it.
absl::Status ScoreF16(const uint16_t* store, int64_t n, int64_t k, const float* queries, int q, float* out,
                      ScoreImpl impl = ScoreImpl::kAuto);

// One pass over a block of rows for q query vectors, keeping per-query top-k at both ends.
// Row r of `store` has global index first_index + r * index_stride (shards interleave rows round-robin).
// helpful[j] / harmful[j] must be TopK selectors built for query j; they are updated in place.
// Rows are scored in tiles so each row is read from memory once per call, whatever q is.
absl::Status ScanTopK(const uint16_t* store, int64_t n, int64_t k, const float* queries, int q,
                      int64_t first_index, int64_t index_stride, std::vector<TopK>* helpful,
                      std::vector<TopK>* harmful, ScoreImpl impl = ScoreImpl::kAuto);

}  // namespace rapidin::kernels

#endif  // RAPIDIN_KERNELS_SCORE_H_
