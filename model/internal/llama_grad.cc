#include "model/internal/llama_grad.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <type_traits>
#include <vector>

#include "base/mutex.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

// Fortran BLAS (OpenBLAS here, as LibTorch and FAISS use it). The engine sets its thread count to 1: parallelism
// comes from records, one per thread.
extern "C" {
void sgemm_(const char* ta, const char* tb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc);
void dgemm_(const char* ta, const char* tb, const int* m, const int* n, const int* k, const double* alpha,
            const double* a, const int* lda, const double* b, const int* ldb, const double* beta, double* c,
            const int* ldc);
}

namespace rapidin::model::internal {
namespace {

void Blas(const char* ta, const char* tb, const int* m, const int* n, const int* k, const float* alpha,
          const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
          const int* ldc) {
  sgemm_(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}
void Blas(const char* ta, const char* tb, const int* m, const int* n, const int* k, const double* alpha,
          const double* a, const int* lda, const double* b, const int* ldb, const double* beta, double* c,
          const int* ldc) {
  dgemm_(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

// Row-major C[M x N] = alpha op(A) op(B) + beta C with op(A): M x K, op(B): K x N (ta / tb: the stored matrix is
// the transpose). A row-major matrix is its transpose in column-major order, so this is BLAS's C^T = op(B)^T
// op(A)^T.
template <class F>
void Gemm(bool ta, bool tb, int M, int N, int K, const F* A, int lda, const F* B, int ldb, F beta, F* C, int ldc,
          F alpha = 1) {
  if (M <= 0 || N <= 0) return;
  if (K <= 0) {  // BLAS would only scale C; do the same without asking it (leading dimensions may be 0)
    for (int i = 0; i < M; ++i) {
      for (int j = 0; j < N; ++j) C[int64_t{i} * ldc + j] = beta == 0 ? F(0) : beta * C[int64_t{i} * ldc + j];
    }
    return;
  }
  const char a = tb ? 'T' : 'N', b = ta ? 'T' : 'N';
  Blas(&a, &b, &N, &M, &K, &alpha, B, &ldb, A, &lda, &beta, C, &ldc);
}

// e^x for x <= 88 (Cephes' expf: range reduction by ln 2, a degree-6 polynomial, the exponent set by integer
// arithmetic; within 2 ulp). Branch-free, so the loops below vectorise; std::exp does not.
inline float ExpF(float x) {
  x = x < -87.0f ? -87.0f : x;
  x = x > 88.0f ? 88.0f : x;
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest
  x = x - n * 0.693359375f + n * 2.12194440e-4f;
  const float z = x * x;
  float p = 1.9875691500e-4f;
  p = p * x + 1.3981999507e-3f;
  p = p * x + 8.3334519073e-3f;
  p = p * x + 4.1665795894e-2f;
  p = p * x + 1.6666665459e-1f;
  p = p * x + 5.0000001201e-1f;
  p = p * z + x + 1.0f;
  // A NaN x (an overflowing model) stays NaN through p; n must not be converted to an integer as NaN.
  const float nn = n == n ? n : 0.0f;
  const uint32_t bits = static_cast<uint32_t>(static_cast<int32_t>(nn) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

// The element-wise loops, cloned for AVX-512 and AVX2 (chosen at load time) with a baseline fallback.
#if defined(__x86_64__)
#define RAPIDIN_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define RAPIDIN_CLONES
#endif

// p[j] = e^(x[j] - shift); returns the sum (in double).
RAPIDIN_CLONES double ExpShiftSum(const float* x, float shift, float* p, int n) {
  float acc[16] = {};
  int j = 0;
  for (; j + 16 <= n; j += 16) {
    for (int u = 0; u < 16; ++u) {
      p[j + u] = ExpF(x[j + u] - shift);
      acc[u] += p[j + u];
    }
  }
  double s = 0;
  for (; j < n; ++j) {
    p[j] = ExpF(x[j] - shift);
    s += p[j];
  }
  for (float a : acc) s += a;
  return s;
}
double ExpShiftSum(const double* x, double shift, double* p, int n) {
  double s = 0;
  for (int j = 0; j < n; ++j) s += p[j] = std::exp(x[j] - shift);
  return s;
}

// m = silu(a1) * a3.
RAPIDIN_CLONES void SiluMul(const float* a1, const float* a3, float* m, int64_t n) {
  for (int64_t i = 0; i < n; ++i) m[i] = a1[i] / (1.0f + ExpF(-a1[i])) * a3[i];
}
void SiluMul(const double* a1, const double* a3, double* m, int64_t n) {
  for (int64_t i = 0; i < n; ++i) m[i] = a1[i] / (1.0 + std::exp(-a1[i])) * a3[i];
}

// From dm = dL/d(silu(a1) a3): da1 (in place of dm) and da3.
RAPIDIN_CLONES void SiluMulBack(const float* a1, const float* a3, float* dm, float* da3, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const float sg = 1.0f / (1.0f + ExpF(-a1[i]));
    const float s1 = a1[i] * sg;
    da3[i] = dm[i] * s1;
    dm[i] = dm[i] * a3[i] * sg * (1.0f + a1[i] * (1.0f - sg));
  }
}
void SiluMulBack(const double* a1, const double* a3, double* dm, double* da3, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const double sg = 1.0 / (1.0 + std::exp(-a1[i]));
    da3[i] = dm[i] * a1[i] * sg;
    dm[i] = dm[i] * a3[i] * sg * (1.0 + a1[i] * (1.0 - sg));
  }
}

// Causal attention of one head, written for small head dimensions (hd = 8 in stories260K, where BLAS on
// T x T x hd products ran at ~5 GFLOP/s): K and V are held transposed (hd x T, the head's KV group), so every
// inner loop runs over keys j, contiguous and vectorised. Bodies are inlined into the cloned wrappers below.
#define RAPIDIN_INLINE inline __attribute__((always_inline))

template <class F>
RAPIDIN_INLINE F Dot(const F* a, const F* b, int n) {
  F acc[16] = {};
  int j = 0;
  for (; j + 16 <= n; j += 16) {
    for (int u = 0; u < 16; ++u) acc[u] += a[j + u] * b[j + u];
  }
  F s = 0;
  for (; j < n; ++j) s += a[j] * b[j];
  for (F x : acc) s += x;
  return s;
}

// Rows i in [i0, T) of q (stride ldq), keys [0, i]: P row i = softmax(scale q_i K^T), o_i = P_i V (stride ldo).
// Rows before i0 are not touched.
template <class F>
RAPIDIN_INLINE void AttnForwardBody(const F* q, int ldq, const F* kt, const F* vt, int i0, int T, int ld, int hd,
                                    F scale, F* P, F* o, int ldo) {
  for (int i = i0; i < T; ++i) {
    F* p = P + int64_t{i} * ld;
    const F* qi = q + int64_t{i} * ldq;
    const int n = i + 1;
    for (int j = 0; j < n; ++j) p[j] = 0;
    for (int d = 0; d < hd; ++d) {
      const F c = qi[d] * scale;
      const F* kd = kt + int64_t{d} * ld;
      for (int j = 0; j < n; ++j) p[j] += c * kd[j];
    }
    F mx = p[0];
    for (int j = 1; j < n; ++j) mx = p[j] > mx ? p[j] : mx;
    const double sum = ExpShiftSum(p, mx, p, n);
    const F inv = static_cast<F>(1.0 / sum);
    for (int j = 0; j < n; ++j) p[j] *= inv;
    F* oi = o + int64_t{i} * ldo;
    for (int d = 0; d < hd; ++d) oi[d] = Dot(p, vt + int64_t{d} * ld, n);
  }
}

// From do (stride ldo): dq rows (stride ldq, overwritten), and dkt, dvt (hd x T, accumulated: a KV group's
// heads share them). dp is T values of scratch.
template <class F>
RAPIDIN_INLINE void AttnBackwardBody(const F* q, int ldq, const F* kt, const F* vt, const F* P, const F* dout,
                                     int ldo, int i0, int T, int ld, int hd, F scale, F* dq, int lddq, F* dkt, F* dvt, F* dp) {
  for (int i = i0; i < T; ++i) {
    const F* p = P + int64_t{i} * ld;
    const F* qi = q + int64_t{i} * ldq;
    const F* doi = dout + int64_t{i} * ldo;
    const int n = i + 1;
    for (int j = 0; j < n; ++j) dp[j] = 0;
    for (int d = 0; d < hd; ++d) {
      const F c = doi[d];
      const F* vd = vt + int64_t{d} * ld;
      F* dvd = dvt + int64_t{d} * ld;
      for (int j = 0; j < n; ++j) {
        dp[j] += c * vd[j];
        dvd[j] += c * p[j];
      }
    }
    const F dot = Dot(p, dp, n);
    for (int j = 0; j < n; ++j) dp[j] = p[j] * (dp[j] - dot) * scale;  // dS
    F* dqi = dq + int64_t{i} * lddq;
    for (int d = 0; d < hd; ++d) {
      const F* kd = kt + int64_t{d} * ld;
      F* dkd = dkt + int64_t{d} * ld;
      const F c = qi[d];
      dqi[d] = Dot(dp, kd, n);
      for (int j = 0; j < n; ++j) dkd[j] += c * dp[j];
    }
  }
}

#if defined(__x86_64__)
// The float path on AVX-512, for head dimensions that are a multiple of 8: keys in chunks of 16 (one vector), 8
// head dimensions at a time in registers, rows padded to whole chunks (kt, vt, P, dkt, dvt have `ld` columns, a
// multiple of 16, zero past T), so no loop has a scalar tail. Keys past the causal limit are masked in the softmax
// (p = 0 there), so they add nothing anywhere after it.
#define RAPIDIN_AVX512 __attribute__((target("avx512f,avx2,fma")))  // every AVX-512 CPU has AVX2 and FMA

RAPIDIN_AVX512 inline __m512 Exp512(__m512 x) {  // ExpF, 16 lanes
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.0f)), _mm512_set1_ps(88.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  x = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  x = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), x);
  const __m512 z = _mm512_mul_ps(x, x);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, x, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, x, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, x, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, x, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, x, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_add_ps(_mm512_fmadd_ps(p, z, x), _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

// Lanes of chunk j0 at or before key i.
RAPIDIN_AVX512 inline __mmask16 Causal(int i, int j0) {
  const int live = i - j0 + 1;
  return live >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << live) - 1);
}

RAPIDIN_AVX512 void AttnForward512(const float* q, int ldq, const float* kt, const float* vt, int i0, int T, int ld,
                                   int hd, float scale, float* P, float* o, int ldo) {
  // A row's scores, exponentials and probabilities live in an L1 row buffer; P receives each finished row once,
  // with streaming stores: P (layers x heads x T^2 / 2 values for the backward) is far larger than the caches, and
  // ordinary stores first read every line they write (a third of the forward attention's time under perf).
  thread_local std::vector<float> row_storage;
  if (row_storage.size() < static_cast<size_t>(ld) + 16) row_storage.resize(static_cast<size_t>(ld) + 16);
  float* r = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(row_storage.data()) + 63) & ~uintptr_t{63});
  for (int i = i0; i < T; ++i) {
    float* p = P + int64_t{i} * ld;
    const float* qi = q + int64_t{i} * ldq;
    const int n = (i + 16) / 16 * 16;
    __m512 mx = _mm512_set1_ps(-INFINITY);
    int j0 = 0;
    // Four chunks at once: one chunk's sum over d is a chain of dependent FMAs, latency-bound for a small head
    // dimension. Each lane's FMAs are the same, in the same order, as one chunk at a time.
    for (; j0 + 64 <= n; j0 += 64) {
      __m512 s0 = _mm512_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
      for (int d = 0; d < hd; ++d) {
        const __m512 c = _mm512_set1_ps(qi[d] * scale);
        const float* kd = kt + int64_t{d} * ld + j0;
        s0 = _mm512_fmadd_ps(c, _mm512_load_ps(kd), s0);
        s1 = _mm512_fmadd_ps(c, _mm512_load_ps(kd + 16), s1);
        s2 = _mm512_fmadd_ps(c, _mm512_load_ps(kd + 32), s2);
        s3 = _mm512_fmadd_ps(c, _mm512_load_ps(kd + 48), s3);
      }
      _mm512_store_ps(r + j0, s0);
      _mm512_store_ps(r + j0 + 16, s1);
      _mm512_store_ps(r + j0 + 32, s2);
      _mm512_store_ps(r + j0 + 48, s3);
      mx = _mm512_max_ps(mx, _mm512_max_ps(_mm512_max_ps(s0, s1), s2));  // whole chunks: all keys <= i
      mx = _mm512_mask_max_ps(mx, Causal(i, j0 + 48), mx, s3);
    }
    for (; j0 < n; j0 += 16) {
      __m512 sc = _mm512_setzero_ps();
      for (int d = 0; d < hd; ++d) {
        sc = _mm512_fmadd_ps(_mm512_set1_ps(qi[d] * scale), _mm512_load_ps(kt + int64_t{d} * ld + j0), sc);
      }
      _mm512_store_ps(r + j0, sc);
      mx = _mm512_mask_max_ps(mx, Causal(i, j0), mx, sc);
    }
    const __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
    __m512 sums = _mm512_setzero_ps();
    for (int j0 = 0; j0 < n; j0 += 16) {
      const __m512 e = _mm512_maskz_mov_ps(Causal(i, j0), Exp512(_mm512_sub_ps(_mm512_load_ps(r + j0), m)));
      _mm512_store_ps(r + j0, e);
      sums = _mm512_add_ps(sums, e);
    }
    const __m512 inv = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(sums));
    for (int j0 = 0; j0 < n; j0 += 16) {
      const __m512 pv = _mm512_mul_ps(_mm512_load_ps(r + j0), inv);
      _mm512_store_ps(r + j0, pv);
      _mm512_stream_ps(p + j0, pv);
    }
    for (int d0 = 0; d0 < hd; d0 += 8) {
      __m512 acc[8];
      for (auto& a : acc) a = _mm512_setzero_ps();
      for (int j0 = 0; j0 < n; j0 += 16) {
        const __m512 pv = _mm512_load_ps(r + j0);
        for (int dd = 0; dd < 8; ++dd) {
          acc[dd] = _mm512_fmadd_ps(pv, _mm512_load_ps(vt + int64_t{d0 + dd} * ld + j0), acc[dd]);
        }
      }
      for (int dd = 0; dd < 8; ++dd) o[int64_t{i} * ldo + d0 + dd] = _mm512_reduce_add_ps(acc[dd]);
    }
  }
  _mm_sfence();  // the streamed rows are visible before anything this thread publishes next
}

RAPIDIN_AVX512 void AttnBackward512(const float* q, int ldq, const float* kt, const float* vt, const float* P,
                                    const float* dout, int ldo, int i0, int T, int ld, int hd, float scale,
                                    float* dq, int lddq, float* dkt, float* dvt, float* dp) {
  for (int i = i0; i < T; ++i) {
    const float* p = P + int64_t{i} * ld;
    const float* qi = q + int64_t{i} * ldq;
    const float* doi = dout + int64_t{i} * ldo;
    const int n = (i + 16) / 16 * 16;
    __m512 dots = _mm512_setzero_ps();
    for (int j0 = 0; j0 < n; j0 += 16) {  // dp = do V^T; dV += p^T do; sum p dp
      const __m512 pv = _mm512_load_ps(p + j0);
      __m512 a = _mm512_setzero_ps();
      for (int d = 0; d < hd; ++d) {
        const __m512 c = _mm512_set1_ps(doi[d]);
        a = _mm512_fmadd_ps(c, _mm512_load_ps(vt + int64_t{d} * ld + j0), a);
        float* dvd = dvt + int64_t{d} * ld + j0;
        _mm512_store_ps(dvd, _mm512_fmadd_ps(c, pv, _mm512_load_ps(dvd)));
      }
      _mm512_store_ps(dp + j0, a);
      dots = _mm512_fmadd_ps(pv, a, dots);
    }
    const __m512 dot = _mm512_set1_ps(_mm512_reduce_add_ps(dots)), sc = _mm512_set1_ps(scale);
    for (int j0 = 0; j0 < n; j0 += 16) {  // dS = p (dp - dot) scale
      const __m512 pv = _mm512_load_ps(p + j0);
      _mm512_store_ps(dp + j0, _mm512_mul_ps(_mm512_mul_ps(pv, _mm512_sub_ps(_mm512_load_ps(dp + j0), dot)), sc));
    }
    for (int d0 = 0; d0 < hd; d0 += 8) {  // dq = dS K; dK += dS^T q
      __m512 acc[8], qd[8];
      for (int dd = 0; dd < 8; ++dd) {
        acc[dd] = _mm512_setzero_ps();
        qd[dd] = _mm512_set1_ps(qi[d0 + dd]);
      }
      for (int j0 = 0; j0 < n; j0 += 16) {
        const __m512 ds = _mm512_load_ps(dp + j0);
        for (int dd = 0; dd < 8; ++dd) {
          acc[dd] = _mm512_fmadd_ps(ds, _mm512_load_ps(kt + int64_t{d0 + dd} * ld + j0), acc[dd]);
          float* dkd = dkt + int64_t{d0 + dd} * ld + j0;
          _mm512_store_ps(dkd, _mm512_fmadd_ps(qd[dd], ds, _mm512_load_ps(dkd)));
        }
      }
      for (int dd = 0; dd < 8; ++dd) dq[int64_t{i} * lddq + d0 + dd] = _mm512_reduce_add_ps(acc[dd]);
    }
  }
}

// In-register transpose of a 16 x 16 tile (row r of the input becomes column r).
RAPIDIN_AVX512 inline void Transpose16(__m512 r[16]) {
  __m512 t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    r[4 * i] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    r[4 * i + 1] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    r[4 * i + 2] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    r[4 * i + 3] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int h = 0; h < 2; ++h) {
    for (int i = 0; i < 4; ++i) {
      t[8 * h + i] = _mm512_shuffle_f32x4(r[8 * h + i], r[8 * h + 4 + i], 0x88);
      t[8 * h + 4 + i] = _mm512_shuffle_f32x4(r[8 * h + i], r[8 * h + 4 + i], 0xdd);
    }
  }
  for (int i = 0; i < 8; ++i) {
    r[i] = _mm512_shuffle_f32x4(t[i], t[8 + i], 0x88);
    r[8 + i] = _mm512_shuffle_f32x4(t[i], t[8 + i], 0xdd);
  }
}

