// The CUDA layer against CPU references on fresh random data: scores against float64 sums, device top-k against
// the CPU selector (exact, ties included), the device sketch against RapidGrad::Apply (bitwise), and the
// scanner's hot and warm tiers against a float64 scan. Every test skips when no CUDA device is usable.
#include <cuda_runtime.h>

#include <cmath>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/cuda/launch.h"
#include "kernels/cuda/scanner.h"
#include "kernels/cuda/sketch.h"
#include "kernels/half.h"
#include "kernels/rapidgrad.h"
#include "kernels/topk.h"

namespace rapidin::gpu {
namespace {

std::string NoDeviceReason() {
  std::vector<DeviceInfo> devs;
  const Status st = ListDevices(&devs);
  return st.ok() ? "" : st.ToString();
}

#define SKIP_WITHOUT_GPU()                                                              \
  do {                                                                                  \
    const std::string why = NoDeviceReason();                                           \
    if (!why.empty()) GTEST_SKIP() << "no usable CUDA device: " << why;                 \
  } while (0)

#define CUDA_OK(expr) ASSERT_EQ((expr), cudaSuccess) << cudaGetErrorString(cudaGetLastError())

uint16_t ToBf16(float f) {  // round to nearest even
  uint32_t b;
  std::memcpy(&b, &f, 4);
  b += 0x7fffu + ((b >> 16) & 1u);
  return static_cast<uint16_t>(b >> 16);
}
float FromBf16(uint16_t h) {
  uint32_t b = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &b, 4);
  return f;
}

template <typename T>
struct DeviceArray {
  T* p = nullptr;
  explicit DeviceArray(size_t n) { EXPECT_EQ(cudaMalloc(&p, std::max<size_t>(n, 1) * sizeof(T)), cudaSuccess); }
  ~DeviceArray() { cudaFree(p); }
  void Put(const std::vector<T>& v) { EXPECT_EQ(cudaMemcpy(p, v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice), cudaSuccess); }
  std::vector<T> Get(size_t n) const {
    std::vector<T> v(n);
    EXPECT_EQ(cudaMemcpy(v.data(), p, n * sizeof(T), cudaMemcpyDeviceToHost), cudaSuccess);
    return v;
  }
};

struct ScoreCase {
  int64_t n, k;
  int q;
};

TEST(GpuKernels, ErrorsAreReturnedNotFatal) {
  // Bad arguments are rejected before any launch: this part needs no device.
  EXPECT_EQ(LaunchScore(StoreType::kF16, nullptr, 10, 8, nullptr, 1, nullptr, nullptr), cudaErrorInvalidValue);
  EXPECT_EQ(LaunchScore(StoreType::kF16, nullptr, 10, 8, nullptr, 0, nullptr, nullptr), cudaErrorInvalidValue);
  size_t bytes = 0;
  EXPECT_EQ(LaunchTopK(nullptr, &bytes, nullptr, int64_t{1} << 30, 4, 10, true, nullptr, nullptr, nullptr),
            cudaErrorInvalidValue);
  std::unique_ptr<Scanner> s;
  EXPECT_EQ(Scanner::Create(0, {}, &s).code(), Code::kInvalidArgument);
  std::vector<DeviceInfo> devs;
  const Status st = ListDevices(&devs);
  if (!st.ok()) {
    // Without a driver or device the runtime's reason comes back as UNAVAILABLE, not a crash.
    EXPECT_EQ(st.code(), Code::kUnavailable) << st.ToString();
    EXPECT_FALSE(st.message().empty());
    EXPECT_EQ(Scanner::Create(16, {}, &s).code(), Code::kUnavailable);
    return;
  }
  kernels::GpuOptions o;
  o.devices = {static_cast<int>(devs.size()) + 3};
  const Status bad = Scanner::Create(16, o, &s);
  EXPECT_EQ(bad.code(), Code::kInvalidArgument) << bad.ToString();
  EXPECT_NE(bad.message().find("no CUDA device"), std::string::npos);
}

class ScoreTest : public ::testing::TestWithParam<std::tuple<ScoreCase, bool>> {};

TEST_P(ScoreTest, MatchesFloat64Reference) {
  SKIP_WITHOUT_GPU();
  const auto [c, bf16] = GetParam();
  std::mt19937 rng(static_cast<uint32_t>(c.n * 31 + c.k * 7 + c.q + bf16));
  std::normal_distribution<float> nd;
  std::vector<uint16_t> store(c.n * c.k);
  std::vector<double> sv(store.size());
  for (size_t i = 0; i < store.size(); ++i) {
    const float v = nd(rng);
    store[i] = bf16 ? ToBf16(v) : kernels::FloatToHalf(v);
    sv[i] = bf16 ? FromBf16(store[i]) : kernels::HalfToFloat(store[i]);
  }
  std::vector<float> queries(static_cast<size_t>(c.q) * c.k);
  for (auto& v : queries) v = nd(rng);
  DeviceArray<uint16_t> ds(store.size());
  DeviceArray<float> dq(queries.size()), dout(static_cast<size_t>(c.n) * c.q);
  ds.Put(store);
  dq.Put(queries);
  CUDA_OK(cudaMemset(dout.p, 0xff, static_cast<size_t>(c.n) * c.q * sizeof(float)));  // NaN poison
  CUDA_OK(LaunchScore(bf16 ? StoreType::kBF16 : StoreType::kF16, ds.p, c.n, c.k, dq.p, c.q, dout.p, nullptr));
  CUDA_OK(cudaDeviceSynchronize());
  const auto out = dout.Get(static_cast<size_t>(c.n) * c.q);
  double err2 = 0, ref2 = 0, worst = 0;
  for (int j = 0; j < c.q; ++j) {
    for (int64_t r = 0; r < c.n; ++r) {
      double ref = 0, mag = 0;
      for (int64_t e = 0; e < c.k; ++e) {
        ref += sv[r * c.k + e] * queries[j * c.k + e];
        mag += std::fabs(sv[r * c.k + e] * queries[j * c.k + e]);
      }
      const double got = out[j * c.n + r];
      ASSERT_FALSE(std::isnan(got)) << "unwritten score at query " << j << " row " << r;
      err2 += (got - ref) * (got - ref);
      ref2 += ref * ref;
      worst = std::max(worst, std::fabs(got - ref) / mag);
    }
  }
  EXPECT_LT(std::sqrt(err2 / ref2), 1e-5);
  EXPECT_LT(worst, 1e-5);  // fp32 accumulation error relative to sum |x_i q_i|
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, ScoreTest,
    ::testing::Combine(::testing::Values(ScoreCase{1000, 4096, 1}, ScoreCase{777, 4096, 3},
                                         ScoreCase{513, 136, 8}, ScoreCase{301, 1000, 13},
                                         ScoreCase{50, 77, 2}, ScoreCase{3, 8, 5}),
                       ::testing::Bool()),
    [](const auto& info) {
      const ScoreCase c = std::get<0>(info.param);
      return "n" + std::to_string(c.n) + "_k" + std::to_string(c.k) + "_q" + std::to_string(c.q) +
             (std::get<1>(info.param) ? "_bf16" : "_f16");
    });

// Top-k on the device equals the CPU selector exactly: same rows, same scores, same order, ties included.
TEST(GpuKernels, TopKEqualsCpuSelector) {
  SKIP_WITHOUT_GPU();
  std::mt19937 rng(7);
  for (auto [n, q, k] : {std::tuple<int64_t, int, int>{10000, 1, 10}, {4097, 3, 100}, {50, 2, 80}, {1, 1, 5},
                         {20000, 5, 1000}, {5000, 2, 3000}, {70000, 2, 2048}}) {
    std::vector<float> scores(n * q);
    // Coarse values so that many scores tie; a few NaN and infinities.
    std::uniform_int_distribution<int> ui(-300, 300);
    for (auto& s : scores) s = ui(rng) / 16.0f;
    for (int i = 0; i < 20; ++i) scores[rng() % scores.size()] = std::nanf("");
    scores[rng() % scores.size()] = INFINITY;
    scores[rng() % scores.size()] = -INFINITY;
    DeviceArray<float> ds(scores.size());
    ds.Put(scores);
    size_t bytes = 0;
    CUDA_OK(LaunchTopK(nullptr, &bytes, nullptr, n, q, k, true, nullptr, nullptr, nullptr));
    DeviceArray<char> scratch(bytes);
    DeviceArray<uint32_t> key(static_cast<size_t>(q) * k), row(static_cast<size_t>(q) * k);
    for (bool largest : {true, false}) {
      CUDA_OK(LaunchTopK(scratch.p, &bytes, ds.p, n, q, k, largest, key.p, row.p, nullptr));
      CUDA_OK(cudaDeviceSynchronize());
      const auto keys = key.Get(static_cast<size_t>(q) * k), rows = row.Get(static_cast<size_t>(q) * k);
      for (int j = 0; j < q; ++j) {
        kernels::TopK cpu(k, largest);
        for (int64_t r = 0; r < n; ++r) cpu.Push(scores[j * n + r], r);
        const auto want = cpu.Sorted();
        std::vector<kernels::Candidate> got;
        for (int t = 0; t < k && !KeyIsNaN(keys[j * k + t]); ++t) {
          got.push_back({KeyToScore(keys[j * k + t]), rows[j * k + t]});
        }
        ASSERT_EQ(got.size(), want.size()) << "n=" << n << " q=" << j << " largest=" << largest;
        for (size_t t = 0; t < want.size(); ++t) {
          EXPECT_EQ(got[t].index, want[t].index) << "rank " << t;
          EXPECT_EQ(got[t].score, want[t].score) << "rank " << t;
        }
      }
    }
  }
}

// The device sketch adds in the CPU's order: bitwise-equal output.
TEST(GpuKernels, SketchBitwiseEqualsCpu) {
  SKIP_WITHOUT_GPU();
  std::mt19937 rng(3);
  std::normal_distribution<float> nd;
  for (auto [d, k, lambda] : {std::tuple<int64_t, int64_t, int>{10007, 64, 3}, {259328, 4096, 4}, {5, 8, 2}}) {
    std::string error;
    auto cpu = kernels::RapidGrad::Create({d, k, lambda, 99}, &error);
    ASSERT_NE(cpu, nullptr) << error;
    std::unique_ptr<GpuSketch> gpu;
    Status st = GpuSketch::Create(*cpu, 0, &gpu);
    ASSERT_TRUE(st.ok()) << st.ToString();
    const int batch = 3;
    std::vector<float> x(batch * d), out(batch * k, std::nanf(""));
    for (auto& v : x) v = nd(rng);
    st = gpu->Apply(x.data(), batch, out.data());
    ASSERT_TRUE(st.ok()) << st.ToString();
    for (int b = 0; b < batch; ++b) {
      const auto want = cpu->Apply(std::vector<float>(x.begin() + b * d, x.begin() + (b + 1) * d));
      ASSERT_EQ(std::memcmp(want.data(), out.data() + b * k, k * sizeof(float)), 0)
          << "d=" << d << " k=" << k << " vector " << b;
    }
  }
}

// A float64 scan over round-robin shards, the reference for the scanner.
std::vector<double> RefScores(const std::vector<uint16_t>& rows, int64_t k, const std::vector<float>& q, int j) {
  const int64_t n = static_cast<int64_t>(rows.size()) / k;
  std::vector<double> s(n);
  for (int64_t r = 0; r < n; ++r) {
    double acc = 0;
    for (int64_t e = 0; e < k; ++e) acc += kernels::HalfToFloat(rows[r * k + e]) * static_cast<double>(q[j * k + e]);
    s[r] = acc;
  }
  return s;
}

// Top-k ids agree with the float64 ranking except where scores are within fp32 rounding of each other.
void ExpectTopKMatches(const std::vector<kernels::Candidate>& got, const std::vector<double>& ref, int k,
                       bool largest, const std::string& what) {
  std::vector<int64_t> order(ref.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = static_cast<int64_t>(i);
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t a, int64_t b) { return largest ? ref[a] > ref[b] : ref[a] < ref[b]; });
  const size_t want = std::min<size_t>(k, ref.size());
  ASSERT_EQ(got.size(), want) << what;
  for (size_t t = 0; t < want; ++t) {
    const int64_t id = got[t].index;
    ASSERT_GE(id, 0);
    ASSERT_LT(id, static_cast<int64_t>(ref.size()));
    const double tol = 1e-3 + 2e-5 * std::fabs(ref[id]);  // fp32 accumulation over k products
    EXPECT_NEAR(got[t].score, ref[id], tol) << what << " rank " << t;
    if (id != order[t]) EXPECT_NEAR(ref[id], ref[order[t]], tol) << what << " rank " << t << " differs";
  }
}

