#include "kernels/score.h"

#include <cmath>
#include <cstdlib>
#include <vector>

#include "absl/strings/str_cat.h"
#include "kernels/half.h"
#include "kernels/internal/score_impl.h"

namespace rapidin::kernels {

namespace internal {

// The same summation order as the AVX2 kernel, lane by lane, with explicit fused multiply-adds.
void ScoreF16Portable(const uint16_t* store, int64_t n, int64_t k, const float* queries, int q, float* out) {
  const int64_t k8 = k & ~int64_t{7};
  for (int64_t r = 0; r < n; ++r) {
    const uint16_t* row = store + r * k;
    for (int j = 0; j < q; ++j) {
      const float* qv = queries + static_cast<int64_t>(j) * k;
      float lane[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      for (int64_t c = 0; c < k8; c += 8) {
        for (int l = 0; l < 8; ++l) lane[l] = std::fma(HalfToFloat(row[c + l]), qv[c + l], lane[l]);
      }
      const float s4[4] = {lane[0] + lane[4], lane[1] + lane[5], lane[2] + lane[6], lane[3] + lane[7]};
      const float s20 = s4[0] + s4[2];
      const float s21 = s4[1] + s4[3];
      float s = s20 + s21;
      for (int64_t c = k8; c < k; ++c) s = std::fma(HalfToFloat(row[c]), qv[c], s);
      out[r * q + j] = s;
    }
  }
}

}  // namespace internal

bool Avx2Available() {
  static const bool available = [] {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#else
    return false;
#endif
  }();
  return available;
}

ScoreImpl ResolveImpl(ScoreImpl impl) {
  if (impl != ScoreImpl::kAuto) return impl;
  return Avx2Available() ? ScoreImpl::kAvx2 : ScoreImpl::kPortable;
}

const char* ImplName(ScoreImpl impl) {
  switch (ResolveImpl(impl)) {
    case ScoreImpl::kAvx2: return "cpu-avx2";
    default: return "cpu-portable";
  }
}

absl::Status ScoreF16(const uint16_t* store, int64_t n, int64_t k, const float* queries, int q, float* out,
                      ScoreImpl impl) {
  if (n < 0 || k < 0 || q < 0) return absl::InvalidArgumentError("ScoreF16: negative size");
  impl = ResolveImpl(impl);
  if (impl == ScoreImpl::kAvx2) {
    if (!Avx2Available()) return absl::FailedPreconditionError("ScoreF16: this CPU lacks AVX2/F16C/FMA");
#if defined(__x86_64__)
    internal::ScoreF16Avx2(store, n, k, queries, q, out);
    return absl::OkStatus();
#endif
  }
  internal::ScoreF16Portable(store, n, k, queries, q, out);
  return absl::OkStatus();
}

absl::Status ScanTopK(const uint16_t* store, int64_t n, int64_t k, const float* queries, int q,
                      int64_t first_index, int64_t index_stride, std::vector<TopK>* helpful,
                      std::vector<TopK>* harmful, ScoreImpl impl) {
  if (static_cast<int>(helpful->size()) != q || static_cast<int>(harmful->size()) != q) {
    return absl::InvalidArgumentError(absl::StrCat("ScanTopK: need ", q, " selectors per side"));
  }
  // Row blocks small enough that the block (and its scores) stays in L2 while q > 8 query blocks revisit it.
  const int64_t block_bytes = 512 * 1024;
  int64_t block_rows = k > 0 ? block_bytes / (2 * k) : n;
  // Whole 6-row tiles (and so 3-row ones): a lone row runs a 1-row tile, which reloads every query vector for one
  // row (with 4-row blocks at K = 65536, a quarter of the rows went that way and 8 vectors cost 2.2x one).
  block_rows = block_rows < 12 ? 12 : block_rows / 6 * 6;
  std::vector<float> scores(static_cast<size_t>(block_rows) * q);
  std::vector<float> help_thr(q), harm_thr(q);
  for (int j = 0; j < q; ++j) {
    help_thr[j] = (*helpful)[j].Threshold();
    harm_thr[j] = (*harmful)[j].Threshold();
  }
#if defined(__x86_64__)
  // The pair kernel's packed queries, made once per scan rather than once per block.
  internal::PackedQueries packed(nullptr, &std::free);
  if (ResolveImpl(impl) == ScoreImpl::kAvx2 && internal::PairsApply(q, k)) packed = internal::PackPairs(queries, q, k);
#endif
  for (int64_t r0 = 0; r0 < n; r0 += block_rows) {
    const int64_t rows = n - r0 < block_rows ? n - r0 : block_rows;
#if defined(__x86_64__)
    if (packed) {
      internal::ScoreF16Pairs(store + r0 * k, rows, k, queries, packed.get(), q, scores.data());
    } else
#endif
    {
      absl::Status st = ScoreF16(store + r0 * k, rows, k, queries, q, scores.data(), impl);
      if (!st.ok()) return st;
    }
    // Only scores that can still enter reach the selectors; the thresholds sit in two arrays instead of 2 x q heaps
    // (8 vectors over 100k x 4096 on 2 threads: 34.1 -> 32.9 ms, 32 vectors 131.0 -> 124.9, alternating in one
    // process). NaN passes neither test, as Push would drop it.
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t index = first_index + (r0 + r) * index_stride;
      const float* s = scores.data() + r * q;
      for (int j = 0; j < q; ++j) {
        if (s[j] >= help_thr[j]) {
          (*helpful)[j].Push(s[j], index);
          help_thr[j] = (*helpful)[j].Threshold();
        }
        if (s[j] <= harm_thr[j]) {
          (*harmful)[j].Push(s[j], index);
          harm_thr[j] = (*harmful)[j].Threshold();
        }
      }
    }
  }
  return absl::OkStatus();
}

}  // namespace rapidin::kernels