// delta[b][i] = do_i . o_i for c losses' output gradients (loss b's rows at dout + b * bo, stride ldo) against the
// forward output o (stride ldq), rows [0, T): the softmax backward's row term, one per loss and row.
inline void RowDeltas(const float* dout, int ldo, int64_t bo, const float* o, int ldq, int T, int hd, int c, int ld,
                      float* delta) {
  for (int b = 0; b < c; ++b) {
    for (int i = 0; i < T; ++i) {
      const float* doi = dout + b * bo + int64_t{i} * ldo;
      float a = 0;
      for (int d = 0; d < hd; ++d) a += doi[d] * o[int64_t{i} * ldq + d];
      delta[int64_t{b} * ld + i] = a;
    }
  }
}

// AttnBackward512 in 16 x 16 tiles (rows i x keys j), for many rows and for c losses at once that share the
// forward pass (a chunk of token losses: loss b's do rows at dout + b * bo, its dq at dq + b * bo, its dK, dV at
// dkt / dvt + b * bkv). Per tile, the P chunk is read once for all c losses; per loss, dS in one pass (delta_i =
// do_i . o_i, o the forward output, instead of a sum over the row), dV and dK summed over the tile's rows in
// registers and added once, and dq through the transposed tile, accumulated as dq^T (lanes = rows). The
// row-at-a-time kernel read and wrote dK and dV for every row and read P once per loss. Rows [0, T) for every
// loss (a loss's rows past its own position have do = 0 and contribute nothing). s: AttnScratch(hd, ld, c).
// kHd: the head dimension when known at compile time (8: stories260K's; loops unrolled), or 0 (hd).
template <int kHd>
RAPIDIN_AVX512 void AttnBackwardTiles512(const float* q, int ldq, const float* o, const float* kt, const float* vt,
                                         const float* P, const float* dout, int ldo, int i0, int T, int ld, int hd_any,
                                         float scale, float* dq, int lddq, float* dkt, float* dvt, int c,
                                         int64_t bo, int64_t bkv, float* s) {
  const int hd = kHd > 0 ? kHd : hd_any;
  float* dsb = s;                           // 16 x 16: a tile's dS rows
  float* delta = s + 256;                   // c x ld
  float* dqt = delta + int64_t{c} * ld;     // c x hd x ld: dq transposed
  std::fill(dqt, dqt + int64_t{c} * hd * ld, 0.0f);
  RowDeltas(dout, ldo, bo, o, ldq, T, hd, c, ld, delta);
  const __m512 sc = _mm512_set1_ps(scale);
  for (int ib = i0 / 16 * 16; ib < T; ib += 16) {
    const int nr = std::min(16, T - ib);
    const __mmask16 rows = nr >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << nr) - 1);
    for (int j0 = 0; j0 < ib + nr; j0 += 16) {
      // rows before j0 see none of these keys (their P chunk is unwritten), rows before i0 have no output gradient
      const int r0 = std::max({0, j0 - ib, i0 - ib});
      if (j0 + 32 < ib + nr) {  // the rows' P two chunks ahead (16 strided streams defeat the prefetchers)
        for (int r = std::max(0, j0 + 32 - ib); r < nr; ++r) {
          _mm_prefetch(reinterpret_cast<const char*>(P + int64_t{ib + r} * ld + j0 + 32), _MM_HINT_T0);
        }
      }
      for (int b = 0; b < c; ++b) {
        const float* dob = dout + b * bo;
        const float* db = delta + int64_t{b} * ld;
        // dS rows (zero outside [r0, nr), so the transpose adds nothing for them), four rows at a time so that
        // their dot products over d are independent chains
        for (int r = 0; r < r0; ++r) _mm512_store_ps(dsb + 16 * r, _mm512_setzero_ps());
        for (int r = nr; r < 16; ++r) _mm512_store_ps(dsb + 16 * r, _mm512_setzero_ps());
        for (int r = r0; r < nr; r += 4) {
          const int rn = std::min(4, nr - r);
          __m512 dp[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
          const float* doi = dob + int64_t{ib + r} * ldo;
          for (int d = 0; d < hd; ++d) {
            const __m512 v = _mm512_load_ps(vt + int64_t{d} * ld + j0);
            for (int u = 0; u < 4; ++u) {
              if (u < rn) dp[u] = _mm512_fmadd_ps(_mm512_set1_ps(doi[u * int64_t{ldo} + d]), v, dp[u]);
            }
          }
          for (int u = 0; u < rn; ++u) {
            const int i = ib + r + u;
            const __m512 pv = _mm512_load_ps(P + int64_t{i} * ld + j0);
            _mm512_store_ps(dsb + 16 * (r + u),
                            _mm512_mul_ps(_mm512_mul_ps(pv, _mm512_sub_ps(dp[u], _mm512_set1_ps(db[i]))), sc));
          }
        }
        // Row 0 sees key 0 alone (p = 1), so its dS is exactly zero; delta = do.o rounds differently from do.v0,
        // and the noise would become a unit-norm q/k block once a token's gradient is normalised layer-wise.
        if (j0 == 0 && ib == 0) _mm512_store_ps(dsb, _mm512_setzero_ps());
        // dV += P^T do, dK += dS^T q over the tile's rows
        float *dvb = dvt + b * bkv, *dkb = dkt + b * bkv;
        for (int d0 = 0; d0 < hd; d0 += 8) {
          __m512 dva[8], dka[8];
          for (int dd = 0; dd < 8; ++dd) dva[dd] = dka[dd] = _mm512_setzero_ps();
          for (int r = r0; r < nr; ++r) {
            const int i = ib + r;
            const __m512 pv = _mm512_load_ps(P + int64_t{i} * ld + j0), ds = _mm512_load_ps(dsb + 16 * r);
            const float *doi = dob + int64_t{i} * ldo + d0, *qi = q + int64_t{i} * ldq + d0;
            for (int dd = 0; dd < 8; ++dd) {
              dva[dd] = _mm512_fmadd_ps(_mm512_set1_ps(doi[dd]), pv, dva[dd]);
              dka[dd] = _mm512_fmadd_ps(_mm512_set1_ps(qi[dd]), ds, dka[dd]);
            }
          }
          for (int dd = 0; dd < 8; ++dd) {
            float* dv = dvb + int64_t{d0 + dd} * ld + j0;
            float* dk = dkb + int64_t{d0 + dd} * ld + j0;
            _mm512_store_ps(dv, _mm512_add_ps(_mm512_load_ps(dv), dva[dd]));
            _mm512_store_ps(dk, _mm512_add_ps(_mm512_load_ps(dk), dka[dd]));
          }
        }
        // dq^T[d][rows] += sum over the tile's keys of K^T[d][j] dS^T[j][rows]
        __m512 dst[16];
        for (int r = 0; r < 16; ++r) dst[r] = _mm512_load_ps(dsb + 16 * r);
        Transpose16(dst);
        float* dqb = dqt + int64_t{b} * hd * ld;
        for (int d = 0; d < hd; ++d) {
          const float* kd = kt + int64_t{d} * ld + j0;
          float* acc_at = dqb + int64_t{d} * ld + ib;
          __m512 acc = _mm512_maskz_loadu_ps(rows, acc_at);
          for (int jj = 0; jj < 16; ++jj) acc = _mm512_fmadd_ps(_mm512_set1_ps(kd[jj]), dst[jj], acc);
          _mm512_mask_storeu_ps(acc_at, rows, acc);
        }
      }
    }
  }
  for (int b = 0; b < c; ++b) {
    const float* dqb = dqt + int64_t{b} * hd * ld;
    for (int i = 0; i < T; ++i) {
      for (int d = 0; d < hd; ++d) dq[b * bo + int64_t{i} * lddq + d] = dqb[int64_t{d} * ld + i];
    }
  }
}

// For head dimension 8, the loss-independent part of dq for every row i of one head: M_i^T = sum_{j <= i} P_ij v_j
// k_j^T (64 values, [d][a]) and kbar_i = sum_j P_ij k_j (8), in 80 floats per row (out: T x 80, 64-byte aligned).
// With them a chunk's losses need no per-key work for dq: dq_i = scale (M_i do_i - (do_i . o_i) kbar_i).
RAPIDIN_AVX512 void AttnRowMoments8(const float* kt, const float* vt, const float* P, int T, int ld, float* kv,
                                    float* out) {
  for (int j = 0; j < T; ++j) {  // kv_j = [v_j k_j^T, k_j, 0]
    float* r = kv + int64_t{j} * 80;
    for (int d = 0; d < 8; ++d) {
      for (int a = 0; a < 8; ++a) r[8 * d + a] = vt[int64_t{d} * ld + j] * kt[int64_t{a} * ld + j];
    }
    for (int a = 0; a < 8; ++a) r[64 + a] = kt[int64_t{a} * ld + j];
    for (int a = 72; a < 80; ++a) r[a] = 0;
  }
  for (int i = 0; i < T; ++i) {
    __m512 acc[5] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(),
                     _mm512_setzero_ps()};
    const float* p = P + int64_t{i} * ld;
    for (int j = 0; j <= i; ++j) {
      const __m512 pj = _mm512_set1_ps(p[j]);
      const float* r = kv + int64_t{j} * 80;
      for (int z = 0; z < 5; ++z) acc[z] = _mm512_fmadd_ps(pj, _mm512_load_ps(r + 16 * z), acc[z]);
    }
    for (int z = 0; z < 5; ++z) _mm512_store_ps(out + int64_t{i} * 80 + 16 * z, acc[z]);
  }
}

// The token pass's attention backward for head dimension 8 and c losses at positions T - c .. T - 1 (loss b's rows
// past T - c + b are zero and skipped), with dq from the row moments mkv (AttnRowMoments8): dq_i = scale (M_i do_i -
// delta_i kbar_i), hd^2 per row and loss. What is left per key is dp = do V^T, dV += P^T do and dK += dS^T q, done in
// tiles of 16 rows x 32 keys: a row's 8 broadcasts of do serve dp and dV for both key chunks, its 8 of q serve dK
// for both (the 16-key tiles broadcast 24 times per 16 keys). dS goes through a 16 x 32 scratch between the two
// passes. Arguments as AttnBackwardTiles512; s: AttnScratch(8, ld, c).
RAPIDIN_AVX512 void AttnBackwardMoments8(const float* q, int ldq, const float* o, const float* kt, const float* vt,
                                         const float* P, const float* dout, int ldo, int T, int ld, float scale,
                                         float* dq, int lddq, float* dkt, float* dvt, int c, int64_t bo, int64_t bkv,
                                         float* s, const float* mkv) {
  float* dsb = s;          // 16 rows x 32 keys: a tile's dS (AttnScratch reserves 512 values ahead of delta)
  float* delta = s + 512;  // c x ld
  RowDeltas(dout, ldo, bo, o, ldq, T, 8, c, ld, delta);
  const __m512 sc = _mm512_set1_ps(scale);
  for (int ib = 0; ib < T; ib += 16) {
    const int nr = std::min(16, T - ib);
    for (int j0 = 0; j0 < ib + nr; j0 += 32) {
      const int r0 = std::max(0, j0 - ib);  // rows before j0 see none of these keys
      const bool two = j0 + 16 < ib + nr;   // some row sees the second chunk (then j0 + 16 < T <= ld)
      if (j0 + 64 < ib + nr) {  // the rows' P two steps ahead (16 strided streams defeat the prefetchers)
        for (int r = std::max(0, j0 + 64 - ib); r < nr; ++r) {
          _mm_prefetch(reinterpret_cast<const char*>(P + int64_t{ib + r} * ld + j0 + 64), _MM_HINT_T0);
          _mm_prefetch(reinterpret_cast<const char*>(P + int64_t{ib + r} * ld + j0 + 80), _MM_HINT_T0);
        }
      }
      for (int b = 0; b < c; ++b) {
        const int re = std::min(nr, T - c + b + 1 - ib);  // loss b's rows end at its position
        if (re <= r0) continue;
        const float* dob = dout + b * bo;
        const float* db = delta + int64_t{b} * ld;
        __m512 dv0[8], dv1[8];
#pragma GCC unroll 8
        for (int d = 0; d < 8; ++d) dv0[d] = dv1[d] = _mm512_setzero_ps();
        for (int r = r0; r < re; ++r) {
          const int i = ib + r;
          const float* pr = P + int64_t{i} * ld + j0;
          const __m512 p0 = _mm512_load_ps(pr);
          const __m512 p1 = two && j0 + 16 <= i ? _mm512_load_ps(pr + 16) : _mm512_setzero_ps();  // else unwritten
          const float* doi = dob + int64_t{i} * ldo;
          __m512 dp0 = _mm512_setzero_ps(), dp1 = _mm512_setzero_ps();
#pragma GCC unroll 8
          for (int d = 0; d < 8; ++d) {
            const __m512 bd = _mm512_set1_ps(doi[d]);
            dp0 = _mm512_fmadd_ps(bd, _mm512_load_ps(vt + int64_t{d} * ld + j0), dp0);
            dv0[d] = _mm512_fmadd_ps(bd, p0, dv0[d]);
            if (two) {
              dp1 = _mm512_fmadd_ps(bd, _mm512_load_ps(vt + int64_t{d} * ld + j0 + 16), dp1);
              dv1[d] = _mm512_fmadd_ps(bd, p1, dv1[d]);
            }
          }
          const __m512 di = _mm512_set1_ps(db[i]);
          // Row 0 sees key 0 alone: its dS is exactly zero (delta rounds differently from do . v_0)
          const __m512 ds0 = i == 0 ? _mm512_setzero_ps() : _mm512_mul_ps(_mm512_mul_ps(p0, _mm512_sub_ps(dp0, di)), sc);
          _mm512_store_ps(dsb + 32 * r, ds0);
          _mm512_store_ps(dsb + 32 * r + 16, _mm512_mul_ps(_mm512_mul_ps(p1, _mm512_sub_ps(dp1, di)), sc));
        }
        float *dvb = dvt + b * bkv, *dkb = dkt + b * bkv;
        __m512 dk0[8], dk1[8];
#pragma GCC unroll 8
        for (int d = 0; d < 8; ++d) dk0[d] = dk1[d] = _mm512_setzero_ps();
        for (int r = r0; r < re; ++r) {
          const float* qi = q + int64_t{ib + r} * ldq;
          const __m512 s0 = _mm512_load_ps(dsb + 32 * r), s1 = _mm512_load_ps(dsb + 32 * r + 16);
#pragma GCC unroll 8
          for (int d = 0; d < 8; ++d) {
            const __m512 bq = _mm512_set1_ps(qi[d]);
            dk0[d] = _mm512_fmadd_ps(bq, s0, dk0[d]);
            dk1[d] = _mm512_fmadd_ps(bq, s1, dk1[d]);
          }
        }
#pragma GCC unroll 8
        for (int d = 0; d < 8; ++d) {
          float* v = dvb + int64_t{d} * ld + j0;
          float* k = dkb + int64_t{d} * ld + j0;
          _mm512_store_ps(v, _mm512_add_ps(_mm512_load_ps(v), dv0[d]));
          _mm512_store_ps(k, _mm512_add_ps(_mm512_load_ps(k), dk0[d]));
          if (two) {
            _mm512_store_ps(v + 16, _mm512_add_ps(_mm512_load_ps(v + 16), dv1[d]));
            _mm512_store_ps(k + 16, _mm512_add_ps(_mm512_load_ps(k + 16), dk1[d]));
          }
        }
      }
    }
  }
  const __m256 sc8 = _mm256_set1_ps(scale);
  for (int b = 0; b < c; ++b) {
    const float* db = delta + int64_t{b} * ld;
    for (int i = 0; i < T; ++i) {
      const float* m = mkv + int64_t{i} * 80;
      const float* doi = dout + b * bo + int64_t{i} * ldo;
      // M^T is stored [d][a]: dq[a] = sum_d do[d] M^T[d][a]
      __m256 acc = _mm256_mul_ps(_mm256_set1_ps(-db[i]), _mm256_load_ps(m + 64));
      for (int d = 0; d < 8; ++d) acc = _mm256_fmadd_ps(_mm256_set1_ps(doi[d]), _mm256_load_ps(m + 8 * d), acc);
      // Row 0 sees key 0 alone: its dq is exactly zero (the difference above would leave rounding noise)
      _mm256_storeu_ps(dq + b * bo + int64_t{i} * lddq, i == 0 ? _mm256_setzero_ps() : _mm256_mul_ps(acc, sc8));
    }
  }
}

// i0: the first query row with an output gradient (0 with mkv).
void AttnBackwardTiles(const float* q, int ldq, const float* o, const float* kt, const float* vt, const float* P,
                       const float* dout, int ldo, int i0, int T, int ld, int hd, float scale, float* dq, int lddq,
                       float* dkt, float* dvt, int c, int64_t bo, int64_t bkv, float* s, const float* mkv = nullptr) {
  if (hd == 8 && mkv) {
    return AttnBackwardMoments8(q, ldq, o, kt, vt, P, dout, ldo, T, ld, scale, dq, lddq, dkt, dvt, c, bo, bkv, s, mkv);
  }
  if (hd == 8) {
    return AttnBackwardTiles512<8>(q, ldq, o, kt, vt, P, dout, ldo, i0, T, ld, hd, scale, dq, lddq, dkt, dvt, c, bo,
                                   bkv, s);
  }
  AttnBackwardTiles512<0>(q, ldq, o, kt, vt, P, dout, ldo, i0, T, ld, hd, scale, dq, lddq, dkt, dvt, c, bo, bkv, s);
}

std::atomic<bool> g_avx512_allowed{true};

bool UseAttn512(int hd) {
  static const bool avx512 = __builtin_cpu_supports("avx512f");
  return avx512 && hd % 8 == 0 && g_avx512_allowed.load(std::memory_order_relaxed);
}
#else
bool UseAttn512(int) { return false; }
#endif
// The float kernels' AVX-512 forms (the CPU has it, and no test has turned them off).
bool UseAvx512() { return UseAttn512(8); }

RAPIDIN_CLONES void AttnForwardAny(const float* q, int ldq, const float* kt, const float* vt, int i0, int T, int ld,
                                   int hd, float scale, float* P, float* o, int ldo) {
  AttnForwardBody(q, ldq, kt, vt, i0, T, ld, hd, scale, P, o, ldo);
}
RAPIDIN_CLONES void AttnBackwardAny(const float* q, int ldq, const float* kt, const float* vt, const float* P,
                                    const float* dout, int ldo, int i0, int T, int ld, int hd, float scale, float* dq,
                                    int lddq, float* dkt, float* dvt, float* dp) {
  AttnBackwardBody(q, ldq, kt, vt, P, dout, ldo, i0, T, ld, hd, scale, dq, lddq, dkt, dvt, dp);
}

