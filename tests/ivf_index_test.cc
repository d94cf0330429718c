// The IVF index (query/ivf_index.h): against the exact scan on fresh clustered data (every list probed gives the
// exact answer; a few lists keep recall high and every returned score exact), persistence (round trip, a store
// written behind the index's back, damaged and foreign files), and the lists following ingest and delete.
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <random>
#include <set>

#include "query/ivf_index.h"
#include "query/query_engine.h"
#include "tests/test_util.h"

namespace rapidin::query {
namespace {

using rapidin::testing::Item;
using rapidin::testing::TempDir;

constexpr int kK = 96;
constexpr int kClusters = 24;

// Rows near kClusters random unit directions (unit norm, like layer-normalised gradients), plus query vectors
// near the same directions. Fresh data every run: the seed is printed on failure.
struct Data {
  explicit Data(uint64_t seed) : rng(seed) {
    std::normal_distribution<float> g;
    for (int c = 0; c < kClusters; ++c) centers.push_back(Unit(Noise(1.0f)));
  }
  std::vector<float> Noise(float s) {
    std::normal_distribution<float> g(0.0f, s);
    std::vector<float> v(kK);
    for (auto& x : v) x = g(rng);
    return v;
  }
  static std::vector<float> Unit(std::vector<float> v) {
    double n = 0;
    for (float x : v) n += double(x) * x;
    for (auto& x : v) x = static_cast<float>(x / std::sqrt(n));
    return v;
  }
  std::vector<float> Near(int c, float spread) {
    std::vector<float> v = Noise(spread / std::sqrt(float(kK)));
    for (int i = 0; i < kK; ++i) v[i] += centers[c][i];
    return Unit(v);
  }
  std::vector<float> Row() { return Near(static_cast<int>(rng() % kClusters), 0.6f); }

