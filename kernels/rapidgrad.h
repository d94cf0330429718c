// RapidGrad: the one-permutation-one-projection sketch of RapidIn (Lin et al., ACL 2024, section 3.2).
//
// C(x) for x of dimension D:
//   1. zero-pad to D' = ceil(D / K) * K;
//   2. permute with 2*lambda structured shuffles: round r views the vector as an a_r x b_r matrix
//      (a_r * b_r = D', a_r a divisor drawn from the seed) and permutes its rows, then its columns, with seeded
//      Fisher-Yates permutations of size a_r and b_r - no D'-long permutation is ever stored;
//   3. multiply by seeded random signs s(j) in {+1, -1};
//   4. sum each of the K contiguous bins of D'/K values (fp32 accumulation).
// C is linear, and <C(x), C(y)> is an unbiased estimate of <x, y>.
//
// Randomness comes from SplitMix64 and Lemire's unbiased bounded draws, both fully specified here, so a seed
// gives the same sketch on every machine and compiler. Thread-safety: a RapidGrad is immutable after Create;
// Apply may run concurrently.
#ifndef RAPIDIN_KERNELS_RAPIDGRAD_H_
#define RAPIDIN_KERNELS_RAPIDGRAD_H_

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace rapidin::kernels {

struct RapidGradParams {
  int64_t d = 0;       // input dimension
  int64_t k = 4096;    // output dimension (bins)
  int lambda = 4;      // rounds; 2 * lambda shuffles
  uint64_t seed = 0;
};

class RapidGrad {
 public:
  // Returns nullptr (and the reason in *error when given) for d < 1, k < 1, lambda < 0 or lambda > 64.
  // Free of Abseil so the standalone GPU build (scripts/gpu-check.sh) can use it as the reference.
  static std::unique_ptr<RapidGrad> Create(const RapidGradParams& params, std::string* error = nullptr);

  const RapidGradParams& params() const { return params_; }
  int64_t padded_dim() const { return padded_; }
  int64_t bin_size() const { return padded_ / params_.k; }

  // Position of input element i (< padded_dim) after the 2*lambda shuffles.
  int64_t Permute(int64_t i) const;
  // Sign applied at permuted position j.
  float Sign(int64_t j) const;

  // out[0..k) = C(x); x has params().d values. Accumulates in input order, in fp32.
  void Apply(const float* x, float* out) const;
  // The same without the memo table (the reference path; also used when D' is too large for a table).
  void ApplyOnTheFly(const float* x, float* out) const;
  std::vector<float> Apply(const std::vector<float>& x) const;
  // The adjoint: out[0..d) = C^T y for y of k values (out[i] = sign * y[bin of i]), so that
  // <C(x), y> = <x, C^T y> for every x. Pulls a compressed query back to gradient space (training-side token
  // attributions differentiate <N(grad L(z)), C^T q>, the very score the store ranks by).
  void ApplyTranspose(const float* y, double* out) const;

  // The rounds, for inspection and tests: round r views the padded vector as an a x b row-major matrix and
  // moves element (i, j) to (row[i], col[j]).
  struct Round {
    int64_t a, b;
    std::vector<int64_t> row;
    std::vector<int64_t> col;
  };
  const std::vector<Round>& rounds() const { return rounds_; }

  // Canonical text form "rapidgrad/v1 d=.. k=.. lambda=.. seed=.." (what stores and queries must agree on).
  std::string Describe() const;

 private:
  explicit RapidGrad(const RapidGradParams& p) : params_(p) {}
  RapidGradParams params_;
  int64_t padded_ = 0;
  // Memo of (bin << 1 | negative) per input position, built when D' <= kTableLimit: Apply becomes one
  // sequential pass. Same arithmetic in the same order as the on-the-fly path, so results are identical.
  static constexpr int64_t kTableLimit = int64_t{1} << 26;
  std::vector<uint32_t> table_;
  uint64_t sign_key_ = 0;
  std::vector<Round> rounds_;
};

// SplitMix64 (Steele, Lea, Flood 2014): the generator behind every RapidGrad draw.
struct SplitMix64 {
  uint64_t state;
  uint64_t Next() {
    uint64_t z = (state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
  }
  // Uniform in [0, n), unbiased (Lemire 2019).
  uint64_t Below(uint64_t n);
};

}  // namespace rapidin::kernels

#endif  // RAPIDIN_KERNELS_RAPIDGRAD_H_