// Scratch values the attention backward needs for c losses (the tiled kernels' tile, delta and dq^T).
int64_t AttnScratch(int hd, int ld, int c = 1) { return 512 + int64_t{c} * (hd + 1) * ld; }

// One head's attention, forward and backward (kt, vt, P, dkt, dvt with `ld` columns; ld a multiple of 16). The
// forward computes query rows [i0, T) (P and o rows before i0 are left as they are).
void AttnForward(const float* q, int ldq, const float* kt, const float* vt, int i0, int T, int ld, int hd,
                 float scale, float* P, float* o, int ldo) {
#if defined(__x86_64__)
  if (UseAttn512(hd)) return AttnForward512(q, ldq, kt, vt, i0, T, ld, hd, scale, P, o, ldo);
#endif
  AttnForwardAny(q, ldq, kt, vt, i0, T, ld, hd, scale, P, o, ldo);
}
void AttnForward(const double* q, int ldq, const double* kt, const double* vt, int i0, int T, int ld, int hd,
                 double scale, double* P, double* o, int ldo) {
  AttnForwardBody(q, ldq, kt, vt, i0, T, ld, hd, scale, P, o, ldo);
}
// Query rows [i0, T) (rows before i0 have a zero output gradient, and their dq is either written as zero or left
// as it was: callers that read it clear it first); dq rows have stride lddq (a batch of token losses interleaves
// its rows).
// o: the forward output rows (stride ldq). dp: AttnScratch(hd, ld) values.
void AttnBackward(const float* q, int ldq, const float* o, const float* kt, const float* vt, const float* P,
                  const float* dout, int ldo, int i0, int T, int ld, int hd, float scale, float* dq, int lddq,
                  float* dkt, float* dvt, float* dp) {
#if defined(__x86_64__)
  if (UseAttn512(hd)) {
    if (T - i0 >= 16) {
      return AttnBackwardTiles(q, ldq, o, kt, vt, P, dout, ldo, i0, T, ld, hd, scale, dq, lddq, dkt, dvt, 1, 0, 0, dp);
    }
    return AttnBackward512(q, ldq, kt, vt, P, dout, ldo, i0, T, ld, hd, scale, dq, lddq, dkt, dvt, dp);
  }
#endif
  AttnBackwardAny(q, ldq, kt, vt, P, dout, ldo, i0, T, ld, hd, scale, dq, lddq, dkt, dvt, dp);
}
void AttnBackward(const double* q, int ldq, const double*, const double* kt, const double* vt, const double* P,
                  const double* dout, int ldo, int i0, int T, int ld, int hd, double scale, double* dq, int lddq,
                  double* dkt, double* dvt, double* dp) {
  AttnBackwardBody(q, ldq, kt, vt, P, dout, ldo, i0, T, ld, hd, scale, dq, lddq, dkt, dvt, dp);
}

// AttnBackward for c losses over rows [0, T) of one head (loss b: do rows at dout + b * bo, dq at dq + b * bo,
// dK, dV at dkt / dvt + b * bkv; rows past a loss's position have do = 0). dp: AttnScratch(hd, ld, c) values.
// mkv: the head's AttnRowMoments8 (float, head dimension 8, AVX-512), or null.
template <class F>
void AttnBackwardLosses(const F* q, int ldq, const F* o, const F* kt, const F* vt, const F* P, const F* dout,
                        int ldo, int T, int ld, int hd, F scale, F* dq, int lddq, F* dkt, F* dvt, int c, int64_t bo,
                        int64_t bkv, F* dp, const F* mkv = nullptr) {
#if defined(__x86_64__)
  if constexpr (std::is_same_v<F, float>) {
    if (UseAttn512(hd) && T >= 16) {
      return AttnBackwardTiles(q, ldq, o, kt, vt, P, dout, ldo, 0, T, ld, hd, scale, dq, lddq, dkt, dvt, c, bo, bkv, dp,
                               mkv);
    }
  }
#endif
  (void)mkv;
  for (int b = 0; b < c; ++b) {
    AttnBackward(q, ldq, o, kt, vt, P, dout + b * bo, ldo, 0, T, ld, hd, scale, dq + b * bo, lddq, dkt + b * bkv,
                 dvt + b * bkv, dp);
  }
}

// dst[g][d][t] = src[t][g * hd + d] (rows of nh heads to one hd x ld block per head), zero for t in [T, ld).
template <class F>
void ToHeadMajor(const F* src, int T, int nh, int hd, int ld, F* dst) {
  for (int64_t r = 0; r < int64_t{nh} * hd; ++r) std::fill(dst + r * ld + T, dst + (r + 1) * ld, F(0));
  for (int t = 0; t < T; ++t) {
    const F* row = src + int64_t{t} * nh * hd;
    for (int c = 0; c < nh * hd; ++c) dst[int64_t{c} * ld + t] = row[c];
  }
}

// Back from head-major blocks: HeadMajorToRows below (c = 1 for one loss).
#if defined(__x86_64__)
// HeadMajorToRows for float on AVX-512 with KD a multiple of 16: 16 x 16 blocks through an in-register transpose.
RAPIDIN_AVX512 void HeadMajorToRows512(const float* src, int P, int c, int KD, int ld, int64_t bsrc, float* dst) {
  for (int b = 0; b < c; ++b) {
    for (int t0 = 0; t0 < P; t0 += 16) {
      const int nt = std::min(16, P - t0);
      for (int c0 = 0; c0 < KD; c0 += 16) {
        __m512 r[16];
        for (int j = 0; j < 16; ++j) r[j] = _mm512_loadu_ps(src + b * bsrc + int64_t{c0 + j} * ld + t0);
        Transpose16(r);  // r[i]: position t0 + i, columns c0 ..
        for (int i = 0; i < nt; ++i) _mm512_storeu_ps(dst + (int64_t{t0 + i} * c + b) * KD + c0, r[i]);
      }
    }
  }
}
#endif

// Loss b's head-major block (src + b * bsrc: KD rows of ld, columns = positions) to rows (t, b) of KD values
// (dst row t * c + b), positions [0, P). The blocks' columns up to P rounded to 16 are read (ld covers them).
template <class F>
void HeadMajorToRows(const F* src, int P, int c, int KD, int ld, int64_t bsrc, F* dst) {
#if defined(__x86_64__)
  if constexpr (std::is_same_v<F, float>) {
    if (KD % 16 == 0 && UseAvx512()) return HeadMajorToRows512(src, P, c, KD, ld, bsrc, dst);
  }
#endif
  for (int t = 0; t < P; ++t) {
    for (int b = 0; b < c; ++b) {
      F* r = dst + (int64_t{t} * c + b) * KD;
      for (int col = 0; col < KD; ++col) r[col] = src[b * bsrc + int64_t{col} * ld + t];
    }
  }
}

// Flushes denormal results and inputs to zero while alive (x86 MXCSR FTZ + DAZ), restoring the caller's mode.
// Softmax tails multiply tiny probabilities into denormals, which cost ~100 cycles each: the attention backward
// ran 10x slower with them. Values below 1.2e-38 do not matter to a gradient.
class FlushDenormals {
 public:
#if defined(__x86_64__)
  FlushDenormals() : saved_(_mm_getcsr()) { _mm_setcsr(saved_ | 0x8040); }
  ~FlushDenormals() { _mm_setcsr(saved_); }

 private:
  unsigned saved_;
#endif
};

// m = silu(a1) a3, s1 = silu(a1), g1 = a3 silu'(a1) (for the SwiGLU backward of many token losses).
RAPIDIN_CLONES void SiluFactors(const float* a1, const float* a3, int64_t n, float* m, float* s1, float* g1) {
  for (int64_t i = 0; i < n; ++i) {
    const float sg = 1.0f / (1.0f + ExpF(-a1[i]));
    s1[i] = a1[i] * sg;
    m[i] = s1[i] * a3[i];
    g1[i] = a3[i] * sg * (1.0f + a1[i] * (1.0f - sg));
  }
}
void SiluFactors(const double* a1, const double* a3, int64_t n, double* m, double* s1, double* g1) {
  for (int64_t i = 0; i < n; ++i) {
    const double sg = 1.0 / (1.0 + std::exp(-a1[i]));
    s1[i] = a1[i] * sg;
    m[i] = s1[i] * a3[i];
    g1[i] = a3[i] * sg * (1.0 + a1[i] * (1.0 - sg));
  }
}
// Row t * c + b of dm (n values): da3 = dm s1_t, da1 = dm g1_t (da1 may be dm).
template <class F>
RAPIDIN_INLINE void SiluBackRowsBody(const F* s1, const F* g1, const F* dm, F* da1, F* da3, int P, int c, int n) {
  for (int t = 0; t < P; ++t) {
    const F *st = s1 + int64_t{t} * n, *gt = g1 + int64_t{t} * n;
    for (int b = 0; b < c; ++b) {
      const F* d = dm + (int64_t{t} * c + b) * n;
      F* a = da1 + (int64_t{t} * c + b) * n;
      F* e = da3 + (int64_t{t} * c + b) * n;
      for (int i = 0; i < n; ++i) {
        const F v = d[i];
        e[i] = v * st[i];
        a[i] = v * gt[i];
      }
    }
  }
}
RAPIDIN_CLONES void SiluBackRows(const float* s1, const float* g1, const float* dm, float* da1, float* da3, int P,
                                 int c, int n) {
  SiluBackRowsBody(s1, g1, dm, da1, da3, P, c, n);
}
void SiluBackRows(const double* s1, const double* g1, const double* dm, double* da1, double* da3, int P, int c,
                  int n) {
  SiluBackRowsBody(s1, g1, dm, da1, da3, P, c, n);
}

#if defined(__x86_64__)
// The feed-forward's input gradient for c losses from dm = dx W2 (before the SwiGLU factors), one position at a
// time: dh_(t, b) = sum_k dm_(t, b)[k] B_t[k], B_t[k] = g1_t[k] W1[k] + s1_t[k] W3[k] (rows of W1, W3: D values).
// B_t's rows are built in registers and shared by the position's c rows: half the multiply-adds of dm g1 W1 + dm
// s1 W3 as two products. Rows (t, b) with t > p0 + b (past loss b) are zero and written as zero. Tiles of up to 8
// rows x 32 columns.
template <int MB>
RAPIDIN_AVX512 RAPIDIN_INLINE void FfnTile(const float* dm, const float* g1, const float* s1, const float* w1,
                                           const float* w3, int Fh, int D, int n0, __mmask16 m0, __mmask16 m1,
                                           float* dh) {
  __m512 acc[MB][2];
#pragma GCC unroll 8
  for (int i = 0; i < MB; ++i) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
  for (int k = 0; k < Fh; ++k) {
    const float* r1 = w1 + int64_t{k} * D + n0;
    const float* r3 = w3 + int64_t{k} * D + n0;
    const __m512 g = _mm512_set1_ps(g1[k]), sg = _mm512_set1_ps(s1[k]);
    const __m512 b0 = _mm512_fmadd_ps(g, _mm512_maskz_loadu_ps(m0, r1), _mm512_mul_ps(sg, _mm512_maskz_loadu_ps(m0, r3)));
    const __m512 b1 =
        _mm512_fmadd_ps(g, _mm512_maskz_loadu_ps(m1, r1 + 16), _mm512_mul_ps(sg, _mm512_maskz_loadu_ps(m1, r3 + 16)));
#pragma GCC unroll 8
    for (int i = 0; i < MB; ++i) {
      const __m512 a = _mm512_set1_ps(dm[int64_t{i} * Fh + k]);
      acc[i][0] = _mm512_fmadd_ps(a, b0, acc[i][0]);
      acc[i][1] = _mm512_fmadd_ps(a, b1, acc[i][1]);
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < MB; ++i) {
    _mm512_mask_storeu_ps(dh + int64_t{i} * D + n0, m0, acc[i][0]);
    _mm512_mask_storeu_ps(dh + int64_t{i} * D + n0 + 16, m1, acc[i][1]);
  }
}

RAPIDIN_AVX512 void FfnInputGrad512(const float* dm, const float* g1, const float* s1, const float* w1,
                                    const float* w3, int P, int c, int p0, int Fh, int D, float* dh) {
  for (int t = 0; t < P; ++t) {
    const int b0 = std::max(0, t - p0);  // losses before b0 end before position t
    std::fill(dh + int64_t{t} * c * D, dh + (int64_t{t} * c + b0) * D, 0.0f);
    const float *gt = g1 + int64_t{t} * Fh, *st = s1 + int64_t{t} * Fh;
    for (int n0 = 0; n0 < D; n0 += 32) {
      const int w = std::min(32, D - n0);
      const __mmask16 m0 = w >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << w) - 1);
      const __mmask16 m1 = w >= 32 ? static_cast<__mmask16>(0xffff)
                                   : w > 16 ? static_cast<__mmask16>((1u << (w - 16)) - 1) : static_cast<__mmask16>(0);
      for (int b = b0; b < c; b += 8) {
        const int64_t row = int64_t{t} * c + b;
        const float* a = dm + row * Fh;
        float* out = dh + row * D;
        switch (std::min(8, c - b)) {
          case 8: FfnTile<8>(a, gt, st, w1, w3, Fh, D, n0, m0, m1, out); break;
          case 7: FfnTile<7>(a, gt, st, w1, w3, Fh, D, n0, m0, m1, out); break;
          case 6: FfnTile<6>(a, gt, st, w1, w3, Fh, D, n0, m0, m1, out); break;
          case 5: FfnTile<5>(a, gt, st, w1, w3, Fh, D, n0, m0, m1, out); break;
          case 4: FfnTile<4>(a, gt, st, w1, w3, Fh, D, n0, m0, m1, out); break;
          case 3: FfnTile<3>(a, gt, st, w1, w3, Fh, D, n0, m0, m1, out); break;
          case 2: FfnTile<2>(a, gt, st, w1, w3, Fh, D, n0, m0, m1, out); break;
          default: FfnTile<1>(a, gt, st, w1, w3, Fh, D, n0, m0, m1, out); break;
        }
      }
    }
  }
}
#endif

// A row of logits becomes its softmax p; returns -log p[target] (in double, from the shifted sum).
template <class F>
double SoftmaxRow(F* row, int V, int target) {
  F mx = row[0];
  for (int j = 1; j < V; ++j) mx = std::max(mx, row[j]);
  const F picked = row[target];
  const double sum = ExpShiftSum(row, mx, row, V);
  const F inv = static_cast<F>(1.0 / sum);
  for (int j = 0; j < V; ++j) row[j] *= inv;
  return static_cast<double>(mx) + std::log(sum) - picked;
}

// One thread's activations and temporaries; vectors keep their capacity from record to record.
template <class F>
struct Scratch {
  std::vector<F> x, x_in, h1, r1, q, k, v, kt, vt, att, oc, x_mid, h2, r2, a1, a3;  // forward (per layer where stored)
  std::vector<F> hf, rf, logits, dhf, dx, dh, dm, da1, da3, doc, dq, dk, dv, dkt, dvt, ds;
  std::vector<F> red;  // a token's weight-gradient block where it is reduced without AVX-512
};

template <class F>
Scratch<F>& ThreadScratch() {
  thread_local Scratch<F> s;
  return s;
}

// A thread keeps its scratch between calls only while it is small: a server has many handler threads, and a large
// model's attention probabilities alone are layers x heads x T^2 values.
template <class F>
void TrimScratch(Scratch<F>* S) {
  constexpr size_t kKeepBytes = size_t{256} << 20;
  std::vector<F>* all[] = {&S->x,  &S->x_in,   &S->h1,  &S->r1, &S->q,  &S->k,      &S->v,   &S->kt, &S->vt,
                           &S->att, &S->oc,    &S->x_mid, &S->h2, &S->r2, &S->a1,   &S->a3,  &S->hf, &S->rf,
                           &S->logits, &S->dhf, &S->dx, &S->dh, &S->dm, &S->da1, &S->da3,   &S->doc, &S->dq, &S->dk,
                           &S->dv, &S->dkt,    &S->dvt, &S->ds, &S->red};
  size_t bytes = 0;
  for (auto* v : all) bytes += v->capacity() * sizeof(F);
  if (bytes <= kKeepBytes) return;
  for (auto* v : all) std::vector<F>().swap(*v);
}

// n values of v, 64-byte aligned (whole AVX-512 vectors per padded row).
template <class F>
F* Sized(std::vector<F>* v, int64_t n) {
  constexpr int64_t kPad = 64 / sizeof(F);
  if (static_cast<int64_t>(v->size()) < n + kPad) v->resize(n + kPad);
  const uintptr_t a = reinterpret_cast<uintptr_t>(v->data());
  return reinterpret_cast<F*>((a + 63) & ~uintptr_t{63});
}

// y = x * r * g with r = 1 / sqrt(mean(x^2) + eps), rows of D.
template <class F>
void RmsNorm(const F* x, const F* g, int rows, int D, double eps, F* r, F* y) {
  for (int t = 0; t < rows; ++t) {
    const F* xt = x + int64_t{t} * D;
    double ss = 0;
    for (int d = 0; d < D; ++d) ss += static_cast<double>(xt[d]) * xt[d];
    const F rt = static_cast<F>(1.0 / std::sqrt(ss / D + eps));
    r[t] = rt;
    F* yt = y + int64_t{t} * D;
    for (int d = 0; d < D; ++d) yt[d] = xt[d] * rt * g[d];
  }
}

// dx += d(x r g)/dx^T dy: with u = g dy, dx += r u - x r^3 (u . x) / D.
template <class F>
RAPIDIN_INLINE void RmsNormBack(const F* x, const F* r, const F* g, const F* dy, int rows, int D, F* dx) {
  for (int t = 0; t < rows; ++t) {
    const F* xt = x + int64_t{t} * D;
    const F* dyt = dy + int64_t{t} * D;
    F* dxt = dx + int64_t{t} * D;
    double acc[8] = {};  // independent chains, so the cloned loops below vectorise
    int d = 0;
    for (; d + 8 <= D; d += 8) {
      for (int k = 0; k < 8; ++k) acc[k] += static_cast<double>(g[d + k]) * dyt[d + k] * xt[d + k];
    }
    for (; d < D; ++d) acc[0] += static_cast<double>(g[d]) * dyt[d] * xt[d];
    const double ux = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
    const F rt = r[t];
    const F c = static_cast<F>(ux * rt * rt * rt / D);
    for (d = 0; d < D; ++d) dxt[d] += rt * g[d] * dyt[d] - xt[d] * c;
  }
}