  std::mt19937_64 rng;
  std::vector<std::vector<float>> centers;
};

uint64_t Seed() { return rapidin::testing::FuzzSeed(); }

std::unique_ptr<storage::Store> MakeStore(const std::string& path, Data& d, int n, int shards = 3,
                                          uint64_t host_budget = 0) {
  storage::StoreOptions so;
  so.create_if_missing = true;
  so.k = kK;
  so.num_shards = shards;
  so.sync_writes = false;
  so.host_budget_bytes = host_budget;
  auto store = storage::Store::Open(path, so);
  EXPECT_TRUE(store.ok()) << store.status();
  std::vector<storage::IngestItem> batch;
  for (int i = 0; i < n; ++i) {
    batch.push_back(Item("r" + std::to_string(i), d.Row()));
    if (batch.size() == 500 || i == n - 1) {
      EXPECT_TRUE((*store)->Ingest(batch).ok());
      batch.clear();
    }
  }
  return std::move(*store);
}

std::unique_ptr<storage::Store> Reopen(const std::string& path, uint64_t host_budget = 0) {
  storage::StoreOptions so;
  so.num_shards = 3;
  so.host_budget_bytes = host_budget;
  auto store = storage::Store::Open(path, so);
  EXPECT_TRUE(store.ok()) << store.status();
  return std::move(*store);
}

SearchResult Search(const storage::Store& store, const IvfIndex* ivf, int nprobe, const std::vector<float>& q,
                    int nq, int k) {
  QueryEngine::Options o;
  o.ivf = ivf;
  o.nprobe = nprobe;
  auto engine = QueryEngine::Create(&store, o);
  EXPECT_TRUE(engine.ok()) << engine.status();
  auto r = (*engine)->Search(q, nq, k, k);
  EXPECT_TRUE(r.ok()) << r.status();
  return *r;
}

double Recall(const std::vector<kernels::Candidate>& got, const std::vector<kernels::Candidate>& want) {
  std::set<int64_t> w;
  for (const auto& c : want) w.insert(c.index);
  int hit = 0;
  for (const auto& c : got) hit += w.count(c.index);
  return want.empty() ? 1.0 : double(hit) / want.size();
}

TEST(IvfIndex, EveryListProbedIsTheExactScan) {
  SCOPED_TRACE(rapidin::testing::FuzzReplay());
  TempDir dir;
  Data d(Seed());
  auto store = MakeStore(dir.path("s"), d, 3000);
  IvfOptions io;
  io.nlist = 20;
  auto index = IvfIndex::Build(*store, io);
  ASSERT_TRUE(index.ok()) << index.status();
  EXPECT_EQ((*index)->rows(), 3000u);
  std::vector<float> q;
  for (int j = 0; j < 4; ++j) {
    auto v = d.Row();
    q.insert(q.end(), v.begin(), v.end());
  }
  const SearchResult exact = Search(*store, nullptr, 0, q, 4, 25);
  const SearchResult all = Search(*store, index->get(), 20, q, 4, 25);
  for (int j = 0; j < 4; ++j) {
    ASSERT_EQ(all.helpful[j].size(), 25u);
    for (size_t i = 0; i < 25; ++i) {
      EXPECT_EQ(all.helpful[j][i].index, exact.helpful[j][i].index);
      EXPECT_EQ(all.helpful[j][i].score, exact.helpful[j][i].score);  // bitwise: the same kernel on the same rows
      EXPECT_EQ(all.harmful[j][i].index, exact.harmful[j][i].index);
      EXPECT_EQ(all.harmful[j][i].score, exact.harmful[j][i].score);
    }
  }
}

TEST(IvfIndex, FewListsKeepRecallAndExactScoresAtBothEnds) {
  SCOPED_TRACE(rapidin::testing::FuzzReplay());
  TempDir dir;
  Data d(Seed() + 1);
  auto store = MakeStore(dir.path("s"), d, 6000);
  IvfOptions io;
  io.nlist = 48;
  auto index = IvfIndex::Build(*store, io);
  ASSERT_TRUE(index.ok()) << index.status();
  const int nq = 16;
  std::vector<float> q;
  for (int j = 0; j < nq; ++j) {
    auto v = d.Row();
    q.insert(q.end(), v.begin(), v.end());
  }
  const SearchResult exact = Search(*store, nullptr, 0, q, nq, 10);
  const SearchResult ann = Search(*store, index->get(), 8, q, nq, 10);
  double rh = 0, rm = 0;
  int64_t scanned = 0;
  for (const auto& t : ann.shard_timings) scanned += t.rows;
  for (int j = 0; j < nq; ++j) {
    rh += Recall(ann.helpful[j], exact.helpful[j]) / nq;
    rm += Recall(ann.harmful[j], exact.harmful[j]) / nq;
    for (const auto& c : ann.helpful[j]) {  // every score is the exact one
      auto v = store->GetVector(c.index);
      double dot = 0;
      for (int i = 0; i < kK; ++i) dot += double((*v)[i]) * q[j * kK + i];
      EXPECT_NEAR(c.score, dot, 1e-5 * std::max(1.0, std::fabs(dot)));
    }
  }
  EXPECT_GE(rh, 0.9);
  EXPECT_GE(rm, 0.9);
  // 16 of 48 lists at most (8 per end): well under the whole store for 16 vectors.
  EXPECT_LT(scanned, int64_t{nq} * 6000 / 2);
}

TEST(IvfIndex, SavedIndexLoadsAndNoticesWritesBehindItsBack) {
  SCOPED_TRACE(rapidin::testing::FuzzReplay());
  TempDir dir;
  Data d(Seed() + 2);
  const std::string path = dir.path("s");
  IvfOptions io;
  io.nlist = 16;
  std::vector<uint64_t> before;
  std::vector<float> q = d.Row();
  {
    auto store = MakeStore(path, d, 2000);
    std::string how;
    auto index = IvfIndex::Open(*store, io, false, &how);
    ASSERT_TRUE(index.ok()) << index.status();
    EXPECT_NE(how.find("built"), std::string::npos) << how;
    before = (*index)->Candidates(q.data(), 3);
  }
  {
    auto store = Reopen(path);  // no writes: the saved index is current
    auto loaded = IvfIndex::Load(IvfIndex::DefaultPath(path), *store);
    ASSERT_TRUE(loaded.ok()) << loaded.status();
    EXPECT_FALSE((*loaded)->stale());
    EXPECT_EQ((*loaded)->Candidates(q.data(), 3), before);
    // Another writer (rapidin cache, say) adds a row equal to the query while no server runs.
    ASSERT_TRUE(store->Ingest({Item("new", q)}).ok());
  }
  auto store = Reopen(path);
  auto loaded = IvfIndex::Load(IvfIndex::DefaultPath(path), *store);
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  EXPECT_TRUE((*loaded)->stale());
  std::string how;
  auto index = IvfIndex::Open(*store, io, false, &how);
  ASSERT_TRUE(index.ok()) << index.status();
  EXPECT_NE(how.find("reassigned"), std::string::npos) << how;
  EXPECT_EQ((*index)->rows(), 2001u);
  const SearchResult r = Search(*store, index->get(), 2, q, 1, 1);
  ASSERT_EQ(r.helpful[0].size(), 1u);
  EXPECT_EQ(r.helpful[0][0].index, 2000);  // the new row, found through the index
}

TEST(IvfIndex, DamagedOrForeignFilesAreRefusedAndRebuilt) {
  SCOPED_TRACE(rapidin::testing::FuzzReplay());
  TempDir dir;
  Data d(Seed() + 3);
  const std::string path = dir.path("s");
  auto store = MakeStore(path, d, 800);
  IvfOptions io;
  io.nlist = 8;
  std::string how;
  ASSERT_TRUE(IvfIndex::Open(*store, io, false, &how).ok());
  const std::string file = IvfIndex::DefaultPath(path);
  std::string good;
  {
    std::ifstream f(file, std::ios::binary);
    good.assign(std::istreambuf_iterator<char>(f), {});
  }
  auto write = [&](const std::string& s) { std::ofstream(file, std::ios::binary | std::ios::trunc) << s; };
  write(good.substr(0, good.size() / 2));
  EXPECT_EQ(IvfIndex::Load(file, *store).status().code(), absl::StatusCode::kDataLoss);
  std::mt19937_64 rng(Seed());
  for (int t = 0; t < 20; ++t) {
    std::string bad = good;
    bad[rng() % bad.size()] ^= static_cast<char>(1 + rng() % 255);
    write(bad);
    auto l = IvfIndex::Load(file, *store);
    EXPECT_EQ(l.status().code(), absl::StatusCode::kDataLoss) << l.status();
  }
  write("");
  EXPECT_EQ(IvfIndex::Load(file, *store).status().code(), absl::StatusCode::kDataLoss);
  auto rebuilt = IvfIndex::Open(*store, io, false, &how);
  ASSERT_TRUE(rebuilt.ok()) << rebuilt.status();
  EXPECT_NE(how.find("damaged"), std::string::npos) << how;
  EXPECT_EQ((*rebuilt)->rows(), 800u);
  std::filesystem::remove(file);
  EXPECT_EQ(IvfIndex::Load(file, *store).status().code(), absl::StatusCode::kNotFound);

  // An index made for another store (K differs) is refused by name.
  TempDir other;
  storage::StoreOptions so;
  so.create_if_missing = true;
  so.k = kK + 1;
  auto s2 = storage::Store::Open(other.path("s"), so);
  ASSERT_TRUE(s2.ok());
  ASSERT_TRUE((*rebuilt)->Save(IvfIndex::DefaultPath(other.path("s"))).ok());
  auto foreign = IvfIndex::Load(IvfIndex::DefaultPath(other.path("s")), **s2);
  EXPECT_EQ(foreign.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(foreign.status().message().find("K="), std::string::npos) << foreign.status();
}

TEST(IvfIndex, ListsFollowIngestAndDelete) {
  SCOPED_TRACE(rapidin::testing::FuzzReplay());
  TempDir dir;
  Data d(Seed() + 4);
  auto store = MakeStore(dir.path("s"), d, 1500);
  IvfOptions io;
  io.nlist = 12;
  auto index = IvfIndex::Build(*store, io);
  ASSERT_TRUE(index.ok());
  // Delete ten rows: they leave the lists.
  std::vector<std::string> ids;
  for (int i = 0; i < 10; ++i) ids.push_back("r" + std::to_string(i * 7));
  auto del = store->Delete(ids);
  ASSERT_TRUE(del.ok());
  (*index)->ApplyDelete(*del);
  EXPECT_EQ((*index)->rows(), 1490u);
  EXPECT_EQ((*index)->sequence(), store->sequence());
  // New records: one reuses a deleted row, one replaces r1 with another vector; each is found through the index.
  const std::vector<float> a = d.Row(), b = d.Row();
  std::vector<storage::IngestItem> items = {Item("fresh", a), Item("r1", b)};
  auto ing = store->Ingest(items);
  ASSERT_TRUE(ing.ok());
  ASSERT_EQ(ing->rows.size(), 2u);
  EXPECT_EQ(ing->rows[0], 0u);  // the smallest deleted row
  EXPECT_EQ(ing->rows[1], 1u);
  (*index)->ApplyIngest(*ing, items);
  EXPECT_EQ((*index)->rows(), 1491u);
  EXPECT_EQ((*index)->sequence(), store->sequence());
  for (const auto& [v, row] : {std::pair{a, 0}, std::pair{b, 1}}) {
    const SearchResult r = Search(*store, index->get(), 1, v, 1, 1);
    ASSERT_EQ(r.helpful[0].size(), 1u);
    EXPECT_EQ(r.helpful[0][0].index, row);
  }
  // The lists equal a fresh assignment of the same rows to the same centroids.
  auto probe = d.Row();
  const auto incremental = (*index)->Candidates(probe.data(), 3);
  ASSERT_TRUE((*index)->Reassign(*store, io).ok());
  EXPECT_EQ((*index)->Candidates(probe.data(), 3), incremental);
}

TEST(IvfIndex, ColdRowsAreScannedAndTheIndexCoversTheResidentOnes) {
  SCOPED_TRACE(rapidin::testing::FuzzReplay());
  TempDir dir;
  Data d(Seed() + 5);
  const std::string path = dir.path("s");
  { MakeStore(path, d, 2000); }
  auto store = Reopen(path, /*host_budget=*/uint64_t{1200} * kK * 2);  // rows [1200, 2000) stay on disk
  ASSERT_EQ(store->ColdRange().first, 1200u);
  IvfOptions io;
  io.nlist = 16;
  auto index = IvfIndex::Build(*store, io);
  ASSERT_TRUE(index.ok()) << index.status();
  EXPECT_EQ((*index)->rows(), 2000u);  // cold rows are assigned too (read from disk)
  std::vector<float> q = d.Row();
  const SearchResult exact = Search(*store, nullptr, 0, q, 1, 20);
  const SearchResult all = Search(*store, index->get(), 16, q, 1, 20);
  for (size_t i = 0; i < exact.helpful[0].size(); ++i) {
    EXPECT_EQ(all.helpful[0][i].index, exact.helpful[0][i].index);
    EXPECT_EQ(all.harmful[0][i].index, exact.harmful[0][i].index);
  }
}

TEST(IvfIndex, RefusesTheGpuBackendAndEmptyStores) {
  TempDir dir;
  Data d(Seed() + 6);
  auto store = MakeStore(dir.path("s"), d, 100);
  auto index = IvfIndex::Build(*store, IvfOptions{});
  ASSERT_TRUE(index.ok());
  EXPECT_EQ((*index)->nlist(), 10);  // about sqrt(100)
  BackendOptions bo;
  bo.backend = "cuda";
  bo.ivf = index->get();
  EXPECT_EQ(MakeScanBackend(store.get(), bo).status().code(), absl::StatusCode::kInvalidArgument);

  storage::StoreOptions so;
  so.create_if_missing = true;
  so.k = kK;
  auto empty = storage::Store::Open(dir.path("e"), so);
  ASSERT_TRUE(empty.ok());
  EXPECT_EQ(IvfIndex::Build(**empty, IvfOptions{}).status().code(), absl::StatusCode::kFailedPrecondition);
}

}  // namespace
}  // namespace rapidin::query
