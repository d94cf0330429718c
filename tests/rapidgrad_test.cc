// kernels/rapidgrad: determinism, equality with the explicit permutation and signs, unbiasedness and variance.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <random>

#include "kernels/rapidgrad.h"

namespace rapidin::kernels {
namespace {

std::vector<float> RandomVec(int64_t d, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> g;
  std::vector<float> v(d);
  for (auto& x : v) x = g(rng);
  return v;
}

std::unique_ptr<RapidGrad> Make(int64_t d, int64_t k, int lambda, uint64_t seed) {
  std::string error;
  auto g = RapidGrad::Create({d, k, lambda, seed}, &error);
  EXPECT_NE(g, nullptr) << error;
  return g;
}

TEST(RapidGrad, RejectsBadParams) {
  std::string error;
  EXPECT_EQ(RapidGrad::Create({0, 4, 1, 0}, &error), nullptr);
  EXPECT_NE(error.find("d must be"), std::string::npos) << error;
  EXPECT_EQ(RapidGrad::Create({10, 0, 1, 0}), nullptr);
  EXPECT_EQ(RapidGrad::Create({10, 4, -1, 0}, &error), nullptr);
  EXPECT_NE(error.find("lambda"), std::string::npos) << error;
}

TEST(RapidGrad, DeterministicAndSeedSensitive) {
  const auto x = RandomVec(5000, std::random_device{}());
  auto a = Make(5000, 64, 4, 7), b = Make(5000, 64, 4, 7), c = Make(5000, 64, 4, 8);
  EXPECT_EQ(a->Apply(x), b->Apply(x));
  EXPECT_NE(a->Apply(x), c->Apply(x));
  EXPECT_EQ(a->padded_dim(), 5056);  // ceil(5000 / 64) * 64
  EXPECT_EQ(a->Describe(), "rapidgrad/v1 d=5000 k=64 lambda=4 seed=7");
}

// Golden values: SplitMix64 + Lemire draws are fully specified, so these must hold on every machine/compiler.
TEST(RapidGrad, GoldenPermutationAndSigns) {
  SplitMix64 s{0};
  EXPECT_EQ(s.Next(), 0xe220a8397b1dcdafull);  // published SplitMix64 output for seed 0
  auto g = Make(1000, 10, 3, 42);
  std::vector<int64_t> got;
  for (int64_t i : {0, 1, 2, 500, 999}) got.push_back(g->Permute(i));
  const std::vector<int64_t> want = {337, 630, 611, 545, 50};
  EXPECT_EQ(got, want);
}

// The fast path equals the slow, obvious construction: apply each row/column shuffle to an explicit index array,
// multiply by the signs, sum contiguous bins (in double).
TEST(RapidGrad, EqualsExplicitPermutationAndSigns) {
  for (auto [d, k, lambda] : std::vector<std::tuple<int64_t, int64_t, int>>{
           {30, 4, 1}, {1000, 7, 3}, {257, 16, 4}, {4096, 64, 6}, {1, 1, 2}, {97, 97, 2}}) {
    const uint64_t seed = std::random_device{}();
    auto g = Make(d, k, lambda, seed);
    const int64_t dp = g->padded_dim();
    // Explicit: move a labelled vector through each round's matrix view, literally.
    std::vector<int64_t> v(dp);
    for (int64_t i = 0; i < dp; ++i) v[i] = i;
    ASSERT_EQ(static_cast<int>(g->rounds().size()), lambda);
    for (const auto& r : g->rounds()) {
      ASSERT_EQ(r.a * r.b, dp);
      std::vector<int64_t> next(dp);
      for (int64_t i = 0; i < r.a; ++i)
        for (int64_t j = 0; j < r.b; ++j) next[r.row[i] * r.b + r.col[j]] = v[i * r.b + j];
      v = next;
    }
    std::vector<int64_t> perm(dp);  // perm[i]: final position of input i
    for (int64_t j = 0; j < dp; ++j) perm[v[j]] = j;
    for (int64_t i = 0; i < dp; ++i) ASSERT_EQ(g->Permute(i), perm[i]) << "input " << i;
    const auto x = RandomVec(d, seed + 1);
    std::vector<double> y(dp, 0.0);
    for (int64_t i = 0; i < d; ++i) y[perm[i]] = x[i];
    std::vector<double> want(k, 0.0);
    const int64_t bs = dp / k;
    for (int64_t j = 0; j < dp; ++j) want[j / bs] += g->Sign(j) * y[j];
    std::vector<float> fast(k), slow(k);
    g->Apply(x.data(), fast.data());
    g->ApplyOnTheFly(x.data(), slow.data());
    EXPECT_EQ(fast, slow);
    for (int64_t b = 0; b < k; ++b) EXPECT_NEAR(fast[b], want[b], 1e-5 * std::sqrt(double(bs)) + 1e-6);
  }
}

// Each round really is a row shuffle followed by a column shuffle of an a x b view: with lambda = 1, elements of
// one row of the view land in one row of the result, keeping their column order pattern.
TEST(RapidGrad, OneRoundIsStructuredShuffle) {
  auto g = Make(64, 4, 1, 3);
  bool found = false;
  for (int64_t a : {2, 4, 8, 16, 32}) {
    const int64_t b = 64 / a;
    bool ok = true;
    for (int64_t r = 0; r < a && ok; ++r) {
      const int64_t dest_row = g->Permute(r * b) / b;
      for (int64_t c = 0; c < b && ok; ++c) {
        ok = g->Permute(r * b + c) / b == dest_row && g->Permute(r * b + c) % b == g->Permute(c) % b;
      }
    }
    found = found || ok;
  }
  EXPECT_TRUE(found);
}

// Unbiased inner products over seeds, with variance close to that of a sign sketch over a random bin assignment:
// Var = (m-1)/(D'-1) * (|x|^2|y|^2 + <x,y>^2 - 2 sum x_i^2 y_i^2), m = D'/K.
TEST(RapidGrad, InnerProductsUnbiasedWithTheoreticalVariance) {
  const int64_t d = 512, k = 16;
  const auto x = RandomVec(d, std::random_device{}());
  auto y = RandomVec(d, std::random_device{}());
  for (int64_t i = 0; i < d; ++i) y[i] = 0.6f * y[i] + 0.8f * x[i];  // correlated, so <x,y> is far from 0
  double xy = 0, xx = 0, yy = 0, x2y2 = 0;
  for (int64_t i = 0; i < d; ++i) {
    xy += double(x[i]) * y[i];
    xx += double(x[i]) * x[i];
    yy += double(y[i]) * y[i];
    x2y2 += double(x[i]) * x[i] * y[i] * y[i];
  }
  const double m = double(d) / k;
  const double var_theory = (m - 1) / (d - 1) * (xx * yy + xy * xy - 2 * x2y2);
  const int trials = 3000;
  const uint64_t base = std::random_device{}();
  double sum = 0, sum2 = 0;
  for (int t = 0; t < trials; ++t) {
    auto g = Make(d, k, 4, base + t);
    const auto cx = g->Apply(x), cy = g->Apply(y);
    double ip = 0;
    for (int64_t b = 0; b < k; ++b) ip += double(cx[b]) * cy[b];
    sum += ip;
    sum2 += ip * ip;
  }
  const double mean = sum / trials, var = sum2 / trials - mean * mean;
  EXPECT_NEAR(mean, xy, 4.5 * std::sqrt(var_theory / trials)) << "biased";
  EXPECT_GT(var / var_theory, 0.85);
  EXPECT_LT(var / var_theory, 1.15);
}

}  // namespace
}  // namespace rapidin::kernels