// RmsNormBack for a batch of token losses: row t * c + b (position t's x and r) for t < P, b < c; cloned for
// AVX-512 / AVX2 in float, as it runs on every row of every chunk.
template <class F>
RAPIDIN_INLINE void RmsNormBackRowsBody(const F* x, const F* r, const F* g, const F* dy, int P, int c, int D, F* dx) {
  for (int t = 0; t < P; ++t) {
    for (int b = 0; b < c; ++b) {
      const int64_t row = (int64_t{t} * c + b) * D;
      RmsNormBack(x + int64_t{t} * D, r + t, g, dy + row, 1, D, dx + row);
    }
  }
}
RAPIDIN_CLONES void RmsNormBackRows(const float* x, const float* r, const float* g, const float* dy, int P, int c,
                                    int D, float* dx) {
  RmsNormBackRowsBody(x, r, g, dy, P, c, D, dx);
}
void RmsNormBackRows(const double* x, const double* r, const double* g, const double* dy, int P, int c, int D,
                     double* dx) {
  RmsNormBackRowsBody(x, r, g, dy, P, c, D, dx);
}

#if defined(__x86_64__)
// Rope for head dimension 8 on AVX-512, rows of a multiple of 16 values: out[e] = x[e] c + x[partner(e)] (-+ s) per
// 8-value head, the partner e ^ 1 (pairs 2i, 2i + 1) or e ^ 4 (pairs i, i + 4), both in-register permutes; a
// position's coefficients are built once for its `per` rows.
RAPIDIN_AVX512 void Rope8(float* x, int rows, int width, const float* cos, const float* sin, bool half, bool inverse,
                          int per) {
  alignas(64) float cv[16], sv[16];
  for (int t0 = 0; t0 < rows; t0 += per) {
    const float* c = cos + int64_t{t0 / per} * 4;
    const float* sn = sin + int64_t{t0 / per} * 4;
    for (int l = 0; l < 16; ++l) {
      const int e = l % 8, i = half ? e % 4 : e / 2;
      const bool first = half ? e < 4 : e % 2 == 0;  // a of the pair (a, b): a' = a c - b s, b' = a s + b c
      cv[l] = c[i];
      sv[l] = (first != inverse) ? -sn[i] : sn[i];
    }
    const __m512 C = _mm512_load_ps(cv), S = _mm512_load_ps(sv);
    for (int t = t0; t < std::min(rows, t0 + per); ++t) {
      float* r = x + int64_t{t} * width;
      for (int w = 0; w < width; w += 16) {
        const __m512 v = _mm512_loadu_ps(r + w);
        const __m512 p = half ? _mm512_shuffle_f32x4(v, v, 0xB1) : _mm512_permute_ps(v, 0xB1);
        _mm512_storeu_ps(r + w, _mm512_fmadd_ps(p, S, _mm512_mul_ps(v, C)));
      }
    }
  }
}
#endif

// Rotary embedding in place on rows of nh heads of hd values; inverse rotates back (the backward pass). Row t is
// at position t / per (per > 1: a batch of token losses, `per` rows per position).
template <class F>
void Rope(F* x, int rows, int nh, int hd, const F* cos, const F* sin, bool half, bool inverse, int per = 1) {
#if defined(__x86_64__)
  if constexpr (std::is_same_v<F, float>) {
    if (hd == 8 && nh % 2 == 0 && UseAvx512()) return Rope8(x, rows, nh * hd, cos, sin, half, inverse, per);
  }
#endif
  const int h2 = hd / 2;
  for (int t = 0; t < rows; ++t) {
    const F* c = cos + int64_t{t / per} * h2;
    const F* s = sin + int64_t{t / per} * h2;
    for (int h = 0; h < nh; ++h) {
      F* v = x + (int64_t{t} * nh + h) * hd;
      for (int i = 0; i < h2; ++i) {
        F* a = half ? v + i : v + 2 * i;
        F* b = half ? v + i + h2 : v + 2 * i + 1;
        const F si = inverse ? -s[i] : s[i];
        const F x0 = *a, x1 = *b;
        *a = x0 * c[i] - x1 * si;
        *b = x0 * si + x1 * c[i];
      }
    }
  }
}


// Forward activations of one sequence of T positions (pointers into a Scratch's storage), per layer where stored.
template <class F>
struct Fwd {
  int T = 0, ld = 0;
  int64_t TD = 0, TF = 0, THD = 0, TKD = 0, TT = 0, KDL = 0;
  F *x, *x_in, *h1, *r1, *q, *k, *v, *kt, *vt, *att, *oc, *x_mid, *h2, *r2, *a1, *a3;
};

// The forward pass over positions [0, T): every layer's activations, and in A.x the final residual stream.
template <class F>
// top_from: the first position whose output the caller reads. The top layer computes its queries, attention, Wo
// and feed-forward rows for positions [top_from, T) only (its keys and values for all of them); its rows before
// top_from in oc, att, x_mid, h2, r2, a1, a3 and x are left as they were. A response loss starts at top_from =
// response_begin - 1, which saves about half the top layer on Alpaca's records (half their tokens are the prompt).
Fwd<F> Forward(const LlamaShape& s, const LlamaWeights<F>& w, const int32_t* ids, int T, Scratch<F>* S,
               int top_from = 0) {
  const int D = s.dim, Fh = s.hidden, L = s.layers, H = s.heads, KV = s.kv_heads, hd = s.head_dim;
  const int HD = H * hd, KD = KV * hd, group = H / KV;
  const F scale = static_cast<F>(1.0 / std::sqrt(static_cast<double>(hd)));
  Fwd<F> A;
  A.T = T;
  A.ld = (T + 15) / 16 * 16;  // head-major rows and attention rows, padded to whole 16-value chunks
  const int ld = A.ld;
  const int64_t TD = A.TD = int64_t{T} * D, TF = A.TF = int64_t{T} * Fh, THD = A.THD = int64_t{T} * HD;
  const int64_t TKD = A.TKD = int64_t{T} * KD, TT = A.TT = int64_t{T} * ld, KDL = A.KDL = int64_t{KD} * ld;
  F* x = A.x = Sized(&S->x, TD);
  A.x_in = Sized(&S->x_in, L * TD);
  A.h1 = Sized(&S->h1, L * TD);
  A.r1 = Sized(&S->r1, int64_t{L} * T);
  A.q = Sized(&S->q, L * THD);
  A.k = Sized(&S->k, L * TKD);
  A.v = Sized(&S->v, L * TKD);
  A.kt = Sized(&S->kt, L * KDL);  // k and v head-major: [KV][hd][ld]
  A.vt = Sized(&S->vt, L * KDL);
  A.att = Sized(&S->att, L * H * TT);
  A.oc = Sized(&S->oc, L * THD);
  A.x_mid = Sized(&S->x_mid, L * TD);
  A.h2 = Sized(&S->h2, L * TD);
  A.r2 = Sized(&S->r2, int64_t{L} * T);
  A.a1 = Sized(&S->a1, L * TF);
  A.a3 = Sized(&S->a3, L * TF);
  F* m = Sized(&S->dm, TF);
  for (int t = 0; t < T; ++t) std::memcpy(x + int64_t{t} * D, w.emb + int64_t{ids[t]} * D, D * sizeof(F));
  for (int l = 0; l < L; ++l) {
    const auto& lw = w.layers[l];
    F *xi = A.x_in + l * TD, *hl = A.h1 + l * TD, *ql = A.q + l * THD, *kl = A.k + l * TKD, *vl = A.v + l * TKD;
    F *al = A.att + l * H * TT, *ol = A.oc + l * THD;
    const int from = l == L - 1 ? top_from : 0, Tf = T - from;  // rows [from, T) past the keys and values
    const int64_t fD = int64_t{from} * D, fF = int64_t{from} * Fh, fHD = int64_t{from} * HD;
    std::memcpy(xi, x, TD * sizeof(F));
    RmsNorm(x, lw.attn_norm, T, D, s.norm_eps, A.r1 + int64_t{l} * T, hl);
    Gemm<F>(false, true, Tf, HD, D, hl + fD, D, lw.wq, D, 0, ql + fHD, HD);
    Gemm<F>(false, true, T, KD, D, hl, D, lw.wk, D, 0, kl, KD);
    Gemm<F>(false, true, T, KD, D, hl, D, lw.wv, D, 0, vl, KD);
    Rope(ql + fHD, Tf, H, hd, w.cos + int64_t{from} * (hd / 2), w.sin + int64_t{from} * (hd / 2), s.rope_half, false);
    Rope(kl, T, KV, hd, w.cos, w.sin, s.rope_half, false);
    F *ktl = A.kt + l * KDL, *vtl = A.vt + l * KDL;
    ToHeadMajor(kl, T, KV, hd, ld, ktl);
    ToHeadMajor(vl, T, KV, hd, ld, vtl);
    for (int h = 0; h < H; ++h) {
      const int64_t go = int64_t{h / group} * hd * ld;
      AttnForward(ql + h * hd, HD, ktl + go, vtl + go, from, T, ld, hd, scale, al + h * TT, ol + h * hd, HD);
    }
    Gemm<F>(false, true, Tf, D, HD, ol + fHD, HD, lw.wo, HD, 1, x + fD, D);
    F *xm = A.x_mid + l * TD, *h2l = A.h2 + l * TD, *a1l = A.a1 + l * TF, *a3l = A.a3 + l * TF;
    std::memcpy(xm + fD, x + fD, (TD - fD) * sizeof(F));
    RmsNorm(x + fD, lw.ffn_norm, Tf, D, s.norm_eps, A.r2 + int64_t{l} * T + from, h2l + fD);
    Gemm<F>(false, true, Tf, Fh, D, h2l + fD, D, lw.w1, D, 0, a1l + fF, Fh);
    Gemm<F>(false, true, Tf, Fh, D, h2l + fD, D, lw.w3, D, 0, a3l + fF, Fh);
    SiluMul(a1l + fF, a3l + fF, m + fF, TF - fF);
    Gemm<F>(false, true, Tf, D, Fh, m + fF, Fh, lw.w2, Fh, 1, x + fD, D);
  }
  return A;
}

#if defined(__x86_64__)
// One k step of the register tiles (RowTile, ReduceTile): acc[i][z] += a[i * as] b[16 z ...] for MB rows and NZ vectors of 16
// columns (the last one masked by `last`).
template <int NZ, int MB>
RAPIDIN_AVX512 RAPIDIN_INLINE void TileStep(const float* a, int64_t as, const float* b, __mmask16 last,
                                            __m512 (&acc)[MB][NZ]) {
  __m512 bv[NZ];
#pragma GCC unroll 4
  for (int z = 0; z < NZ; ++z) bv[z] = z == NZ - 1 ? _mm512_maskz_loadu_ps(last, b + 16 * z) : _mm512_loadu_ps(b + 16 * z);
#pragma GCC unroll 8
  for (int i = 0; i < MB; ++i) {
    const __m512 av = _mm512_set1_ps(a[i * as]);
#pragma GCC unroll 4
    for (int z = 0; z < NZ; ++z) acc[i][z] = _mm512_fmadd_ps(av, bv[z], acc[i][z]);
  }
}
#endif

#if defined(__x86_64__)
// C = sum_p A_p B_p for up to three products (A_p: rows of K_p values, stride lda; B_p: K_p rows of N values,
// stride ldb), C written (rows of N, stride ldc): the token pass's input gradients (M = positions x losses, N and K
// the model's widths), where BLAS spent a zeroing sweep, packing and a second pass over C for each extra product.
// Tiles of 6 rows x 64 columns held in registers over every product's k.
struct RowProduct {
  const float* a;
  int64_t lda;
  const float* b;
  int64_t ldb;
  int k;
};

template <int NZ, int MB>
RAPIDIN_AVX512 RAPIDIN_INLINE void RowTile(const RowProduct* pr, int np, int64_t r0, int n0, __mmask16 last, float* C,
                                           int64_t ldc) {
  __m512 acc[MB][NZ];
#pragma GCC unroll 8
  for (int i = 0; i < MB; ++i) {
#pragma GCC unroll 4
    for (int z = 0; z < NZ; ++z) acc[i][z] = _mm512_setzero_ps();
  }
  for (int p = 0; p < np; ++p) {
    const float* a = pr[p].a + r0 * pr[p].lda;
    const float* b = pr[p].b + n0;
    for (int k = 0; k < pr[p].k; ++k, b += pr[p].ldb) TileStep<NZ, MB>(a + k, pr[p].lda, b, last, acc);
  }
#pragma GCC unroll 8
  for (int i = 0; i < MB; ++i) {
#pragma GCC unroll 4
    for (int z = 0; z < NZ; ++z) {
      float* c = C + (r0 + i) * ldc + n0 + 16 * z;
      if (z == NZ - 1) {
        _mm512_mask_storeu_ps(c, last, acc[i][z]);
      } else {
        _mm512_storeu_ps(c, acc[i][z]);
      }
    }
  }
}

template <int NZ>
RAPIDIN_AVX512 void RowPanel(const RowProduct* pr, int np, int64_t M, int n0, __mmask16 last, float* C,
                             int64_t ldc) {
  int64_t r = 0;
  for (; r + 6 <= M; r += 6) RowTile<NZ, 6>(pr, np, r, n0, last, C, ldc);
  for (; r < M; ++r) RowTile<NZ, 1>(pr, np, r, n0, last, C, ldc);
}

RAPIDIN_AVX512 void RowProducts512(const RowProduct* pr, int np, int64_t M, int N, float* C, int64_t ldc) {
  for (int n0 = 0; n0 < N; n0 += 64) {
    const int w = std::min(64, N - n0), nz = (w + 15) / 16, rem = w - (nz - 1) * 16;
    const __mmask16 last = rem == 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << rem) - 1);
    switch (nz) {
      case 4: RowPanel<4>(pr, np, M, n0, last, C, ldc); break;
      case 3: RowPanel<3>(pr, np, M, n0, last, C, ldc); break;
      case 2: RowPanel<2>(pr, np, M, n0, last, C, ldc); break;
      default: RowPanel<1>(pr, np, M, n0, last, C, ldc); break;
    }
  }
}
#endif

// C (M x N, contiguous) = A_0 B_0 + ... for np <= 3 products (A_p: M x K_p, contiguous; B_p: K_p x N, contiguous):
// RowProducts512 on float with AVX-512, else one BLAS product each.
template <class F>
void RowProducts(int np, const F* const* a, const F* const* b, const int* k, int64_t M, int N, F* C) {
#if defined(__x86_64__)
  if constexpr (std::is_same_v<F, float>) {
    if (UseAvx512()) {
      RowProduct pr[3];
      for (int p = 0; p < np; ++p) pr[p] = {a[p], k[p], b[p], N, k[p]};
      return RowProducts512(pr, np, M, N, C, N);
    }
  }
#endif
  for (int p = 0; p < np; ++p) {
    Gemm<F>(false, false, static_cast<int>(M), N, k[p], a[p], k[p], b[p], N, p ? F(1) : F(0), C, N);
  }
}

}  // namespace

namespace {
template <class F>
RAPIDIN_INLINE void BlockDotNormBody(const F* g, const double* pre, const double* u, int64_t n, double* dot,
                                     double* ss) {
  double s[8] = {}, d[8] = {};  // independent chains: not latency-bound
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    for (int k = 0; k < 8; ++k) {
      const double v = pre ? g[j + k] * pre[j + k] : static_cast<double>(g[j + k]);
      s[k] += v * v;
      d[k] += u ? v * u[j + k] : 0.0;
    }
  }
  for (; j < n; ++j) {
    const double v = pre ? g[j] * pre[j] : static_cast<double>(g[j]);
    s[0] += v * v;
    d[0] += u ? v * u[j] : 0.0;
  }
  *ss = ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
  *dot = ((d[0] + d[1]) + (d[2] + d[3])) + ((d[4] + d[5]) + (d[6] + d[7]));
}
}  // namespace

RAPIDIN_CLONES void BlockDotNorm(const float* g, const double* pre, const double* u, int64_t n, double* dot,
                                 double* ss) {
  BlockDotNormBody(g, pre, u, n, dot, ss);
}
void BlockDotNorm(const double* g, const double* pre, const double* u, int64_t n, double* dot, double* ss) {
  BlockDotNormBody(g, pre, u, n, dot, ss);
}

namespace {

#if defined(__x86_64__)
// The weight gradient of one token, G = sum_t a_t^T b_t (a_t: M values at a + t lda, b_t: N at b + t ldb, t < kb),
// one tile of MB rows x NZ vectors of 16 columns (from m0, n0; `last` masks the final vector) held in registers
// over t, then reduced into the double accumulators: ss += (P G)^2, dot += P G u. Never written: the written
// blocks cost a zeroing pass, a store and a reload of c x M x N values per chunk (BLAS's beta = 0 sweep included).
// kWrite: G's tile stored to out (rows of N) instead (the caching pass and the written token blocks).
template <int NZ, int MB, bool kPre, bool kWrite = false>
RAPIDIN_AVX512 RAPIDIN_INLINE void ReduceTile(const float* a, int64_t lda, const float* b, int64_t ldb, int kb,
                                              int m0, int n0, int N, __mmask16 last, const double* u,
                                              const double* pre, __m512d* ss, __m512d* dot, float* out = nullptr) {
  __m512 acc[MB][NZ];
#pragma GCC unroll 8
  for (int i = 0; i < MB; ++i) {
#pragma GCC unroll 4
    for (int z = 0; z < NZ; ++z) acc[i][z] = _mm512_setzero_ps();
  }
  a += m0;
  b += n0;
  for (int t = 0; t < kb; ++t, a += lda, b += ldb) TileStep<NZ, MB>(a, 1, b, last, acc);
  // Every loop over the accumulators is unrolled: one indexed at run time would keep them in memory.
  if (kWrite) {
#pragma GCC unroll 8
    for (int i = 0; i < MB; ++i) {
      float* r = out + int64_t{m0 + i} * N + n0;
#pragma GCC unroll 4
      for (int z = 0; z < NZ; ++z) {
        if (z == NZ - 1) {
          _mm512_mask_storeu_ps(r + 16 * z, last, acc[i][z]);
        } else {
          _mm512_storeu_ps(r + 16 * z, acc[i][z]);
        }
      }
    }
    return;
  }
#pragma GCC unroll 8
  for (int i = 0; i < MB; ++i) {
    const int64_t row = int64_t{m0 + i} * N + n0;
#pragma GCC unroll 4
    for (int z = 0; z < NZ; ++z) {
      const __mmask8 lo = z == NZ - 1 ? static_cast<__mmask8>(last & 0xff) : 0xff;
      const __mmask8 hi = z == NZ - 1 ? static_cast<__mmask8>(last >> 8) : 0xff;
      __m512d v0 = _mm512_cvtps_pd(_mm512_castps512_ps256(acc[i][z]));
      __m512d v1 = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(acc[i][z]), 1)));
      if (kPre) {  // masked lanes load 0: v stays 0 there
        v0 = _mm512_mul_pd(v0, _mm512_maskz_loadu_pd(lo, pre + row + 16 * z));
        v1 = _mm512_mul_pd(v1, _mm512_maskz_loadu_pd(hi, pre + row + 16 * z + 8));
      }
      ss[0] = _mm512_fmadd_pd(v0, v0, ss[0]);
      ss[1] = _mm512_fmadd_pd(v1, v1, ss[1]);
      dot[0] = _mm512_fmadd_pd(v0, _mm512_maskz_loadu_pd(lo, u + row + 16 * z), dot[0]);
      dot[1] = _mm512_fmadd_pd(v1, _mm512_maskz_loadu_pd(hi, u + row + 16 * z + 8), dot[1]);
    }
  }
}