class ScannerTest : public ::testing::TestWithParam<bool> {};  // param: force the warm (streamed) tier

TEST_P(ScannerTest, MatchesFloat64ScanAndFollowsIngest) {
  SKIP_WITHOUT_GPU();
  const bool warm = GetParam();
  const int64_t k = 520, shards = 3;
  int64_t n = 2500;
  std::mt19937 rng(warm ? 11 : 12);
  std::normal_distribution<float> nd;
  std::vector<uint16_t> all;
  auto append = [&](int64_t rows) {
    for (int64_t i = 0; i < rows * k; ++i) all.push_back(kernels::FloatToHalf(nd(rng)));
  };
  append(n);
  // Round-robin shards as the store deals them: global g in shard g % S at local row g / S.
  std::vector<std::vector<uint16_t>> host(shards);
  std::vector<uint64_t> gen(shards, 1), rewrite(shards, 0);
  auto deal = [&]() {
    for (auto& h : host) h.clear();
    const int64_t total = static_cast<int64_t>(all.size()) / k;
    for (int64_t g = 0; g < total; ++g) {
      host[g % shards].insert(host[g % shards].end(), all.begin() + g * k, all.begin() + (g + 1) * k);
    }
  };
  deal();
  kernels::GpuOptions o;
  o.chunk_bytes = 97 * k * 2;        // several chunks per shard, the last one partial
  o.max_chunk_scores = 700;          // several top-k passes for hot shards too
  o.force_nccl = HaveNccl();         // exercise the broadcast path even with one device
  if (warm) o.hot_limit_bytes = 0;
  std::unique_ptr<Scanner> scanner;
  Status st = Scanner::Create(k, o, &scanner);
  ASSERT_TRUE(st.ok()) << st.ToString();
  std::vector<uint64_t> bytes;
  for (auto& h : host) bytes.push_back(h.size() * 2);
  ASSERT_TRUE(scanner->Place(bytes).ok());
  for (int s = 0; s < shards; ++s) EXPECT_EQ(scanner->shard_hot(s), !warm);

  auto check = [&](const std::string& what, int64_t expect_top = -1) {
    const int q = 3, top_k = 25, harmful_k = 7;
    std::vector<float> queries(q * k);
    for (auto& v : queries) v = nd(rng);
    if (expect_top >= 0) {  // query 0 points at that row, which must then rank first
      for (int64_t e = 0; e < k; ++e) queries[e] = kernels::HalfToFloat(all[expect_top * k + e]);
    }
    ASSERT_TRUE(scanner->SetQueries(queries.data(), q).ok());
    std::vector<std::vector<std::vector<kernels::Candidate>>> hp(q), hm(q);
    for (int s = 0; s < shards; ++s) {
      const int64_t n = static_cast<int64_t>(host[s].size()) / k;
      kernels::ShardRows rows{host[s].data(), n, k, s, shards, gen[s], rewrite[s]};
      std::vector<std::vector<kernels::Candidate>> h, m;
      const Status scan = scanner->ScanShard(s, rows, top_k, harmful_k, &h, &m);
      ASSERT_TRUE(scan.ok()) << scan.ToString();
      for (int j = 0; j < q; ++j) {
        hp[j].push_back(h[j]);
        hm[j].push_back(m[j]);
      }
    }
    for (int j = 0; j < q; ++j) {
      const auto ref = RefScores(all, k, queries, j);
      const auto best = kernels::MergeTopK(hp[j], top_k, true);
      ExpectTopKMatches(best, ref, top_k, true, what + " helpful");
      if (j == 0 && expect_top >= 0) EXPECT_EQ(best[0].index, expect_top) << what;
      ExpectTopKMatches(kernels::MergeTopK(hm[j], harmful_k, false), ref, harmful_k, false, what + " harmful");
    }
    const kernels::TierBytes t = scanner->Usage();
    EXPECT_EQ(t.hot + t.warm, all.size() * 2) << what;
    EXPECT_EQ(warm ? t.hot : t.warm, 0u) << what;
  };
  check("initial");
  // Appends: only new rows need uploading; the generation tells the scanner.
  append(401);
  deal();
  for (auto& g : gen) ++g;
  check("after append");
  // An in-place overwrite of row 5 (shard 2): the rewrite generation forces a full upload.
  for (int64_t e = 0; e < k; ++e) all[5 * k + e] = kernels::FloatToHalf(4.0f * (e % 3 ? 1 : -1));
  deal();
  ++gen[5 % shards];
  rewrite[5 % shards] = gen[5 % shards];
  check("after overwrite", 5);
}

