#include "kernels/rapidgrad.h"

#include <algorithm>
#include <cstring>


namespace rapidin::kernels {

uint64_t SplitMix64::Below(uint64_t n) {
  unsigned __int128 m = static_cast<unsigned __int128>(Next()) * n;
  uint64_t low = static_cast<uint64_t>(m);
  if (low < n) {
    const uint64_t threshold = -n % n;
    while (low < threshold) {
      m = static_cast<unsigned __int128>(Next()) * n;
      low = static_cast<uint64_t>(m);
    }
  }
  return static_cast<uint64_t>(m >> 64);
}

namespace {

std::vector<int64_t> FisherYates(int64_t n, SplitMix64* rng) {
  std::vector<int64_t> p(n);
  for (int64_t i = 0; i < n; ++i) p[i] = i;
  for (int64_t i = n - 1; i > 0; --i) {
    const int64_t j = static_cast<int64_t>(rng->Below(static_cast<uint64_t>(i) + 1));
    std::swap(p[i], p[j]);
  }
  return p;
}

uint64_t Mix(uint64_t x) {
  SplitMix64 s{x};
  return s.Next();
}

}  // namespace

std::unique_ptr<RapidGrad> RapidGrad::Create(const RapidGradParams& p, std::string* error) {
  std::string why;
  if (p.d < 1) why = "RapidGrad: d must be >= 1, got " + std::to_string(p.d);
  else if (p.k < 1) why = "RapidGrad: k must be >= 1, got " + std::to_string(p.k);
  else if (p.lambda < 0 || p.lambda > 64) why = "RapidGrad: lambda must be 0..64, got " + std::to_string(p.lambda);
  if (!why.empty()) {
    if (error != nullptr) *error = why;
    return nullptr;
  }
  std::unique_ptr<RapidGrad> g(new RapidGrad(p));
  g->padded_ = (p.d + p.k - 1) / p.k * p.k;
  SplitMix64 rng{p.seed};
  g->sign_key_ = rng.Next();
  // Divisors of D' other than 1 and D' (when there are none, D' is prime or 1: shuffle it as one row).
  std::vector<int64_t> divisors;
  for (int64_t a = 2; a * a <= g->padded_; ++a) {
    if (g->padded_ % a == 0) {
      divisors.push_back(a);
      if (a != g->padded_ / a) divisors.push_back(g->padded_ / a);
    }
  }
  std::sort(divisors.begin(), divisors.end());
  for (int r = 0; r < p.lambda; ++r) {
    Round round;
    round.a = divisors.empty() ? 1 : divisors[rng.Below(divisors.size())];
    round.b = g->padded_ / round.a;
    round.row = FisherYates(round.a, &rng);
    round.col = FisherYates(round.b, &rng);
    g->rounds_.push_back(std::move(round));
  }
  if (g->padded_ <= kTableLimit && p.k < (int64_t{1} << 31)) {
    const int64_t bs = g->bin_size();
    g->table_.resize(p.d);
    for (int64_t i = 0; i < p.d; ++i) {
      const int64_t j = g->Permute(i);
      g->table_[i] = static_cast<uint32_t>((j / bs) << 1) | (g->Sign(j) < 0 ? 1u : 0u);
    }
  }
  return g;
}

int64_t RapidGrad::Permute(int64_t i) const {
  for (const Round& r : rounds_) {
    const int64_t row = i / r.b, col = i % r.b;
    i = r.row[row] * r.b + r.col[col];
  }
  return i;
}

float RapidGrad::Sign(int64_t j) const {
  return (Mix(sign_key_ ^ static_cast<uint64_t>(j)) >> 63) ? -1.0f : 1.0f;
}

void RapidGrad::Apply(const float* x, float* out) const {
  if (table_.empty()) return ApplyOnTheFly(x, out);
  for (int64_t b = 0; b < params_.k; ++b) out[b] = 0.0f;
  const uint32_t* t = table_.data();
  for (int64_t i = 0; i < params_.d; ++i) {
    // Negation as a sign-bit flip: branch-free (the signs are random, so a branch mispredicts half the time)
    // and exactly -x.
    const uint32_t e = t[i];
    uint32_t bits;
    std::memcpy(&bits, &x[i], 4);
    bits ^= e << 31;
    float v;
    std::memcpy(&v, &bits, 4);
    out[e >> 1] += v;
  }
}

void RapidGrad::ApplyOnTheFly(const float* x, float* out) const {
  const int64_t bs = bin_size();
  for (int64_t b = 0; b < params_.k; ++b) out[b] = 0.0f;
  for (int64_t i = 0; i < params_.d; ++i) {
    const int64_t j = Permute(i);
    out[j / bs] += Sign(j) * x[i];
  }
}

void RapidGrad::ApplyTranspose(const float* y, double* out) const {
  if (table_.empty()) {
    const int64_t bs = bin_size();
    for (int64_t i = 0; i < params_.d; ++i) {
      const int64_t j = Permute(i);
      out[i] = static_cast<double>(Sign(j)) * y[j / bs];
    }
    return;
  }
  for (int64_t i = 0; i < params_.d; ++i) {
    const uint32_t e = table_[i];
    out[i] = (e & 1u) ? -static_cast<double>(y[e >> 1]) : static_cast<double>(y[e >> 1]);
  }
}

std::vector<float> RapidGrad::Apply(const std::vector<float>& x) const {
  std::vector<float> out(params_.k);
  Apply(x.data(), out.data());
  return out;
}

std::string RapidGrad::Describe() const {
  return "rapidgrad/v1 d=" + std::to_string(params_.d) + " k=" + std::to_string(params_.k) +
         " lambda=" + std::to_string(params_.lambda) + " seed=" + std::to_string(params_.seed);
}

}  // namespace rapidin::kernels