// One panel of up to 64 columns, every row of G: tiles of 6 rows (24 accumulators), the remainder in one tile.
template <int NZ, bool kPre, bool kWrite>
RAPIDIN_AVX512 void ReducePanel(const float* a, int64_t lda, const float* b, int64_t ldb, int kb, int M, int n0,
                                int N, __mmask16 last, const double* u, const double* pre, __m512d* ss,
                                __m512d* dot, float* out) {
  int m0 = 0;
  for (; m0 + 6 <= M; m0 += 6) {
    ReduceTile<NZ, 6, kPre, kWrite>(a, lda, b, ldb, kb, m0, n0, N, last, u, pre, ss, dot, out);
  }
  switch (M - m0) {
    case 5: return ReduceTile<NZ, 5, kPre, kWrite>(a, lda, b, ldb, kb, m0, n0, N, last, u, pre, ss, dot, out);
    case 4: return ReduceTile<NZ, 4, kPre, kWrite>(a, lda, b, ldb, kb, m0, n0, N, last, u, pre, ss, dot, out);
    case 3: return ReduceTile<NZ, 3, kPre, kWrite>(a, lda, b, ldb, kb, m0, n0, N, last, u, pre, ss, dot, out);
    case 2: return ReduceTile<NZ, 2, kPre, kWrite>(a, lda, b, ldb, kb, m0, n0, N, last, u, pre, ss, dot, out);
    case 1: return ReduceTile<NZ, 1, kPre, kWrite>(a, lda, b, ldb, kb, m0, n0, N, last, u, pre, ss, dot, out);
    default: return;
  }
}

template <bool kPre, bool kWrite = false>
RAPIDIN_AVX512 void ReduceBlock512(const float* a, int64_t lda, const float* b, int64_t ldb, int kb, int M, int N,
                                   const double* u, const double* pre, double* dot, double* ss,
                                   float* out = nullptr) {
  __m512d s2[2] = {_mm512_setzero_pd(), _mm512_setzero_pd()}, d2[2] = {_mm512_setzero_pd(), _mm512_setzero_pd()};
  for (int n0 = 0; n0 < N; n0 += 64) {
    const int w = std::min(64, N - n0), nz = (w + 15) / 16, rem = w - (nz - 1) * 16;
    const __mmask16 last = rem == 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << rem) - 1);
    switch (nz) {
      case 4: ReducePanel<4, kPre, kWrite>(a, lda, b, ldb, kb, M, n0, N, last, u, pre, s2, d2, out); break;
      case 3: ReducePanel<3, kPre, kWrite>(a, lda, b, ldb, kb, M, n0, N, last, u, pre, s2, d2, out); break;
      case 2: ReducePanel<2, kPre, kWrite>(a, lda, b, ldb, kb, M, n0, N, last, u, pre, s2, d2, out); break;
      default: ReducePanel<1, kPre, kWrite>(a, lda, b, ldb, kb, M, n0, N, last, u, pre, s2, d2, out); break;
    }
  }
  if (kWrite) return;
  *ss = _mm512_reduce_add_pd(_mm512_add_pd(s2[0], s2[1]));
  *dot = _mm512_reduce_add_pd(_mm512_add_pd(d2[0], d2[1]));
}
#endif

// A weight gradient written: G = sum_{t < kb} a_t^T b_t (M x N, rows of N at out), the register tiles above on
// float with AVX-512 (no zeroing sweep, no packing), else BLAS.
template <class F>
void WeightGrad(const F* a, int64_t lda, const F* b, int64_t ldb, int kb, int M, int N, F* out) {
#if defined(__x86_64__)
  if constexpr (std::is_same_v<F, float>) {
    if (UseAvx512()) return ReduceBlock512<false, true>(a, lda, b, ldb, kb, M, N, nullptr, nullptr, nullptr, nullptr, out);
  }
#endif
  Gemm<F>(true, false, M, N, kb, a, static_cast<int>(lda), b, static_cast<int>(ldb), 0, out, N);
}

// A token's weight gradient reduced against a target: G = sum_{t < kb} a_t^T b_t (rows of a: M values, stride
// lda; of b: N values, stride ldb), (dot, ss) as BlockDotNorm gives them on G. `block`: M x N scratch values for
// the portable form (G written, then reduced).
template <class F>
void ReduceWeightGrad(const F* a, int64_t lda, const F* b, int64_t ldb, int kb, int M, int N, const LlamaTarget& t,
                      int slot, std::vector<F>* block) {
#if defined(__x86_64__)
  if constexpr (std::is_same_v<F, float>) {
    if (UseAvx512()) {
      return t.pre ? ReduceBlock512<true>(a, lda, b, ldb, kb, M, N, t.u, t.pre, t.dot + slot, t.ss + slot)
                   : ReduceBlock512<false>(a, lda, b, ldb, kb, M, N, t.u, t.pre, t.dot + slot, t.ss + slot);
    }
  }
#endif
  F* g = Sized(block, int64_t{M} * N);
  WeightGrad<F>(a, lda, b, ldb, kb, M, N, g);
  BlockDotNorm(g, t.pre, t.u, int64_t{M} * N, t.dot + slot, t.ss + slot);
}

}  // namespace

template <class F>
double LlamaLossGradient(const LlamaShape& s, const LlamaWeights<F>& w, const int32_t* ids, int n,
                         int response_begin, const double* loss_weights, const LlamaGrads<F>& grads) {
  FlushDenormals ftz;
  Scratch<F>& S = ThreadScratch<F>();
  const int D = s.dim, Fh = s.hidden, L = s.layers, H = s.heads, KV = s.kv_heads, hd = s.head_dim, V = s.vocab;
  const int HD = H * hd, KD = KV * hd, group = H / KV;
  const int T = n - 1;                 // positions that predict a token; the last one predicts nothing
  const int p0 = response_begin - 1;   // first position in the loss
  const int R = T - p0;                // positions in the loss
  const F scale = static_cast<F>(1.0 / std::sqrt(static_cast<double>(hd)));
  const Fwd<F> A = Forward(s, w, ids, T, &S, p0);  // the top layer's rows before p0 reach no loss
  const int ld = A.ld;
  const int64_t TD = A.TD, TF = A.TF, THD = A.THD, TKD = A.TKD, TT = A.TT, KDL = A.KDL;
  F *x = A.x, *x_in = A.x_in, *h1 = A.h1, *r1 = A.r1, *q = A.q, *k = A.k, *v = A.v, *kt = A.kt, *vt = A.vt;
  F *att = A.att, *oc = A.oc, *x_mid = A.x_mid, *h2 = A.h2, *r2 = A.r2, *a1 = A.a1, *a3 = A.a3;
  F* m = Sized(&S.dm, TF);  // silu(a1) a3; the backward's dm reuses it
  F* hf = Sized(&S.hf, int64_t{R} * D);
  F* rf = Sized(&S.rf, R);
  F* logits = Sized(&S.logits, int64_t{R} * V);

  const F* xf = x + int64_t{p0} * D;
  RmsNorm(xf, w.final_norm, R, D, s.norm_eps, rf, hf);
  Gemm<F>(false, true, R, V, D, hf, D, w.head, D, 0, logits, V);

  // ---- loss; logits become dL/dlogits ----
  double wsum = 0;
  for (int i = 0; i < R; ++i) wsum += loss_weights ? loss_weights[i] : 1.0;
  double loss = 0;
  for (int i = 0; i < R; ++i) {
    F* row = logits + int64_t{i} * V;
    const int target = ids[response_begin + i];
    const double wi = (loss_weights ? loss_weights[i] : 1.0) / wsum;
    loss += wi * SoftmaxRow(row, V, target);
    for (int j = 0; j < V; ++j) row[j] *= static_cast<F>(wi);
    row[target] -= static_cast<F>(wi);
  }

  // ---- backward ----
  F* dhf = Sized(&S.dhf, int64_t{R} * D);
  F* dx = Sized(&S.dx, TD);
  F* dh = Sized(&S.dh, TD);
  F* dm = m;
  F* da3 = Sized(&S.da3, TF);
  F* doc = Sized(&S.doc, THD);
  F* dq = Sized(&S.dq, THD);
  F* dk = Sized(&S.dk, TKD);
  F* dv = Sized(&S.dv, TKD);
  F* dkt = Sized(&S.dkt, KDL);
  F* dvt = Sized(&S.dvt, KDL);
  F* ds = Sized(&S.ds, AttnScratch(hd, ld));
  Gemm<F>(false, false, R, D, V, logits, V, w.head, D, 0, dhf, D);
  if (grads.head) Gemm<F>(true, false, V, D, R, logits, V, hf, D, 0, grads.head, D);
  std::fill(dx, dx + TD, F(0));
  RmsNormBack(xf, rf, w.final_norm, dhf, R, D, dx + int64_t{p0} * D);
  for (int l = L - 1; l >= 0; --l) {
    const auto& lw = w.layers[l];
    const auto* gl = l < static_cast<int>(grads.layers.size()) ? &grads.layers[l] : nullptr;
    F *xi = x_in + l * TD, *hl = h1 + l * TD, *ql = q + l * THD, *kl = k + l * TKD, *vl = v + l * TKD;
    F *al = att + l * H * TT, *ol = oc + l * THD;
    F *xm = x_mid + l * TD, *h2l = h2 + l * TD, *a1l = a1 + l * TF, *a3l = a3 + l * TF;
    // In the top layer only rows [p0, T) have an output gradient (Forward skipped the others past its keys and
    // values); below it every row has one.
    const int from = l == L - 1 ? p0 : 0, Tf = T - from;
    const int64_t fD = int64_t{from} * D, fF = int64_t{from} * Fh, fHD = int64_t{from} * HD;
    const F* dxf = dx + fD;
    // feed-forward: x += (silu(a1) a3) W2^T
    if (gl && gl->w2) {
      SiluMul(a1l + fF, a3l + fF, m + fF, TF - fF);
      WeightGrad<F>(dxf, D, m + fF, Fh, Tf, D, Fh, gl->w2);
    }
    RowProducts<F>(1, &dxf, &lw.w2, &D, Tf, Fh, dm + fF);
    SiluMulBack(a1l + fF, a3l + fF, dm + fF, da3 + fF, TF - fF);  // dm becomes da1
    if (gl && gl->w1) WeightGrad<F>(dm + fF, Fh, h2l + fD, D, Tf, Fh, D, gl->w1);
    if (gl && gl->w3) WeightGrad<F>(da3 + fF, Fh, h2l + fD, D, Tf, Fh, D, gl->w3);
    {
      const F* as[2] = {dm + fF, da3 + fF};
      const F* bs[2] = {lw.w1, lw.w3};
      const int ks[2] = {Fh, Fh};
      RowProducts<F>(2, as, bs, ks, Tf, D, dh + fD);
    }
    RmsNormBack(xm + fD, r2 + int64_t{l} * T + from, lw.ffn_norm, dh + fD, Tf, D, dx + fD);
    // attention: x += oc Wo^T
    if (gl && gl->wo) WeightGrad<F>(dxf, D, ol + fHD, HD, Tf, D, HD, gl->wo);
    RowProducts<F>(1, &dxf, &lw.wo, &D, Tf, HD, doc + fHD);
    F *ktl = kt + l * KDL, *vtl = vt + l * KDL;
    std::fill(dkt, dkt + KDL, F(0));
    std::fill(dvt, dvt + KDL, F(0));
    std::fill(dq, dq + fHD, F(0));  // the rows' dq is zero (the row kernel leaves it unwritten)
    for (int h = 0; h < H; ++h) {
      const int64_t go = int64_t{h / group} * hd * ld;
      AttnBackward(ql + h * hd, HD, ol + h * hd, ktl + go, vtl + go, al + h * TT, doc + h * hd, HD, from, T, ld, hd,
                   scale, dq + h * hd, HD, dkt + go, dvt + go, ds);
    }
    HeadMajorToRows(dkt, T, 1, KD, ld, 0, dk);
    HeadMajorToRows(dvt, T, 1, KD, ld, 0, dv);
    Rope(dq + fHD, Tf, H, hd, w.cos + int64_t{from} * (hd / 2), w.sin + int64_t{from} * (hd / 2), s.rope_half, true);
    Rope(dk, T, KV, hd, w.cos, w.sin, s.rope_half, true);
    if (gl && gl->wq) WeightGrad<F>(dq + fHD, HD, hl + fD, D, Tf, HD, D, gl->wq);
    if (gl && gl->wk) WeightGrad<F>(dk, KD, hl, D, T, KD, D, gl->wk);
    if (gl && gl->wv) WeightGrad<F>(dv, KD, hl, D, T, KD, D, gl->wv);
    {
      const F* as[3] = {dq, dk, dv};
      const F* bs[3] = {lw.wq, lw.wk, lw.wv};
      const int ks[3] = {HD, KD, KD};
      RowProducts<F>(3, as, bs, ks, T, D, dh);
    }
    RmsNormBack(xi, r1 + int64_t{l} * T, lw.attn_norm, dh, T, D, dx);
  }
  if (grads.emb) {
    if (grads.emb != grads.head) std::fill(grads.emb, grads.emb + int64_t{V} * D, F(0));
    for (int t = 0; t < T; ++t) {
      F* e = grads.emb + int64_t{ids[t]} * D;
      const F* d = dx + int64_t{t} * D;
      for (int j = 0; j < D; ++j) e[j] += d[j];
    }
  }
  TrimScratch(&S);
  return loss;
}

template <class F>
struct LlamaTokenPass<F>::State {
  LlamaShape s;
  LlamaWeights<F> w;
  std::vector<int32_t> ids;
  Scratch<F> storage;  // the forward activations
  Fwd<F> A;
  std::vector<F> rf, hf;  // the final norm's rsqrt and output at every position
  // Per layer and position, silu(a1) a3 (the w2 input) and the SwiGLU backward's factors: da3 = dm silu(a1),
  // da1 = dm a3 silu'(a1). Computed once, not in every chunk's backward.
  std::vector<F> m, s1, g1;
  // Below the top layer, per layer and head: AttnRowMoments8 of every row (float, head dimension 8, AVX-512), so
  // that the chunks' dq needs no per-key work; empty otherwise.
  std::vector<float> mkv;
};

// Token passes come and go with the records; each one's forward activations (tens of MB for a long record) go to
// the next pass instead of being unmapped and faulted in again (a demo query took ~100k page faults).
template <class F>
struct LlamaTokenPass<F>::Kept {
  Mutex mu;
  std::vector<std::unique_ptr<State>> states;
  static Kept& Get() {
    static Kept* const k = new Kept;
    return *k;
  }
};

template <class F>
size_t LlamaTokenPass<F>::StateBytes(const State& st) {
  const Scratch<F>& S = st.storage;
  size_t n = 0;
  for (const std::vector<F>* v : {&S.x, &S.x_in, &S.h1, &S.r1, &S.q, &S.k, &S.v, &S.kt, &S.vt, &S.att, &S.oc,
                                  &S.x_mid, &S.h2, &S.r2, &S.a1, &S.a3, &st.rf, &st.hf, &st.m, &st.s1, &st.g1}) {
    n += v->capacity() * sizeof(F);
  }
  return n + st.mkv.capacity() * sizeof(float);
}

template <class F>
LlamaTokenPass<F>::LlamaTokenPass(const LlamaShape& s, const LlamaWeights<F>& w, const int32_t* ids, int n) {
  {
    Kept& k = Kept::Get();
    MutexLock lock(&k.mu);
    if (!k.states.empty()) {
      st_ = std::move(k.states.back());
      k.states.pop_back();
    }
  }
  if (!st_) st_ = std::make_unique<State>();
  FlushDenormals ftz;
  State& st = *st_;
  st.mkv.clear();  // a kept state's moments belong to its previous record
  st.s = s;
  st.w = w;
  st.ids.assign(ids, ids + n);
  st.A = Forward(s, w, st.ids.data(), n - 1, &st.storage);
  st.rf.resize(n - 1);
  st.hf.resize(static_cast<size_t>(n - 1) * s.dim);
  RmsNorm(st.A.x, w.final_norm, n - 1, s.dim, s.norm_eps, st.rf.data(), st.hf.data());
  const int64_t all = int64_t{s.layers} * st.A.TF;
  st.m.resize(all);
  st.s1.resize(all);
  st.g1.resize(all);
  SiluFactors(st.A.a1, st.A.a3, all, st.m.data(), st.s1.data(), st.g1.data());
#if defined(__x86_64__)
  if constexpr (std::is_same_v<F, float>) {
    const Fwd<F>& A = st.A;
    if (s.head_dim == 8 && UseAvx512() && A.T >= 16 && s.layers > 1) {
      const int H = s.heads, group = s.heads / s.kv_heads;
      const int64_t per = int64_t{A.T} * 80;
      std::vector<float> kv(static_cast<size_t>(per) + 16);
      float* kva = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(kv.data()) + 63) & ~uintptr_t{63});
      st.mkv.resize(static_cast<size_t>((s.layers - 1) * H * per) + 16);
      float* out = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(st.mkv.data()) + 63) & ~uintptr_t{63});
      for (int l = 0; l + 1 < s.layers; ++l) {
        for (int h = 0; h < H; ++h) {
          const int64_t go = l * A.KDL + int64_t{h / group} * 8 * A.ld;
          AttnRowMoments8(A.kt + go, A.vt + go, A.att + (int64_t{l} * H + h) * A.TT, A.T, A.ld, kva,
                          out + (int64_t{l} * H + h) * per);
        }
      }
    }
  }
#endif
}