INSTANTIATE_TEST_SUITE_P(Tiers, ScannerTest, ::testing::Values(false, true),
                         [](const auto& info) { return info.param ? "warm" : "hot"; });

// A hot shard that outgrows its device budget is demoted to the warm tier and still scanned correctly.
TEST(GpuScanner, HotShardOutgrowingBudgetBecomesWarm) {
  SKIP_WITHOUT_GPU();
  const int64_t k = 64;
  std::mt19937 rng(5);
  std::normal_distribution<float> nd;
  std::vector<uint16_t> rows(1000 * k);
  for (auto& v : rows) v = kernels::FloatToHalf(nd(rng));
  kernels::GpuOptions o;
  o.hot_limit_bytes = 600 * k * 2;
  std::unique_ptr<Scanner> scanner;
  ASSERT_TRUE(Scanner::Create(k, o, &scanner).ok());
  ASSERT_TRUE(scanner->Place({200 * k * 2}).ok());
  ASSERT_TRUE(scanner->shard_hot(0));
  // Rows of another width are refused, not read past their end.
  const Status wrong_k = scanner->Sync(0, {rows.data(), 200, k / 2, 0, 1, 1, 0});
  EXPECT_EQ(wrong_k.code(), Code::kInvalidArgument) << wrong_k.ToString();
  ASSERT_TRUE(scanner->Sync(0, {rows.data(), 200, k, 0, 1, 1, 0}).ok());
  ASSERT_TRUE(scanner->shard_hot(0));
  std::vector<float> q(k);
  for (auto& v : q) v = nd(rng);
  ASSERT_TRUE(scanner->SetQueries(q.data(), 1).ok());
  std::vector<std::vector<kernels::Candidate>> h, m;
  ASSERT_TRUE(scanner->ScanShard(0, {rows.data(), 1000, k, 0, 1, 2, 0}, 10, 10, &h, &m).ok());
  EXPECT_FALSE(scanner->shard_hot(0));
  ExpectTopKMatches(h[0], RefScores(rows, k, q, 0), 10, true, "demoted");
  EXPECT_EQ(scanner->Usage().warm, rows.size() * 2);
}

}  // namespace
}  // namespace rapidin::gpu
