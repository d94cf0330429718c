// kernels/: fp16 conversion, scoring against a double-precision reference, AVX2 vs portable, top-k.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <random>
#include <tuple>
#include <vector>

#include "kernels/half.h"
#include "kernels/placement.h"
#include "kernels/score.h"
#include "kernels/topk.h"

namespace rapidin::kernels {
namespace {

std::mt19937_64& Rng() {
  static std::mt19937_64 rng(std::random_device{}());
  return rng;
}

std::vector<uint16_t> RandomHalves(size_t n) {
  std::normal_distribution<float> g(0.0f, 1.0f);
  std::vector<uint16_t> out(n);
  for (auto& h : out) h = FloatToHalf(g(Rng()));
  return out;
}

std::vector<float> RandomFloats(size_t n) {
  std::normal_distribution<float> g(0.0f, 1.0f);
  std::vector<float> out(n);
  for (auto& x : out) x = g(Rng());
  return out;
}

TEST(Half, RoundTripsEveryHalf) {
  for (uint32_t h = 0; h < 65536; ++h) {
    const float f = HalfToFloat(static_cast<uint16_t>(h));
    if (std::isnan(f)) {
      EXPECT_TRUE(std::isnan(HalfToFloat(FloatToHalf(f))));
      continue;
    }
    EXPECT_EQ(FloatToHalf(f), h) << "half 0x" << std::hex << h;
  }
}

TEST(Half, KnownValues) {
  EXPECT_EQ(FloatToHalf(1.0f), 0x3c00);
  EXPECT_EQ(FloatToHalf(-2.0f), 0xc000);
  EXPECT_EQ(FloatToHalf(65504.0f), 0x7bff);
  EXPECT_EQ(FloatToHalf(65520.0f), 0x7c00);  // rounds up to inf
  EXPECT_EQ(FloatToHalf(5.9604645e-08f), 0x0001);  // smallest subnormal
  EXPECT_EQ(FloatToHalf(2.9802322e-08f), 0x0000);  // 2^-25: tie to even (0)
  EXPECT_TRUE(FitsHalf(65504.0f));
  EXPECT_TRUE(FitsHalf(65519.0f));
  EXPECT_FALSE(FitsHalf(65520.0f));
  EXPECT_FALSE(FitsHalf(std::nanf("")));
  EXPECT_FLOAT_EQ(HalfToFloat(0x3555), 0.33325195f);
}

// FloatToHalf must return the nearest half, ties to even: checked against the neighbours in double.
TEST(Half, RoundsToNearestEven) {
  std::uniform_int_distribution<uint32_t> bits(0, 0x477fefffu);
  for (int i = 0; i < 200000; ++i) {
    uint32_t b = bits(Rng()) | (i % 2 ? 0x80000000u : 0u);
    float f;
    std::memcpy(&f, &b, 4);
    const uint16_t h = FloatToHalf(f);
    const double err = std::fabs(static_cast<double>(HalfToFloat(h)) - f);
    for (int d : {-1, 1}) {
      const uint16_t n = static_cast<uint16_t>(h + d);
      if ((n & 0x7c00) == 0x7c00 || ((h ^ n) & 0x8000)) continue;  // inf/nan or crossed the sign
      const double en = std::fabs(static_cast<double>(HalfToFloat(n)) - f);
      ASSERT_TRUE(err < en || (err == en && (h & 1) == 0)) << f << " -> 0x" << std::hex << h;
    }
  }
}

struct Shape {
  int64_t n, k;
  int q;
};

class ScoreTest : public ::testing::TestWithParam<Shape> {};

TEST_P(ScoreTest, MatchesDoubleReference) {
  const auto [n, k, q] = GetParam();
  const auto store = RandomHalves(n * k);
  const auto queries = RandomFloats(q * k);
  for (ScoreImpl impl : {ScoreImpl::kPortable, ScoreImpl::kAuto}) {
    std::vector<float> out(n * q, -1.0f);
    ASSERT_TRUE(ScoreF16(store.data(), n, k, queries.data(), q, out.data(), impl).ok());
    for (int64_t r = 0; r < n; ++r) {
      for (int j = 0; j < q; ++j) {
        double ref = 0, mag = 0;
        for (int64_t c = 0; c < k; ++c) {
          const double p = static_cast<double>(HalfToFloat(store[r * k + c])) * queries[j * k + c];
          ref += p;
          mag += std::fabs(p);
        }
        // fp32 accumulation over ~k/8 terms per lane: error grows at most linearly in the chain length.
        const double tol = (static_cast<double>(k) / 8 + 16) * 6e-8 * mag + 1e-30;
        ASSERT_NEAR(out[r * q + j], ref, tol) << ImplName(impl) << " row " << r << " query " << j;
      }
    }
  }
}

TEST_P(ScoreTest, Avx2EqualsPortableBitwise) {
  if (!Avx2Available()) GTEST_SKIP() << "this CPU lacks AVX2/F16C/FMA";
  const auto [n, k, q] = GetParam();
  const auto store = RandomHalves(n * k);
  const auto queries = RandomFloats(q * k);
  std::vector<float> a(n * q), b(n * q);
  ASSERT_TRUE(ScoreF16(store.data(), n, k, queries.data(), q, a.data(), ScoreImpl::kAvx2).ok());
  ASSERT_TRUE(ScoreF16(store.data(), n, k, queries.data(), q, b.data(), ScoreImpl::kPortable).ok());
  ASSERT_EQ(0, std::memcmp(a.data(), b.data(), a.size() * sizeof(float)));
}

INSTANTIATE_TEST_SUITE_P(Shapes, ScoreTest,
                         ::testing::Values(Shape{1, 1, 1}, Shape{7, 3, 1}, Shape{13, 8, 2}, Shape{33, 257, 1},
                                           Shape{17, 1031, 3}, Shape{9, 4096, 8}, Shape{11, 129, 11},
                                           Shape{5, 4099, 17}, Shape{7, 5000, 9}, Shape{64, 64, 4}, Shape{3, 65536, 1},
                                           // the wide (AVX-512VL) tiles: full 8-query blocks, a short last block,
                                           // short last row tiles, and rows long enough for the chunk-outer order
                                           Shape{10, 1029, 32}, Shape{8, 100, 8}, Shape{4, 40007, 9},
                                           // the pair kernel (even q): 6-row tiles with a short one, 3 pairs, and
                                           // the chunk-outer order with a short last block and a K tail
                                           Shape{7, 2051, 6}, Shape{13, 40007, 10}));

TEST(Score, RejectsNegativeSizes) {
  float out[1];
  EXPECT_EQ(ScoreF16(nullptr, -1, 4, nullptr, 1, out).code(), absl::StatusCode::kInvalidArgument);
}

std::vector<Candidate> BruteTopK(const std::vector<float>& scores, int k, bool largest) {
  std::vector<Candidate> all;
  for (size_t i = 0; i < scores.size(); ++i) {
    if (!std::isnan(scores[i])) all.push_back({scores[i], static_cast<int64_t>(i)});
  }
  std::sort(all.begin(), all.end(), [&](const Candidate& a, const Candidate& b) {
    if (a.score != b.score) return largest ? a.score > b.score : a.score < b.score;
    return a.index < b.index;
  });
  if (static_cast<int>(all.size()) > k) all.resize(k);
  return all;
}

TEST(TopK, MatchesSortWithTiesAndNaN) {
  std::uniform_int_distribution<int> small(-5, 5);
  for (int trial = 0; trial < 50; ++trial) {
    const int n = 1 + trial * 7;
    std::vector<float> scores(n);
    for (auto& s : scores) s = static_cast<float>(small(Rng()));  // many ties
    scores[n / 2] = std::nanf("");
    for (int k : {0, 1, 3, n / 2, n, n + 5}) {
      for (bool largest : {true, false}) {
        TopK sel(k, largest);
        for (int i = 0; i < n; ++i) sel.Push(scores[i], i);
        const auto got = sel.Sorted();
        const auto want = BruteTopK(scores, k, largest);
        ASSERT_EQ(got.size(), want.size());
        for (size_t i = 0; i < got.size(); ++i) {
          ASSERT_EQ(got[i].index, want[i].index) << "k=" << k << " largest=" << largest << " pos " << i;
          ASSERT_EQ(got[i].score, want[i].score);
        }
      }
    }
  }
}

TEST(TopK, MergeOfPartsEqualsWhole) {
  std::vector<float> scores(1000);
  std::uniform_int_distribution<int> small(-20, 20);
  for (auto& s : scores) s = static_cast<float>(small(Rng()));
  std::vector<std::vector<Candidate>> parts(3);
  for (int p = 0; p < 3; ++p) {
    TopK sel(25, true);
    for (size_t i = p; i < scores.size(); i += 3) sel.Push(scores[i], static_cast<int64_t>(i));
    parts[p] = sel.Sorted();
  }
  const auto merged = MergeTopK(parts, 25, true);
  const auto want = BruteTopK(scores, 25, true);
  ASSERT_EQ(merged.size(), want.size());
  for (size_t i = 0; i < want.size(); ++i) EXPECT_EQ(merged[i].index, want[i].index);
}

// MergeParts with a source per part (the router's shard servers, whose row indices repeat across sources) equals a
// full sort of every candidate by (score, source, row), and says where each came from. Few distinct scores and
// overlapping indices make ties on score and on index common.
TEST(TopK, MergePartsWithSourcesEqualsFullSort) {
  std::uniform_int_distribution<int> small(-6, 6), row(0, 30), len(0, 12);
  for (int trial = 0; trial < 50; ++trial) {
    const int n_parts = 1 + trial % 5;
    std::vector<std::vector<Candidate>> parts(n_parts);
    std::vector<int64_t> source(n_parts);
    for (int p = 0; p < n_parts; ++p) {
      source[p] = (p * 7 + trial) % n_parts;  // sources in another order than the parts
      const int n = len(Rng());
      for (int i = 0; i < n; ++i) parts[p].push_back({static_cast<float>(small(Rng())), row(Rng())});
    }
    if (trial % 3 == 0) parts[0].insert(parts[0].begin(), {std::nanf(""), 1});  // never kept
    for (const bool largest : {true, false}) {
      struct Ref {
        double score;
        int64_t source, index;
        int part, position;
      };
      std::vector<Ref> all;
      for (int p = 0; p < n_parts; ++p) {
        for (size_t i = 0; i < parts[p].size(); ++i) {
          if (std::isnan(parts[p][i].score)) continue;
          all.push_back({parts[p][i].score, source[p], parts[p][i].index, p, static_cast<int>(i)});
        }
      }
      std::stable_sort(all.begin(), all.end(), [&](const Ref& a, const Ref& b) {
        if (a.score != b.score) return largest ? a.score > b.score : a.score < b.score;
        return std::tie(a.source, a.index) < std::tie(b.source, b.index);
      });
      const int k = trial % 9;
      const auto got = MergeParts(parts, k, largest, source);
      ASSERT_EQ(got.size(), std::min<size_t>(k, all.size()));
      for (size_t i = 0; i < got.size(); ++i) {
        EXPECT_EQ(got[i].c.score, all[i].score) << trial << " " << i;
        EXPECT_EQ(source[got[i].part], all[i].source) << trial << " " << i;
        EXPECT_EQ(got[i].c.index, all[i].index) << trial << " " << i;
        // The reference and the merge may order exact duplicates (same score, source, row) differently; the
        // position must still name a candidate equal to the one returned.
        const Candidate& at = parts[got[i].part][got[i].position];
        EXPECT_EQ(at.score, got[i].c.score);
        EXPECT_EQ(at.index, got[i].c.index);
      }
    }
  }
}

// ScanTopK on interleaved shards, merged, equals the top-k of all scores (N not a multiple of the shards, k > N),
// bitwise: 3 query vectors, 10 (the pair kernel with queries packed once per scan, a short last block), and 10 with
// rows long enough for the chunk-outer order.
class ScanTopKTest : public ::testing::TestWithParam<Shape> {};

TEST_P(ScanTopKTest, ShardedScanEqualsBruteForce) {
  const auto [n, k, q] = GetParam();
  const int shards = 4;
  const auto store = RandomHalves(n * k);
  const auto queries = RandomFloats(q * k);
  std::vector<float> all(n * q);
  ASSERT_TRUE(ScoreF16(store.data(), n, k, queries.data(), q, all.data(), ScoreImpl::kPortable).ok());
  for (int top : {5, 2000}) {
    std::vector<std::vector<std::vector<Candidate>>> help(q), harm(q);
    for (int s = 0; s < shards; ++s) {
      std::vector<uint16_t> rows;
      for (int64_t g = s; g < n; g += shards) rows.insert(rows.end(), store.begin() + g * k, store.begin() + (g + 1) * k);
      std::vector<TopK> h, m;
      for (int j = 0; j < q; ++j) {
        h.emplace_back(top, true);
        m.emplace_back(top, false);
      }
      ASSERT_TRUE(ScanTopK(rows.data(), rows.size() / k, k, queries.data(), q, s, shards, &h, &m).ok());
      for (int j = 0; j < q; ++j) {
        help[j].push_back(h[j].Sorted());
        harm[j].push_back(m[j].Sorted());
      }
    }
    for (int j = 0; j < q; ++j) {
      std::vector<float> sj(n);
      for (int64_t r = 0; r < n; ++r) sj[r] = all[r * q + j];
      for (bool largest : {true, false}) {
        const auto got = MergeTopK(largest ? help[j] : harm[j], top, largest);
        const auto want = BruteTopK(sj, top, largest);
        ASSERT_EQ(got.size(), want.size());
        for (size_t i = 0; i < want.size(); ++i) {
          ASSERT_EQ(got[i].index, want[i].index);
          ASSERT_EQ(got[i].score, want[i].score);
        }
      }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Shapes, ScanTopKTest,
                         ::testing::Values(Shape{1001, 37, 3}, Shape{1001, 37, 10}, Shape{31, 40007, 10}));

// Selectors that already hold later rows (a second segment scanned first) must still take equal scores from earlier
// rows, which rank first: ScanTopK skips only scores strictly past a selector's threshold. Every row is the same,
// so every score ties; both ends keep rows 0..k-1. And a NaN row is never kept.
TEST(ScanTopK, TiesFromEarlierRowsEnterFullSelectors) {
  const int64_t n = 40, k = 24;
  const int q = 8, top = 5;
  const auto one = RandomHalves(k);
  std::vector<uint16_t> store;
  for (int64_t r = 0; r < n; ++r) store.insert(store.end(), one.begin(), one.end());
  for (int64_t c = 0; c < k; ++c) store[7 * k + c] = 0x7E00;  // a NaN row
  const auto queries = RandomFloats(q * k);
  std::vector<TopK> h, m;
  for (int j = 0; j < q; ++j) {
    h.emplace_back(top, true);
    m.emplace_back(top, false);
  }
  ASSERT_TRUE(ScanTopK(store.data() + n / 2 * k, n / 2, k, queries.data(), q, n / 2, 1, &h, &m).ok());
  ASSERT_TRUE(ScanTopK(store.data(), n / 2, k, queries.data(), q, 0, 1, &h, &m).ok());
  for (int j = 0; j < q; ++j) {
    for (const TopK* t : {&h[j], &m[j]}) {
      const auto got = t->Sorted();
      ASSERT_EQ(got.size(), static_cast<size_t>(top));
      std::vector<int64_t> want = {0, 1, 2, 3, 4}, idx;
      for (const auto& c : got) idx.push_back(c.index);
      EXPECT_EQ(idx, want) << "query " << j << (t->largest() ? " helpful" : " harmful");
    }
  }
}

}  // namespace
}  // namespace rapidin::kernels

namespace rapidin::kernels {
namespace {

// GPU shard placement (several devices can only be simulated here: the GPU machine has one).
TEST(Placement, LargestFirstOnTheFreestDeviceElseWarmOnTheLeastLoaded) {
  // Sizes in order 400 250 120 90 60 50 against budgets {100, 300, 200}: 400 fits nowhere (warm on device 0),
  // 250 -> 1 (300 left), 120 -> 2 (200), 90 -> 0 (100), 60 -> 2 (80), 50 -> 1 (exactly its 50).
  const auto p = PlaceShards({50, 250, 120, 400, 90, 60}, {100, 300, 200});
  const std::vector<std::pair<int, bool>> want = {{1, true}, {1, true}, {2, true}, {0, false}, {0, true}, {2, true}};
  ASSERT_EQ(p.size(), want.size());
  for (size_t i = 0; i < want.size(); ++i) {
    EXPECT_EQ(p[i].device, want[i].first) << "shard " << i;
    EXPECT_EQ(p[i].hot, want[i].second) << "shard " << i;
  }
  // No hot budget: warm shards go to the device with the fewest warm bytes so far (5 -> 0, 3 -> 1, 3 -> 1, 2 -> 0).
  const auto w = PlaceShards({5, 3, 3, 2}, {0, 0});
  EXPECT_EQ((std::vector<int>{w[0].device, w[1].device, w[2].device, w[3].device}), (std::vector<int>{0, 1, 1, 0}));
  for (const auto& x : w) EXPECT_FALSE(x.hot);
  for (const auto& x : PlaceShards({7, 1}, {})) EXPECT_EQ(x.device, 0);
}

TEST(Placement, RandomLayoutsKeepBudgetsAndBalanceWarmBytes) {
  std::mt19937 rng(std::random_device{}());
  for (int iter = 0; iter < 500; ++iter) {
    const int devices = 1 + static_cast<int>(rng() % 4), shards = static_cast<int>(rng() % 20);
    std::vector<uint64_t> budget(devices), bytes(shards);
    for (auto& b : budget) b = rng() % 1000;
    for (auto& b : bytes) b = 1 + rng() % 400;
    const auto p = PlaceShards(bytes, budget);
    ASSERT_EQ(p.size(), bytes.size());
    std::vector<uint64_t> hot(devices, 0), warm(devices, 0);
    uint64_t largest_warm = 0;
    for (int s = 0; s < shards; ++s) {
      ASSERT_GE(p[s].device, 0);
      ASSERT_LT(p[s].device, devices);
      (p[s].hot ? hot : warm)[p[s].device] += bytes[s];
      if (!p[s].hot) largest_warm = std::max(largest_warm, bytes[s]);
    }
    for (int d = 0; d < devices; ++d) EXPECT_LE(hot[d], budget[d]) << "iteration " << iter << " device " << d;
    // A warm shard is one that fitted on no device when its turn came (largest first): replay the budgets.
    std::vector<int> order(shards);
    for (int s = 0; s < shards; ++s) order[s] = s;
    std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return bytes[a] > bytes[b]; });
    std::vector<uint64_t> left = budget;
    for (int s : order) {
      const uint64_t most = *std::max_element(left.begin(), left.end());
      if (p[s].hot) {
        EXPECT_EQ(left[p[s].device], most) << "iteration " << iter << ": hot shard " << s << " not on the freest device";
        left[p[s].device] -= bytes[s];
      } else {
        EXPECT_GT(bytes[s], most) << "iteration " << iter << ": warm shard " << s << " would have fitted";
      }
    }
    const auto [lo, hi] = std::minmax_element(warm.begin(), warm.end());
    EXPECT_LE(*hi - *lo, largest_warm) << "iteration " << iter;
  }
}

}  // namespace
}  // namespace rapidin::kernels