template <class F>
LlamaTokenPass<F>::~LlamaTokenPass() {
  constexpr size_t kStates = 4, kBytes = size_t{512} << 20;  // enough for the concurrent passes of two queries
  if (!st_ || StateBytes(*st_) > kBytes) return;
  Kept& k = Kept::Get();
  MutexLock lock(&k.mu);
  if (k.states.size() < kStates) k.states.push_back(std::move(st_));
}

template <class F>
void LlamaTokenPass<F>::Backward(int s0, int s1, const LlamaGrads<F>& g, const BlockDone& done) const {
  Run(s0, s1, &g, nullptr, done);
}

template <class F>
void LlamaTokenPass<F>::Backward(int s0, int s1, const LlamaTargets& targets) const {
  Run(s0, s1, nullptr, &targets, nullptr);
}

// One backward pass of the chunk's losses; each weight gradient either written to grads' blocks or reduced
// against targets' (exactly one of the two is set).
template <class F>
void LlamaTokenPass<F>::Run(int s0, int s1, const LlamaGrads<F>* gp, const LlamaTargets* tp,
                            const BlockDone& done) const {
  static const LlamaGrads<F> kNone;
  const LlamaGrads<F>& g = gp ? *gp : kNone;
  auto finished = [&](const F* buffer) {
    if (done && buffer) done(buffer);
  };
  FlushDenormals ftz;
  const State& st = *st_;
  const LlamaShape& s = st.s;
  const LlamaWeights<F>& w = st.w;
  const Fwd<F>& A = st.A;
  const int32_t* ids = st.ids.data();
  const int D = s.dim, Fh = s.hidden, L = s.layers, H = s.heads, KV = s.kv_heads, hd = s.head_dim, V = s.vocab;
  const int HD = H * hd, KD = KV * hd, group = H / KV;
  const F scale = static_cast<F>(1.0 / std::sqrt(static_cast<double>(hd)));
  // Token s0 + b's loss sits at position p0 + b; rows [0, P) cover every position any of them sees. Row t * c + b
  // holds loss b's gradient at position t (zero past p0 + b, where causality keeps it).
  const int c = s1 - s0, p0 = s0 - 1, P = s1 - 1;
  const int ld = A.ld;
  const int64_t PC = int64_t{P} * c, TD = A.TD, TF = A.TF, THD = A.THD, TKD = A.TKD, TT = A.TT, KDL = A.KDL;
  Scratch<F>& S = ThreadScratch<F>();  // temporaries only
  F* logits = Sized(&S.logits, int64_t{c} * V);
  F* dhf = Sized(&S.dhf, int64_t{c} * D);
  F* dx = Sized(&S.dx, PC * D);
  F* dh = Sized(&S.dh, PC * D);
  F* dm = Sized(&S.dm, PC * Fh);
  F* da3 = Sized(&S.da3, PC * Fh);
  F* doc = Sized(&S.doc, PC * HD);
  F* dq = Sized(&S.dq, PC * HD);
  F* dk = Sized(&S.dk, PC * KD);
  F* dv = Sized(&S.dv, PC * KD);
  F* dkt = Sized(&S.dkt, c * KDL);
  F* dvt = Sized(&S.dvt, c * KDL);
  F* ds = Sized(&S.ds, AttnScratch(hd, ld, c));
  const F* hf = st.hf.data() + int64_t{p0} * D;
  // head: one loss per token, weight 1
  Gemm<F>(false, true, c, V, D, hf, D, w.head, D, 0, logits, V);
  for (int b = 0; b < c; ++b) {
    F* row = logits + int64_t{b} * V;
    F mx = row[0];
    for (int j = 1; j < V; ++j) mx = std::max(mx, row[j]);
    const F inv = static_cast<F>(1.0 / ExpShiftSum(row, mx, row, V));
    for (int j = 0; j < V; ++j) row[j] *= inv;
    row[ids[s0 + b]] -= 1;
  }
  Gemm<F>(false, false, c, D, V, logits, V, w.head, D, 0, dhf, D);
  if (g.head) {
    for (int b = 0; b < c; ++b) {  // rank one: dlogits_b^T hf_b
      Gemm<F>(true, false, V, D, 1, logits + int64_t{b} * V, V, hf + int64_t{b} * D, D, 0,
              g.head + int64_t{b} * V * D, D);
    }
    if (g.head != g.emb) finished(g.head);  // a tied head is final with the embedding's rows, at the end
  }
  if (tp && tp->head.u && tp->head.u != tp->emb.u) {
    for (int b = 0; b < c; ++b) {
      ReduceWeightGrad(logits + int64_t{b} * V, V, hf + int64_t{b} * D, D, 1, V, D, tp->head, b, &S.red);
    }
  }
  // Token b's weight gradient of a matrix from its output gradients A (rows (t, b) of M values) and the matrix's
  // inputs X (rows t of N values) over the positions its loss reaches: written (a block per token) or reduced.
  auto weight_grad = [&](F* blocks, const LlamaTarget* tg, const F* A, int M, const F* X, int N) {
    if (tg && tg->u) {
      for (int b = 0; b < c; ++b) {
        ReduceWeightGrad(A + int64_t{b} * M, int64_t{c} * M, X, N, std::min(P, p0 + b + 1), M, N, *tg, b, &S.red);
      }
    } else if (blocks) {
      for (int b = 0; b < c; ++b) {
        WeightGrad<F>(A + int64_t{b} * M, int64_t{c} * M, X, N, std::min(P, p0 + b + 1), M, N,
                      blocks + int64_t{b} * M * N);
      }
      finished(blocks);
    }
  };
  // Above the last attention: token b's block is the rank-one u v^T.
  auto rank_one = [&](F* blocks, const LlamaTarget* tg, int b, const F* u, int nu, const F* v, int nv) {
    if (tg && tg->u) ReduceWeightGrad(u, nu, v, nv, 1, nu, nv, *tg, b, &S.red);
    if (blocks) WeightGrad<F>(u, nu, v, nv, 1, nu, nv, blocks + int64_t{b} * nu * nv);
  };
  std::fill(dx, dx + PC * D, F(0));
  for (int b = 0; b < c; ++b) {
    const int p = p0 + b;
    RmsNormBack(A.x + int64_t{p} * D, st.rf.data() + p, w.final_norm, dhf + int64_t{b} * D, 1, D,
                dx + (int64_t{p} * c + b) * D);
  }
  const bool ffn512 = std::is_same_v<F, float> && UseAvx512();
  // Per row (t, b): dx += d norm(x_t)/dx^T dy_(t, b).
  auto norm_back = [&](const F* x, const F* r, const F* gain, const F* dy) {
    RmsNormBackRows(x, r, gain, dy, P, c, D, dx);
  };
  for (int l = L - 1; l >= 0; --l) {
    const auto& lw = w.layers[l];
    const auto* gl = l < static_cast<int>(g.layers.size()) ? &g.layers[l] : nullptr;
    const LlamaTargets::Layer* tl = tp && l < static_cast<int>(tp->layers.size()) ? &tp->layers[l] : nullptr;
    const F *xi = A.x_in + l * TD, *hl = A.h1 + l * TD, *ql = A.q + l * THD;
    const F *ktl = A.kt + l * KDL, *vtl = A.vt + l * KDL, *al = A.att + l * H * TT, *ol = A.oc + l * THD;
    const F *xm = A.x_mid + l * TD, *h2l = A.h2 + l * TD;
    const F *ml = st.m.data() + l * TF, *s1l = st.s1.data() + l * TF, *g1l = st.g1.data() + l * TF;
    if (l == L - 1) {
      // Above the last attention a loss reaches its own position only: the feed-forward and wo backward run on
      // the c rows (p0 + b, b), and each token's weight gradients there are outer products.
      F *dxc = dhf, *dmc = dm, *da3c = da3, *dhc = dh;  // c rows each (dhf is free after the final norm)
      for (int b = 0; b < c; ++b) std::copy_n(dx + (int64_t{p0 + b} * c + b) * D, D, dxc + int64_t{b} * D);
      for (int b = 0; b < c; ++b) {
        rank_one(gl ? gl->w2 : nullptr, tl ? &tl->w2 : nullptr, b, dxc + int64_t{b} * D, D,
                 ml + int64_t{p0 + b} * Fh, Fh);
      }
      if (gl) finished(gl->w2);
      Gemm<F>(false, false, c, Fh, D, dxc, D, lw.w2, Fh, 0, dmc, Fh);
      for (int b = 0; b < c; ++b) {
        const int64_t at = int64_t{p0 + b} * Fh;
        SiluBackRows(s1l + at, g1l + at, dmc + int64_t{b} * Fh, dmc + int64_t{b} * Fh, da3c + int64_t{b} * Fh, 1, 1,
                     Fh);
        const F* h2p = h2l + int64_t{p0 + b} * D;
        rank_one(gl ? gl->w1 : nullptr, tl ? &tl->w1 : nullptr, b, dmc + int64_t{b} * Fh, Fh, h2p, D);
        rank_one(gl ? gl->w3 : nullptr, tl ? &tl->w3 : nullptr, b, da3c + int64_t{b} * Fh, Fh, h2p, D);
      }
      if (gl) finished(gl->w1), finished(gl->w3);
      Gemm<F>(false, false, c, D, Fh, dmc, Fh, lw.w1, D, 0, dhc, D);
      Gemm<F>(false, false, c, D, Fh, da3c, Fh, lw.w3, D, 1, dhc, D);
      std::fill(doc, doc + PC * HD, F(0));
      for (int b = 0; b < c; ++b) {
        const int p = p0 + b;
        RmsNormBack(xm + int64_t{p} * D, A.r2 + int64_t{l} * A.T + p, lw.ffn_norm, dhc + int64_t{b} * D, 1, D,
                    dxc + int64_t{b} * D);
        std::copy_n(dxc + int64_t{b} * D, D, dx + (int64_t{p} * c + b) * D);
        rank_one(gl ? gl->wo : nullptr, tl ? &tl->wo : nullptr, b, dxc + int64_t{b} * D, D, ol + int64_t{p} * HD, HD);
        // doc row (p, b) = dxc_b Wo
        Gemm<F>(false, false, 1, HD, D, dxc + int64_t{b} * D, D, lw.wo, HD, 0, doc + (int64_t{p} * c + b) * HD, HD);
      }
      if (gl) finished(gl->wo);
    } else {
      // feed-forward; a token's weight gradient: dy_b^T x over positions, all tokens in one product
      weight_grad(gl ? gl->w2 : nullptr, tl ? &tl->w2 : nullptr, dx, D, ml, Fh);
      RowProducts<F>(1, &dx, &lw.w2, &D, PC, Fh, dm);
      // dm stays for FfnInputGrad512, which needs the gradient before the SwiGLU factors
      F* da1 = ffn512 ? Sized(&S.da1, PC * Fh) : dm;
      SiluBackRows(s1l, g1l, dm, da1, da3, P, c, Fh);
      weight_grad(gl ? gl->w1 : nullptr, tl ? &tl->w1 : nullptr, da1, Fh, h2l, D);
      weight_grad(gl ? gl->w3 : nullptr, tl ? &tl->w3 : nullptr, da3, Fh, h2l, D);
#if defined(__x86_64__)
      if constexpr (std::is_same_v<F, float>) {
        if (ffn512) FfnInputGrad512(dm, g1l, s1l, lw.w1, lw.w3, P, c, p0, Fh, D, dh);
      }
#endif
      if (!ffn512) {
        const F* as[2] = {da1, da3};
        const F* bs[2] = {lw.w1, lw.w3};
        const int ks[2] = {Fh, Fh};
        RowProducts<F>(2, as, bs, ks, PC, D, dh);
      }
      norm_back(xm, A.r2 + int64_t{l} * A.T, lw.ffn_norm, dh);
      // attention
      weight_grad(gl ? gl->wo : nullptr, tl ? &tl->wo : nullptr, dx, D, ol, HD);
      RowProducts<F>(1, &dx, &lw.wo, &D, PC, HD, doc);
    }
    if (l == L - 1) std::fill(dq, dq + PC * HD, F(0));  // below, every loss's rows [0, P) are written
    // Keys [0, P) are all the chunk's losses reach: only their columns are zeroed (and later read)
    const int Pr = std::min(ld, (P + 15) / 16 * 16);
    for (int64_t r = 0; r < int64_t{c} * KD; ++r) {
      std::fill(dkt + r * ld, dkt + r * ld + Pr, F(0));
      std::fill(dvt + r * ld, dvt + r * ld + Pr, F(0));
    }
    if (l == L - 1) {
      for (int b = 0; b < c; ++b) {
        for (int h = 0; h < H; ++h) {
          const int64_t go = int64_t{h / group} * hd * ld;
          // Above the last attention a loss reaches its own position only: in the top layer only that query row
          // has an output gradient.
          AttnBackward(ql + h * hd, HD, ol + h * hd, ktl + go, vtl + go, al + h * TT, doc + int64_t{b} * HD + h * hd,
                       c * HD, p0 + b, p0 + b + 1, ld, hd, scale, dq + int64_t{b} * HD + h * hd, c * HD,
                       dkt + b * KDL + go, dvt + b * KDL + go, ds);
        }
      }
    } else {
      for (int h = 0; h < H; ++h) {  // every loss of the chunk at once: the probabilities are read once
        const int64_t go = int64_t{h / group} * hd * ld;
        const F* mkv = nullptr;
        if constexpr (std::is_same_v<F, float>) {
          if (!st.mkv.empty()) {
            const float* base =
                reinterpret_cast<const float*>((reinterpret_cast<uintptr_t>(st.mkv.data()) + 63) & ~uintptr_t{63});
            mkv = base + (int64_t{l} * H + h) * A.T * 80;
          }
        }
        AttnBackwardLosses(ql + h * hd, HD, ol + h * hd, ktl + go, vtl + go, al + h * TT, doc + h * hd, c * HD, P,
                           ld, hd, scale, dq + h * hd, c * HD, dkt + go, dvt + go, c, int64_t{HD}, KDL, ds, mkv);
      }
    }
    HeadMajorToRows(dkt, P, c, KD, ld, KDL, dk);
    HeadMajorToRows(dvt, P, c, KD, ld, KDL, dv);
    Rope(dq, static_cast<int>(PC), H, hd, w.cos, w.sin, s.rope_half, true, c);
    Rope(dk, static_cast<int>(PC), KV, hd, w.cos, w.sin, s.rope_half, true, c);
    weight_grad(gl ? gl->wq : nullptr, tl ? &tl->wq : nullptr, dq, HD, hl, D);
    weight_grad(gl ? gl->wk : nullptr, tl ? &tl->wk : nullptr, dk, KD, hl, D);
    weight_grad(gl ? gl->wv : nullptr, tl ? &tl->wv : nullptr, dv, KD, hl, D);
    {
      const F* as[3] = {dq, dk, dv};
      const F* bs[3] = {lw.wq, lw.wk, lw.wv};
      const int ks[3] = {HD, KD, KD};
      RowProducts<F>(3, as, bs, ks, PC, D, dh);
    }
    norm_back(xi, A.r1 + int64_t{l} * A.T, lw.attn_norm, dh);
  }
  if (g.emb) {
    const int64_t VD = int64_t{V} * D;
    if (g.emb != g.head) std::fill(g.emb, g.emb + c * VD, F(0));
    for (int b = 0; b < c; ++b) {
      for (int t = 0; t <= p0 + b; ++t) {
        F* e = g.emb + b * VD + int64_t{ids[t]} * D;
        const F* d = dx + (int64_t{t} * c + b) * D;
        for (int j = 0; j < D; ++j) e[j] += d[j];
      }
    }
    finished(g.emb);
  }
  if (tp && tp->emb.u) {  // token b's block: its rows of dx (and a tied head's rank one), one block at a time
    const bool tied = tp->head.u == tp->emb.u;
    F* e = Sized(&S.red, int64_t{V} * D);
    for (int b = 0; b < c; ++b) {
      if (tied) {
        Gemm<F>(true, false, V, D, 1, logits + int64_t{b} * V, V, hf + int64_t{b} * D, D, 0, e, D);
      } else {
        std::fill(e, e + int64_t{V} * D, F(0));
      }
      for (int t = 0; t <= p0 + b; ++t) {
        F* row = e + int64_t{ids[t]} * D;
        const F* d = dx + (int64_t{t} * c + b) * D;
        for (int j = 0; j < D; ++j) row[j] += d[j];
      }
      BlockDotNorm(e, tp->emb.pre, tp->emb.u, int64_t{V} * D, tp->emb.dot + b, tp->emb.ss + b);
    }
  }
  TrimScratch(&S);
}

