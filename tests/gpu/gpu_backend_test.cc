// The CUDA backend of the query engine against the CPU backend on the same random store: same top-k ids
// (except near-ties), scores within fp32 rounding, through hot and streamed tiers, before and after ingests that
// append rows and replace rows in place, and with cold rows read from disk. Skips when no CUDA device is usable.
#include <cmath>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "query/query_engine.h"
#include "storage/store.h"
#include "tests/test_util.h"

namespace rapidin::query {
namespace {

using rapidin::testing::Item;
using rapidin::testing::SeededVector;
using rapidin::testing::TempDir;

void ExpectSameRanking(const SearchResult& cpu, const SearchResult& gpu, const std::string& what) {
  ASSERT_EQ(cpu.helpful.size(), gpu.helpful.size());
  for (size_t j = 0; j < cpu.helpful.size(); ++j) {
    for (int side = 0; side < 2; ++side) {
      const auto& a = side == 0 ? cpu.helpful[j] : cpu.harmful[j];
      const auto& b = side == 0 ? gpu.helpful[j] : gpu.harmful[j];
      ASSERT_EQ(a.size(), b.size()) << what;
      for (size_t t = 0; t < a.size(); ++t) {
        const double tol = 1e-4 * (1 + std::fabs(a[t].score));
        EXPECT_NEAR(a[t].score, b[t].score, tol) << what << " query " << j << " rank " << t;
        if (a[t].index != b[t].index) {
          // Only a near-tie may swap places.
          EXPECT_NEAR(a[t].score, b[t].score, tol) << what << " ids " << a[t].index << " vs " << b[t].index;
        }
      }
    }
  }
}

TEST(GpuBackend, MatchesCpuBackendAcrossTiersAndIngest) {
  const absl::Status usable = CudaBackendUsable();
  if (!usable.ok()) GTEST_SKIP() << "no usable CUDA device: " << usable.message();
  TempDir dir;
  const int k = 264;
  storage::StoreOptions so;
  so.create_if_missing = true;
  so.k = k;
  so.num_shards = 3;
  so.host_allocator = CudaHostAllocator();
  auto store = storage::Store::Open(dir.path("s"), so);
  ASSERT_TRUE(store.ok()) << store.status();
  auto add = [&](int from, int to) {
    std::vector<storage::IngestItem> batch;
    for (int i = from; i < to; ++i) batch.push_back(Item("r" + std::to_string(i), SeededVector(i, k)));
    ASSERT_TRUE((*store)->Ingest(batch).ok());
  };
  add(0, 4001);

  QueryEngine::Options cpu_o;
  cpu_o.backend = "cpu";
  auto cpu = QueryEngine::Create(store->get(), cpu_o);
  ASSERT_TRUE(cpu.ok()) << cpu.status();
  QueryEngine::Options hot_o;
  hot_o.backend = "cuda";
  auto hot = QueryEngine::Create(store->get(), hot_o);
  ASSERT_TRUE(hot.ok()) << hot.status();
  QueryEngine::Options warm_o = hot_o;
  warm_o.gpu.hot_limit_bytes = 0;
  warm_o.gpu.chunk_bytes = 300 * k * 2;  // several streamed chunks per shard
  auto warm = QueryEngine::Create(store->get(), warm_o);
  ASSERT_TRUE(warm.ok()) << warm.status();
  EXPECT_NE((*hot)->backend().find("cuda"), std::string::npos);

  auto compare = [&](const std::string& what, uint64_t seed) {
    const int q = 3;
    std::vector<float> queries;
    for (int j = 0; j < q; ++j) {
      auto v = SeededVector(seed + j, k);
      queries.insert(queries.end(), v.begin(), v.end());
    }
    auto c = (*cpu)->Search(queries, q, 30, 9);
    ASSERT_TRUE(c.ok()) << c.status();
    for (auto* e : {&*hot, &*warm}) {
      auto g = (*e)->Search(queries, q, 30, 9);
      ASSERT_TRUE(g.ok()) << g.status();
      ExpectSameRanking(*c, *g, what + " " + (*e)->backend());
    }
    const uint64_t bytes = (*store)->size() * k * 2;
    EXPECT_EQ((*hot)->GpuUsage().hot, bytes) << what;
    EXPECT_EQ((*warm)->GpuUsage().warm, bytes) << what;
    EXPECT_EQ((*warm)->GpuUsage().hot, 0u) << what;
  };
  compare("initial", 1000000);
  add(4001, 4500);  // appends
  compare("after append", 2000000);
  // Replace rows in place: the row that query 0 points at must come first on every backend.
  std::vector<storage::IngestItem> replace;
  auto target = SeededVector(3000000, k);
  for (auto& v : target) v *= 3.0f;
  replace.push_back(Item("r17", target));
  replace.push_back(Item("r18", SeededVector(5, k)));
  ASSERT_TRUE((*store)->Ingest(replace).ok());
  compare("after replace", 3000000);
  std::vector<float> q0 = SeededVector(3000000, k);
  auto g = (*hot)->Search(q0, 1, 1, 0);
  ASSERT_TRUE(g.ok());
  EXPECT_EQ(g->helpful[0][0].index, 17);
}

// Cold rows (beyond the host budget) are read from disk and scored on the CPU by the GPU workers; the merged
// answer equals the CPU backend's over the same store.
TEST(GpuBackend, ColdRowsJoinTheGpuScan) {
  const absl::Status usable = CudaBackendUsable();
  if (!usable.ok()) GTEST_SKIP() << "no usable CUDA device: " << usable.message();
  TempDir dir;
  const int k = 136;
  {
    storage::StoreOptions so;
    so.create_if_missing = true;
    so.k = k;
    auto store = storage::Store::Open(dir.path("s"), so);
    ASSERT_TRUE(store.ok()) << store.status();
    std::vector<storage::IngestItem> batch;
    for (int i = 0; i < 4001; ++i) batch.push_back(Item("r" + std::to_string(i), SeededVector(i, k)));
    ASSERT_TRUE((*store)->Ingest(batch).ok());
  }
  storage::StoreOptions so;
  so.num_shards = 2;
  so.host_budget_bytes = 1500 * k * 2;
  so.host_allocator = CudaHostAllocator();
  auto store = storage::Store::Open(dir.path("s"), so);
  ASSERT_TRUE(store.ok()) << store.status();
  QueryEngine::Options cpu_o;
  cpu_o.backend = "cpu";
  cpu_o.cold_chunk_bytes = 400 * k * 2;
  QueryEngine::Options gpu_o = cpu_o;
  gpu_o.backend = "cuda";
  auto cpu = QueryEngine::Create(store->get(), cpu_o);
  auto gpu = QueryEngine::Create(store->get(), gpu_o);
  ASSERT_TRUE(cpu.ok() && gpu.ok()) << gpu.status();
  std::vector<float> queries;
  for (int j = 0; j < 2; ++j) {
    auto v = SeededVector(7000000 + j, k);
    queries.insert(queries.end(), v.begin(), v.end());
  }
  auto c = (*cpu)->Search(queries, 2, 25, 7);
  auto g = (*gpu)->Search(queries, 2, 25, 7);
  ASSERT_TRUE(c.ok() && g.ok()) << g.status();
  ExpectSameRanking(*c, *g, "cold rows");
  int64_t cold = 0, rows = 0;
  for (const auto& t : g->shard_timings) {
    cold += t.cold_rows;
    rows += t.rows;
  }
  EXPECT_EQ(cold, 4001 - 1500);
  EXPECT_EQ(rows, 4001);
  EXPECT_EQ((*gpu)->GpuUsage().hot, 1500u * k * 2);  // only resident rows go to the GPU
}

TEST(GpuBackend, UnknownBackendAndMissingDeviceAreClearErrors) {
  TempDir dir;
  storage::StoreOptions so;
  so.create_if_missing = true;
  so.k = 8;
  auto store = storage::Store::Open(dir.path("s"), so);
  ASSERT_TRUE(store.ok());
  QueryEngine::Options o;
  o.backend = "tpu";
  auto e = QueryEngine::Create(store->get(), o);
  EXPECT_EQ(e.status().code(), absl::StatusCode::kInvalidArgument);
  o.backend = "cuda";
  o.gpu.devices = {99};
  e = QueryEngine::Create(store->get(), o);
  EXPECT_FALSE(e.ok());
  EXPECT_NE(e.status().message().find("CUDA"), std::string::npos) << e.status();
}

}  // namespace
}  // namespace rapidin::query