namespace {

// A value and its tangent (the derivative along a direction in weight space), buffers of one shape.
template <class F>
struct Dual {
  std::vector<F> v, t;
  void Zero(int64_t n) {
    v.assign(n, F(0));
    t.assign(n, F(0));
  }
};

// Y = X W^T and its tangent Y' = X' W^T + X W'^T (W' null: zero); rows x in -> rows x out; beta 1 accumulates.
template <class F>
void LinDual(const F* X, const F* Xt, int rows, int in, const F* W, const F* Wt, int out, F beta, F* Y, F* Yt) {
  Gemm<F>(false, true, rows, out, in, X, in, W, in, beta, Y, out);
  Gemm<F>(false, true, rows, out, in, Xt, in, W, in, beta, Yt, out);
  if (Wt) Gemm<F>(false, true, rows, out, in, X, in, Wt, in, 1, Yt, out);
}

// Its backward: dX = dY W and dX' = dY' W + dY W' (beta 1 accumulates).
template <class F>
void LinBackDual(const F* dY, const F* dYt, int rows, int out, const F* W, const F* Wt, int in, F beta, F* dX,
                 F* dXt) {
  Gemm<F>(false, false, rows, in, out, dY, out, W, in, beta, dX, in);
  Gemm<F>(false, false, rows, in, out, dYt, out, W, in, beta, dXt, in);
  if (Wt) Gemm<F>(false, false, rows, in, out, dY, out, Wt, in, 1, dXt, in);
}

// RmsNorm with tangents (the gain has none): r' = -r^3 (x . x') / D, y' = (x' r + x r') g.
template <class F>
void RmsNormDual(const F* x, const F* xt, const F* g, int rows, int D, double eps, F* r, F* rt, F* y, F* yt) {
  for (int t = 0; t < rows; ++t) {
    const int64_t o = int64_t{t} * D;
    double ss = 0, sx = 0;
    for (int d = 0; d < D; ++d) {
      ss += static_cast<double>(x[o + d]) * x[o + d];
      sx += static_cast<double>(x[o + d]) * xt[o + d];
    }
    const double rr = 1.0 / std::sqrt(ss / D + eps), rd = -rr * rr * rr * sx / D;
    r[t] = static_cast<F>(rr);
    rt[t] = static_cast<F>(rd);
    for (int d = 0; d < D; ++d) {
      y[o + d] = x[o + d] * r[t] * g[d];
      yt[o + d] = (xt[o + d] * r[t] + x[o + d] * rt[t]) * g[d];
    }
  }
}

// RmsNormBack with tangents: dx += r u - x r^3 c, u = g dy, c = (u . x) / D, and its derivative.
template <class F>
void RmsNormBackDual(const F* x, const F* xt, const F* r, const F* rt, const F* g, const F* dy, const F* dyt,
                     int rows, int D, F* dx, F* dxt) {
  for (int t = 0; t < rows; ++t) {
    const int64_t o = int64_t{t} * D;
    double c = 0, ct = 0;
    for (int d = 0; d < D; ++d) {
      c += static_cast<double>(g[d]) * dy[o + d] * x[o + d];
      ct += static_cast<double>(g[d]) * (dy[o + d] * xt[o + d] + dyt[o + d] * x[o + d]);
    }
    c /= D;
    ct /= D;
    const double rr = r[t], rd = rt[t], r3 = rr * rr * rr, r3t = 3 * rr * rr * rd;
    const F a = static_cast<F>(r3 * c), b = static_cast<F>(r3t * c + r3 * ct);
    for (int d = 0; d < D; ++d) {
      dx[o + d] += r[t] * g[d] * dy[o + d] - x[o + d] * a;
      dxt[o + d] += rt[t] * g[d] * dy[o + d] + r[t] * g[d] * dyt[o + d] - xt[o + d] * a - x[o + d] * b;
    }
  }
}

// Row i of one head's causal attention and its tangent: p = softmax(scale q_i K^T) over keys [0, i], and
// p' = p (S' - p . S') with S' = scale (q_i' K^T + q_i K'^T). K, K' head-major (hd x ld).
template <class F>
RAPIDIN_INLINE void AttnRowDual(const F* qi, const F* qti, const F* kt, const F* ktt, int i, int ld, int hd, F scale, F* p,
                 F* pt) {
  const int n = i + 1;
  std::fill(p, p + n, F(0));
  std::fill(pt, pt + n, F(0));
  for (int d = 0; d < hd; ++d) {
    const F a = qi[d] * scale, b = qti[d] * scale;
    const F *kd = kt + int64_t{d} * ld, *ktd = ktt + int64_t{d} * ld;
    for (int j = 0; j < n; ++j) {
      p[j] += a * kd[j];
      pt[j] += b * kd[j] + a * ktd[j];
    }
  }
  F mx = p[0];
  for (int j = 1; j < n; ++j) mx = std::max(mx, p[j]);
  const F inv = static_cast<F>(1.0 / ExpShiftSum(p, mx, p, n));
  for (int j = 0; j < n; ++j) p[j] *= inv;
  const F ps = Dot(p, pt, n);
  for (int j = 0; j < n; ++j) pt[j] = p[j] * (pt[j] - ps);
}

// One head's attention forward with tangents: o_i = p_i V, o_i' = p_i' V + p_i V'. p, pt: ld values of scratch.
template <class F>
RAPIDIN_INLINE void AttnForwardDualBody(const F* q, const F* qt, int ldq, const F* kt, const F* ktt, const F* vt, const F* vtt, int T,
                     int ld, int hd, F scale, F* o, F* ot, int ldo, F* p, F* pt) {
  for (int i = 0; i < T; ++i) {
    AttnRowDual(q + int64_t{i} * ldq, qt + int64_t{i} * ldq, kt, ktt, i, ld, hd, scale, p, pt);
    for (int d = 0; d < hd; ++d) {
      const F *vd = vt + int64_t{d} * ld, *vtd = vtt + int64_t{d} * ld;
      o[int64_t{i} * ldo + d] = Dot(p, vd, i + 1);
      ot[int64_t{i} * ldo + d] = Dot(pt, vd, i + 1) + Dot(p, vtd, i + 1);
    }
  }
}

// Its backward with tangents, the probabilities recomputed row by row (no T x T storage): from do, do' (stride
// ldo) to dq, dq' (stride ldo, overwritten) and dK, dV with tangents (head-major, accumulated). s: 4 ld scratch.
template <class F>
RAPIDIN_INLINE void AttnBackwardDualBody(const F* q, const F* qt, const F* kt, const F* ktt, const F* vt, const F* vtt, const F* dout,
                      const F* doutt, int ldo, int T, int ld, int hd, F scale, F* dq, F* dqt, F* dkt, F* dktt,
                      F* dvt, F* dvtt, F* s) {
  F *p = s, *pt = s + ld, *dp = s + 2 * ld, *dpt = s + 3 * ld;
  for (int i = 0; i < T; ++i) {
    const int n = i + 1;
    const int64_t ri = int64_t{i} * ldo;
    AttnRowDual(q + ri, qt + ri, kt, ktt, i, ld, hd, scale, p, pt);
    std::fill(dp, dp + n, F(0));
    std::fill(dpt, dpt + n, F(0));
    for (int d = 0; d < hd; ++d) {  // dp = do V^T; dV += p^T do (and tangents)
      const F c = dout[ri + d], ct = doutt[ri + d];
      const F *vd = vt + int64_t{d} * ld, *vtd = vtt + int64_t{d} * ld;
      F *dvd = dvt + int64_t{d} * ld, *dvtd = dvtt + int64_t{d} * ld;
      for (int j = 0; j < n; ++j) {
        dp[j] += c * vd[j];
        dpt[j] += ct * vd[j] + c * vtd[j];
        dvd[j] += c * p[j];
        dvtd[j] += c * pt[j] + ct * p[j];
      }
    }
    const F delta = Dot(p, dp, n), deltat = Dot(pt, dp, n) + Dot(p, dpt, n);
    for (int j = 0; j < n; ++j) {  // dS = p (dp - delta) scale, and its tangent
      const F ds = p[j] * (dp[j] - delta), dst = pt[j] * (dp[j] - delta) + p[j] * (dpt[j] - deltat);
      dp[j] = ds * scale;
      dpt[j] = dst * scale;
    }
    for (int d = 0; d < hd; ++d) {  // dq = dS K; dK += dS^T q (and tangents)
      const F *kd = kt + int64_t{d} * ld, *ktd = ktt + int64_t{d} * ld;
      F *dkd = dkt + int64_t{d} * ld, *dktd = dktt + int64_t{d} * ld;
      const F c = q[ri + d], ct = qt[ri + d];
      dq[ri + d] = Dot(dp, kd, n);
      dqt[ri + d] = Dot(dpt, kd, n) + Dot(dp, ktd, n);
      for (int j = 0; j < n; ++j) {
        dkd[j] += c * dp[j];
        dktd[j] += c * dpt[j] + ct * dp[j];
      }
    }
  }
}

// Cloned for AVX-512 and AVX2 in float (the loops run over keys, contiguous); plain in double (the tests).
RAPIDIN_CLONES void AttnForwardDualAny(const float* q, const float* qt, int ldq, const float* kt, const float* ktt,
                                       const float* vt, const float* vtt, int T, int ld, int hd, float scale, float* o,
                                       float* ot, int ldo, float* p, float* pt) {
  AttnForwardDualBody(q, qt, ldq, kt, ktt, vt, vtt, T, ld, hd, scale, o, ot, ldo, p, pt);
}

#if defined(__x86_64__)
// Each of the 16 vectors' lane sums: those of acc[0..7] to lo[0..7], of acc[8..15] to hi[0..7] (one transpose).
RAPIDIN_AVX512 inline void StoreLaneSums(__m512 acc[16], float* lo, float* hi) {
  Transpose16(acc);  // lane k of the sum over the rows: the sum of acc[k]'s lanes
  __m512 tot = acc[0];
  for (int r = 1; r < 16; ++r) tot = _mm512_add_ps(tot, acc[r]);
  _mm256_storeu_ps(lo, _mm512_castps512_ps256(tot));
  _mm256_storeu_ps(hi, _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(tot), 1)));
}

// A row's probabilities and their tangents for head dimension 8 (AttnRowDual on AVX-512): the 8 dimensions in
// registers per 16-key chunk, p and p' written once each; zero past key i. q, qt: the row; p, pt: whole chunks.
RAPIDIN_AVX512 void AttnRowDual8(const float* q, const float* qt, const float* kt, const float* ktt, int i, int ld,
                                 float scale, float* p, float* pt) {
  const int nc = (i + 16) / 16 * 16;
  __m512 a[8], b[8];
  for (int d = 0; d < 8; ++d) {
    a[d] = _mm512_set1_ps(q[d] * scale);
    b[d] = _mm512_set1_ps(qt[d] * scale);
  }
  __m512 mx = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (int j0 = 0; j0 < nc; j0 += 16) {
    __m512 sv = _mm512_setzero_ps(), st = _mm512_setzero_ps();
    for (int d = 0; d < 8; ++d) {
      const __m512 kd = _mm512_loadu_ps(kt + int64_t{d} * ld + j0);
      sv = _mm512_fmadd_ps(a[d], kd, sv);
      st = _mm512_fmadd_ps(b[d], kd, _mm512_fmadd_ps(a[d], _mm512_loadu_ps(ktt + int64_t{d} * ld + j0), st));
    }
    mx = _mm512_mask_max_ps(mx, Causal(i, j0), mx, sv);
    _mm512_storeu_ps(p + j0, sv);
    _mm512_storeu_ps(pt + j0, st);
  }
  const __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
  __m512d sum = _mm512_setzero_pd();
  for (int j0 = 0; j0 < nc; j0 += 16) {
    const __m512 e = _mm512_maskz_mov_ps(Causal(i, j0), Exp512(_mm512_sub_ps(_mm512_loadu_ps(p + j0), m)));
    _mm512_storeu_ps(p + j0, e);
    sum = _mm512_add_pd(sum, _mm512_add_pd(_mm512_cvtps_pd(_mm512_castps512_ps256(e)),
                                           _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(e), 1)))));
  }
  const __m512 inv = _mm512_set1_ps(static_cast<float>(1.0 / _mm512_reduce_add_pd(sum)));
  __m512 psv = _mm512_setzero_ps();
  for (int j0 = 0; j0 < nc; j0 += 16) {
    const __m512 pv = _mm512_mul_ps(_mm512_loadu_ps(p + j0), inv);
    _mm512_storeu_ps(p + j0, pv);
    psv = _mm512_fmadd_ps(pv, _mm512_loadu_ps(pt + j0), psv);
  }
  const __m512 ps = _mm512_set1_ps(_mm512_reduce_add_ps(psv));
  for (int j0 = 0; j0 < nc; j0 += 16) {  // p' = p (S' - p . S')
    const __m512 pv = _mm512_loadu_ps(p + j0);
    _mm512_storeu_ps(pt + j0, _mm512_mul_ps(pv, _mm512_sub_ps(_mm512_loadu_ps(pt + j0), ps)));
  }
}

// AttnForwardDualBody for head dimension 8 on AVX-512: o_i = p_i V and o_i' = p_i' V + p_i V', the 16 sums in
// registers over the row's chunks, one transpose per row to finish them.
RAPIDIN_AVX512 void AttnForwardDual8(const float* q, const float* qt, int ldq, const float* kt, const float* ktt,
                                     const float* vt, const float* vtt, int T, int ld, float scale, float* o,
                                     float* ot, int ldo, float* p, float* pt) {
  for (int i = 0; i < T; ++i) {
    AttnRowDual8(q + int64_t{i} * ldq, qt + int64_t{i} * ldq, kt, ktt, i, ld, scale, p, pt);
    __m512 acc[16];
    for (int d = 0; d < 16; ++d) acc[d] = _mm512_setzero_ps();
    for (int j0 = 0; j0 <= i; j0 += 16) {
      const __m512 pv = _mm512_loadu_ps(p + j0), ptv = _mm512_loadu_ps(pt + j0);
      for (int d = 0; d < 8; ++d) {
        const __m512 vd = _mm512_loadu_ps(vt + int64_t{d} * ld + j0);
        acc[d] = _mm512_fmadd_ps(pv, vd, acc[d]);
        acc[8 + d] = _mm512_fmadd_ps(ptv, vd, _mm512_fmadd_ps(pv, _mm512_loadu_ps(vtt + int64_t{d} * ld + j0), acc[8 + d]));
      }
    }
    StoreLaneSums(acc, o + int64_t{i} * ldo, ot + int64_t{i} * ldo);
  }
}
#endif

void AttnForwardDual(const float* q, const float* qt, int ldq, const float* kt, const float* ktt, const float* vt,
                     const float* vtt, int T, int ld, int hd, float scale, float* o, float* ot, int ldo, float* p,
                     float* pt) {
#if defined(__x86_64__)
  if (hd == 8 && UseAvx512()) return AttnForwardDual8(q, qt, ldq, kt, ktt, vt, vtt, T, ld, scale, o, ot, ldo, p, pt);
#endif
  AttnForwardDualAny(q, qt, ldq, kt, ktt, vt, vtt, T, ld, hd, scale, o, ot, ldo, p, pt);
}
void AttnForwardDual(const double* q, const double* qt, int ldq, const double* kt, const double* ktt,
                     const double* vt, const double* vtt, int T, int ld, int hd, double scale, double* o, double* ot,
                     int ldo, double* p, double* pt) {
  AttnForwardDualBody(q, qt, ldq, kt, ktt, vt, vtt, T, ld, hd, scale, o, ot, ldo, p, pt);
}
#if defined(__x86_64__)
// AttnBackwardDualBody for head dimension 8 on AVX-512, row by row as it: per 16-key chunk the 8 dimensions stay in
// registers, so a row's p, p', dp and dp' are each written once (the portable loops read and wrote them once per
// dimension), dq and dq' accumulate in registers over the chunks (one transpose per row sums them), and dK, dV and
// their tangents are touched once per chunk. Keys past the row get p = p' = 0, so they add nothing anywhere after
// the softmax. s: 4 ld values, ld a multiple of 16 (no alignment needed: the buffers are std::vectors).
RAPIDIN_AVX512 void AttnBackwardDual8(const float* q, const float* qt, const float* kt, const float* ktt,
                                      const float* vt, const float* vtt, const float* dout, const float* doutt,
                                      int ldo, int T, int ld, float scale, float* dq, float* dqt, float* dkt,
                                      float* dktt, float* dvt, float* dvtt, float* s) {
  float *p = s, *pt = s + ld, *dp = s + 2 * ld, *dpt = s + 3 * ld;
  for (int i = 0; i < T; ++i) {
    const int64_t ri = int64_t{i} * ldo;
    const int nc = (i + 16) / 16 * 16;  // keys [0, i] in whole chunks
    AttnRowDual8(q + ri, qt + ri, kt, ktt, i, ld, scale, p, pt);
    // dp = do V^T and its tangent; dV += p^T do, dV' += p'^T do + p^T do'
    __m512 c[8], ct[8];
    for (int d = 0; d < 8; ++d) {
      c[d] = _mm512_set1_ps(dout[ri + d]);
      ct[d] = _mm512_set1_ps(doutt[ri + d]);
    }
    __m512 del = _mm512_setzero_ps(), delt = _mm512_setzero_ps();
    for (int j0 = 0; j0 < nc; j0 += 16) {
      const __m512 pv = _mm512_loadu_ps(p + j0), ptv = _mm512_loadu_ps(pt + j0);
      __m512 dpv = _mm512_setzero_ps(), dptv = _mm512_setzero_ps();
      for (int d = 0; d < 8; ++d) {
        const __m512 vd = _mm512_loadu_ps(vt + int64_t{d} * ld + j0);
        dpv = _mm512_fmadd_ps(c[d], vd, dpv);
        dptv = _mm512_fmadd_ps(ct[d], vd, _mm512_fmadd_ps(c[d], _mm512_loadu_ps(vtt + int64_t{d} * ld + j0), dptv));
        float* dvd = dvt + int64_t{d} * ld + j0;
        float* dvtd = dvtt + int64_t{d} * ld + j0;
        _mm512_storeu_ps(dvd, _mm512_fmadd_ps(c[d], pv, _mm512_loadu_ps(dvd)));
        _mm512_storeu_ps(dvtd, _mm512_fmadd_ps(ct[d], pv, _mm512_fmadd_ps(c[d], ptv, _mm512_loadu_ps(dvtd))));
      }
      _mm512_storeu_ps(dp + j0, dpv);
      _mm512_storeu_ps(dpt + j0, dptv);
      del = _mm512_fmadd_ps(pv, dpv, del);
      delt = _mm512_fmadd_ps(ptv, dpv, _mm512_fmadd_ps(pv, dptv, delt));
    }
    const __m512 delta = _mm512_set1_ps(_mm512_reduce_add_ps(del)), deltat = _mm512_set1_ps(_mm512_reduce_add_ps(delt));
    // dS = p (dp - delta) scale and its tangent; dq = dS K (in registers), dK += dS^T q (and tangents)
    const __m512 sc = _mm512_set1_ps(scale);
    __m512 acc[16];  // dq[d] in acc[d], dq'[d] in acc[8 + d], summed over lanes at the end
    for (int d = 0; d < 16; ++d) acc[d] = _mm512_setzero_ps();
    __m512 a[8], b[8];
    for (int d = 0; d < 8; ++d) {  // q and q' of the row, for dK
      a[d] = _mm512_set1_ps(q[ri + d]);
      b[d] = _mm512_set1_ps(qt[ri + d]);
    }
    for (int j0 = 0; j0 < nc; j0 += 16) {
      const __m512 pv = _mm512_loadu_ps(p + j0), ptv = _mm512_loadu_ps(pt + j0);
      const __m512 r = _mm512_sub_ps(_mm512_loadu_ps(dp + j0), delta);
      const __m512 ds = _mm512_mul_ps(_mm512_mul_ps(pv, r), sc);
      const __m512 dst = _mm512_mul_ps(
          _mm512_fmadd_ps(ptv, r, _mm512_mul_ps(pv, _mm512_sub_ps(_mm512_loadu_ps(dpt + j0), deltat))), sc);
      for (int d = 0; d < 8; ++d) {
        const __m512 kd = _mm512_loadu_ps(kt + int64_t{d} * ld + j0);
        acc[d] = _mm512_fmadd_ps(ds, kd, acc[d]);
        acc[8 + d] = _mm512_fmadd_ps(dst, kd, _mm512_fmadd_ps(ds, _mm512_loadu_ps(ktt + int64_t{d} * ld + j0), acc[8 + d]));
        float* dkd = dkt + int64_t{d} * ld + j0;
        float* dktd = dktt + int64_t{d} * ld + j0;
        _mm512_storeu_ps(dkd, _mm512_fmadd_ps(a[d], ds, _mm512_loadu_ps(dkd)));
        _mm512_storeu_ps(dktd, _mm512_fmadd_ps(a[d], dst, _mm512_fmadd_ps(b[d], ds, _mm512_loadu_ps(dktd))));
      }
    }
    StoreLaneSums(acc, dq + ri, dqt + ri);
  }
}
#endif

RAPIDIN_CLONES void AttnBackwardDualAny(const float* q, const float* qt, const float* kt, const float* ktt,
                                        const float* vt, const float* vtt, const float* dout, const float* doutt,
                                        int ldo, int T, int ld, int hd, float scale, float* dq, float* dqt, float* dkt,
                                        float* dktt, float* dvt, float* dvtt, float* s) {
  AttnBackwardDualBody(q, qt, kt, ktt, vt, vtt, dout, doutt, ldo, T, ld, hd, scale, dq, dqt, dkt, dktt, dvt, dvtt, s);
}
void AttnBackwardDual(const float* q, const float* qt, const float* kt, const float* ktt, const float* vt,
                      const float* vtt, const float* dout, const float* doutt, int ldo, int T, int ld, int hd,
                      float scale, float* dq, float* dqt, float* dkt, float* dktt, float* dvt, float* dvtt, float* s) {
#if defined(__x86_64__)
  if (hd == 8 && UseAvx512()) {
    return AttnBackwardDual8(q, qt, kt, ktt, vt, vtt, dout, doutt, ldo, T, ld, scale, dq, dqt, dkt, dktt, dvt, dvtt, s);
  }
#endif
  AttnBackwardDualAny(q, qt, kt, ktt, vt, vtt, dout, doutt, ldo, T, ld, hd, scale, dq, dqt, dkt, dktt, dvt, dvtt, s);
}
void AttnBackwardDual(const double* q, const double* qt, const double* kt, const double* ktt, const double* vt,
                      const double* vtt, const double* dout, const double* doutt, int ldo, int T, int ld, int hd,
                      double scale, double* dq, double* dqt, double* dkt, double* dktt, double* dvt, double* dvtt,
                      double* s) {
  AttnBackwardDualBody(q, qt, kt, ktt, vt, vtt, dout, doutt, ldo, T, ld, hd, scale, dq, dqt, dkt, dktt, dvt, dvtt, s);
}

// silu(a1) a3 forward and backward with tangents (da1 may alias dm). silu' = s (1 + a (1 - s)), silu'' = s (1 - s) (2 + a (1 - 2 s)).
template <class F>
void SiluMulDual(const F* a1, const F* a1t, const F* a3, const F* a3t, int64_t n, F* m, F* mt) {
  for (int64_t i = 0; i < n; ++i) {
    const double a = a1[i], sg = 1.0 / (1.0 + std::exp(-a)), s1 = a * sg, d1 = sg * (1.0 + a * (1.0 - sg));
    m[i] = static_cast<F>(s1 * a3[i]);
    mt[i] = static_cast<F>(d1 * a1t[i] * a3[i] + s1 * a3t[i]);
  }
}
template <class F>
void SiluMulBackDual(const F* a1, const F* a1t, const F* a3, const F* a3t, const F* dm, const F* dmt, int64_t n,
                     F* da1, F* da1t, F* da3, F* da3t) {
  for (int64_t i = 0; i < n; ++i) {
    const double a = a1[i], sg = 1.0 / (1.0 + std::exp(-a)), s1 = a * sg, d1 = sg * (1.0 + a * (1.0 - sg));
    const double d2 = sg * (1.0 - sg) * (2.0 + a * (1.0 - 2.0 * sg));
    const double g = dm[i], gt = dmt[i];  // read before writing: da1 may be dm
    da3[i] = static_cast<F>(g * s1);
    da3t[i] = static_cast<F>(gt * s1 + g * d1 * a1t[i]);
    da1[i] = static_cast<F>(g * a3[i] * d1);
    da1t[i] = static_cast<F>((gt * a3[i] + g * a3t[i]) * d1 + g * a3[i] * d2 * a1t[i]);
  }
}

}  // namespace

template <class F>
double LlamaInputGradTangent(const LlamaShape& s, const LlamaWeights<F>& w, const LlamaWeights<F>& dw,
                             const int32_t* ids, int n, int response_begin, const double* loss_weights, F* gx,
                             F* gxt) {
  FlushDenormals ftz;
  const int D = s.dim, Fh = s.hidden, L = s.layers, H = s.heads, KV = s.kv_heads, hd = s.head_dim, V = s.vocab;
  const int HD = H * hd, KD = KV * hd, group = H / KV;
  const int T = n - 1, p0 = response_begin - 1, R = T - p0;
  const int ld = (T + 15) / 16 * 16;
  const F scale = static_cast<F>(1.0 / std::sqrt(static_cast<double>(hd)));
  const int64_t TD = int64_t{T} * D, TF = int64_t{T} * Fh, THD = int64_t{T} * HD, TKD = int64_t{T} * KD;
  const int64_t KDL = int64_t{KD} * ld;
  // Forward activations (value and tangent) of every layer, as the backward needs them.
  // A thread's buffers are kept from record to record (up to kKeepBytes): fresh ones cost a page fault per 4 KiB.
  struct Buffers {
    Dual<F> x, xin, r1, h1, q, kt, vt, o, xm, r2, h2, a1, a3, k, v, m, rf, hf, z;
    Dual<F> dhf, dx, dh, dm, da3, doc, dq, dk, dv, dkt, dvt;
    std::vector<F> scratch;
    size_t Bytes() const {
      size_t n = scratch.capacity();
      for (const Dual<F>* d : {&x,  &xin, &r1, &h1, &q,   &kt,  &vt, &o,  &xm,  &r2, &h2,  &a1,  &a3,  &k,  &v,
                               &m,  &rf,  &hf, &z,  &dhf, &dx,  &dh, &dm, &da3, &doc, &dq, &dk, &dv, &dkt, &dvt}) {
        n += d->v.capacity() + d->t.capacity();
      }
      return n * sizeof(F);
    }
  };
  constexpr size_t kKeepBytes = size_t{256} << 20;
  thread_local Buffers B;
  struct Trim {
    Buffers& b;
    ~Trim() {
      if (b.Bytes() > kKeepBytes) b = Buffers();
    }
  } trim{B};
  auto &x = B.x, &xin = B.xin, &r1 = B.r1, &h1 = B.h1, &q = B.q, &kt = B.kt, &vt = B.vt, &o = B.o, &xm = B.xm;
  auto &r2 = B.r2, &h2 = B.h2, &a1 = B.a1, &a3 = B.a3, &k = B.k, &v = B.v, &m = B.m;
  x.Zero(TD);
  for (Dual<F>* d : {&xin, &h1, &xm, &h2}) d->Zero(L * TD);
  for (Dual<F>* d : {&r1, &r2}) d->Zero(int64_t{L} * T);
  for (Dual<F>* d : {&q, &o}) d->Zero(L * THD);
  for (Dual<F>* d : {&kt, &vt}) d->Zero(L * KDL);
  for (Dual<F>* d : {&a1, &a3}) d->Zero(L * TF);
  k.Zero(TKD);
  v.Zero(TKD);
  m.Zero(TF);
  std::vector<F>& scratch = B.scratch;
  scratch.assign(4 * static_cast<size_t>(ld), F(0));
  for (int t = 0; t < T; ++t) {
    std::memcpy(&x.v[int64_t{t} * D], w.emb + int64_t{ids[t]} * D, D * sizeof(F));
    if (dw.emb) std::memcpy(&x.t[int64_t{t} * D], dw.emb + int64_t{ids[t]} * D, D * sizeof(F));
  }
  for (int l = 0; l < L; ++l) {
    const auto& lw = w.layers[l];
    const auto& lt = dw.layers[l];
    const int64_t oD = l * TD, oH = l * THD, oK = l * KDL, oF = l * TF, oT = int64_t{l} * T;
    std::copy(x.v.begin(), x.v.end(), xin.v.begin() + oD);
    std::copy(x.t.begin(), x.t.end(), xin.t.begin() + oD);
    RmsNormDual(x.v.data(), x.t.data(), lw.attn_norm, T, D, s.norm_eps, &r1.v[oT], &r1.t[oT], &h1.v[oD], &h1.t[oD]);
    LinDual(&h1.v[oD], &h1.t[oD], T, D, lw.wq, lt.wq, HD, F(0), &q.v[oH], &q.t[oH]);
    LinDual(&h1.v[oD], &h1.t[oD], T, D, lw.wk, lt.wk, KD, F(0), k.v.data(), k.t.data());
    LinDual(&h1.v[oD], &h1.t[oD], T, D, lw.wv, lt.wv, KD, F(0), v.v.data(), v.t.data());
    for (F* a : {&q.v[oH], &q.t[oH]}) Rope(a, T, H, hd, w.cos, w.sin, s.rope_half, false);
    for (F* a : {k.v.data(), k.t.data()}) Rope(a, T, KV, hd, w.cos, w.sin, s.rope_half, false);
    ToHeadMajor(k.v.data(), T, KV, hd, ld, &kt.v[oK]);
    ToHeadMajor(k.t.data(), T, KV, hd, ld, &kt.t[oK]);
    ToHeadMajor(v.v.data(), T, KV, hd, ld, &vt.v[oK]);
    ToHeadMajor(v.t.data(), T, KV, hd, ld, &vt.t[oK]);
    for (int h = 0; h < H; ++h) {
      const int64_t go = oK + int64_t{h / group} * hd * ld;
      AttnForwardDual(&q.v[oH + h * hd], &q.t[oH + h * hd], HD, &kt.v[go], &kt.t[go], &vt.v[go], &vt.t[go], T, ld,
                      hd, scale, &o.v[oH + h * hd], &o.t[oH + h * hd], HD, scratch.data(), scratch.data() + ld);
    }
    LinDual(&o.v[oH], &o.t[oH], T, HD, lw.wo, lt.wo, D, F(1), x.v.data(), x.t.data());
    std::copy(x.v.begin(), x.v.end(), xm.v.begin() + oD);
    std::copy(x.t.begin(), x.t.end(), xm.t.begin() + oD);
    RmsNormDual(x.v.data(), x.t.data(), lw.ffn_norm, T, D, s.norm_eps, &r2.v[oT], &r2.t[oT], &h2.v[oD], &h2.t[oD]);
    LinDual(&h2.v[oD], &h2.t[oD], T, D, lw.w1, lt.w1, Fh, F(0), &a1.v[oF], &a1.t[oF]);
    LinDual(&h2.v[oD], &h2.t[oD], T, D, lw.w3, lt.w3, Fh, F(0), &a3.v[oF], &a3.t[oF]);
    SiluMulDual(&a1.v[oF], &a1.t[oF], &a3.v[oF], &a3.t[oF], TF, m.v.data(), m.t.data());
    LinDual(m.v.data(), m.t.data(), T, Fh, lw.w2, lt.w2, D, F(1), x.v.data(), x.t.data());
  }
  // Final norm and head on the loss positions; the loss and dL/dlogits with tangents.
  auto &rf = B.rf, &hf = B.hf, &z = B.z;
  rf.Zero(R);
  hf.Zero(int64_t{R} * D);
  z.Zero(int64_t{R} * V);
  const int64_t xo = int64_t{p0} * D;
  RmsNormDual(&x.v[xo], &x.t[xo], w.final_norm, R, D, s.norm_eps, rf.v.data(), rf.t.data(), hf.v.data(),
              hf.t.data());
  LinDual(hf.v.data(), hf.t.data(), R, D, w.head, dw.head, V, F(0), z.v.data(), z.t.data());
  double wsum = 0, loss = 0;
  for (int i = 0; i < R; ++i) wsum += loss_weights ? loss_weights[i] : 1.0;
  for (int i = 0; i < R; ++i) {
    F* row = &z.v[int64_t{i} * V];
    F* rowt = &z.t[int64_t{i} * V];
    const int target = ids[response_begin + i];
    const double wi = (loss_weights ? loss_weights[i] : 1.0) / wsum;
    loss += wi * SoftmaxRow(row, V, target);  // row becomes p
    const F pz = Dot(row, rowt, V);
    for (int j = 0; j < V; ++j) {
      rowt[j] = static_cast<F>(wi) * row[j] * (rowt[j] - pz);
      row[j] *= static_cast<F>(wi);
    }
    row[target] -= static_cast<F>(wi);
  }
  // Backward: input gradients only, with tangents.
  auto &dhf = B.dhf, &dx = B.dx, &dh = B.dh, &dm = B.dm, &da3 = B.da3, &doc = B.doc, &dq = B.dq, &dk = B.dk;
  auto &dv = B.dv, &dkt = B.dkt, &dvt = B.dvt;
  dhf.Zero(int64_t{R} * D);
  dx.Zero(TD);
  dh.Zero(TD);
  for (Dual<F>* d : {&dm, &da3}) d->Zero(TF);
  for (Dual<F>* d : {&doc, &dq}) d->Zero(THD);
  for (Dual<F>* d : {&dk, &dv}) d->Zero(TKD);
  for (Dual<F>* d : {&dkt, &dvt}) d->Zero(KDL);
  LinBackDual(z.v.data(), z.t.data(), R, V, w.head, dw.head, D, F(0), dhf.v.data(), dhf.t.data());
  RmsNormBackDual(&x.v[xo], &x.t[xo], rf.v.data(), rf.t.data(), w.final_norm, dhf.v.data(), dhf.t.data(), R, D,
                  &dx.v[xo], &dx.t[xo]);
  for (int l = L - 1; l >= 0; --l) {
    const auto& lw = w.layers[l];
    const auto& lt = dw.layers[l];
    const int64_t oD = l * TD, oH = l * THD, oK = l * KDL, oF = l * TF, oT = int64_t{l} * T;
    LinBackDual(dx.v.data(), dx.t.data(), T, D, lw.w2, lt.w2, Fh, F(0), dm.v.data(), dm.t.data());
    SiluMulBackDual(&a1.v[oF], &a1.t[oF], &a3.v[oF], &a3.t[oF], dm.v.data(), dm.t.data(), TF, dm.v.data(),
                    dm.t.data(), da3.v.data(), da3.t.data());
    LinBackDual(dm.v.data(), dm.t.data(), T, Fh, lw.w1, lt.w1, D, F(0), dh.v.data(), dh.t.data());
    LinBackDual(da3.v.data(), da3.t.data(), T, Fh, lw.w3, lt.w3, D, F(1), dh.v.data(), dh.t.data());
    RmsNormBackDual(&xm.v[oD], &xm.t[oD], &r2.v[oT], &r2.t[oT], lw.ffn_norm, dh.v.data(), dh.t.data(), T, D,
                    dx.v.data(), dx.t.data());
    LinBackDual(dx.v.data(), dx.t.data(), T, D, lw.wo, lt.wo, HD, F(0), doc.v.data(), doc.t.data());
    std::fill(dkt.v.begin(), dkt.v.end(), F(0));
    std::fill(dkt.t.begin(), dkt.t.end(), F(0));
    std::fill(dvt.v.begin(), dvt.v.end(), F(0));
    std::fill(dvt.t.begin(), dvt.t.end(), F(0));
    for (int h = 0; h < H; ++h) {
      const int64_t go = oK + int64_t{h / group} * hd * ld, gl = int64_t{h / group} * hd * ld;
      AttnBackwardDual(&q.v[oH + h * hd], &q.t[oH + h * hd], &kt.v[go], &kt.t[go], &vt.v[go], &vt.t[go],
                       &doc.v[h * hd], &doc.t[h * hd], HD, T, ld, hd, scale, &dq.v[h * hd], &dq.t[h * hd],
                       &dkt.v[gl], &dkt.t[gl], &dvt.v[gl], &dvt.t[gl], scratch.data());
    }
    HeadMajorToRows(dkt.v.data(), T, 1, KD, ld, 0, dk.v.data());
    HeadMajorToRows(dkt.t.data(), T, 1, KD, ld, 0, dk.t.data());
    HeadMajorToRows(dvt.v.data(), T, 1, KD, ld, 0, dv.v.data());
    HeadMajorToRows(dvt.t.data(), T, 1, KD, ld, 0, dv.t.data());
    for (F* a : {dq.v.data(), dq.t.data()}) Rope(a, T, H, hd, w.cos, w.sin, s.rope_half, true);
    for (F* a : {dk.v.data(), dk.t.data()}) Rope(a, T, KV, hd, w.cos, w.sin, s.rope_half, true);
    LinBackDual(dq.v.data(), dq.t.data(), T, HD, lw.wq, lt.wq, D, F(0), dh.v.data(), dh.t.data());
    LinBackDual(dk.v.data(), dk.t.data(), T, KD, lw.wk, lt.wk, D, F(1), dh.v.data(), dh.t.data());
    LinBackDual(dv.v.data(), dv.t.data(), T, KD, lw.wv, lt.wv, D, F(1), dh.v.data(), dh.t.data());
    RmsNormBackDual(&xin.v[oD], &xin.t[oD], &r1.v[oT], &r1.t[oT], lw.attn_norm, dh.v.data(), dh.t.data(), T, D,
                    dx.v.data(), dx.t.data());
  }
  std::copy(dx.v.begin(), dx.v.end(), gx);
  std::copy(dx.t.begin(), dx.t.end(), gxt);
  std::fill(gx + TD, gx + TD + D, F(0));  // the last token predicts nothing: no gradient
  std::fill(gxt + TD, gxt + TD + D, F(0));
  return loss;
}

template double LlamaInputGradTangent<float>(const LlamaShape&, const LlamaWeights<float>&,
                                             const LlamaWeights<float>&, const int32_t*, int, int, const double*,
                                             float*, float*);
template double LlamaInputGradTangent<double>(const LlamaShape&, const LlamaWeights<double>&,
                                              const LlamaWeights<double>&, const int32_t*, int, int, const double*,
                                              double*, double*);

template class LlamaTokenPass<float>;
template class LlamaTokenPass<double>;

template double LlamaLossGradient<float>(const LlamaShape&, const LlamaWeights<float>&, const int32_t*, int, int,
                                         const double*, const LlamaGrads<float>&);
template double LlamaLossGradient<double>(const LlamaShape&, const LlamaWeights<double>&, const int32_t*, int, int,
                                          const double*, const LlamaGrads<double>&);

void SetAvx512ForTesting(bool enabled) {
#if defined(__x86_64__)
  g_avx512_allowed.store(enabled);
#else
  (void)enabled;
#endif
}

}  // namespace rapidin::model::internal
