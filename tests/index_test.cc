// The indexes against the exact scan on fresh data. IVF (query/ivf_index.h): every list probed gives the exact
// answer; a few lists keep recall high with exact scores. PCA (query/pca_index.h): its directions recover a planted
// subspace, its codes equal A (x - mean) in double, enough candidates give the exact answer, few keep recall high.
// Both: persistence (round trip, a store written behind the index's back, damaged and foreign files) and
// following ingest and delete.
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <map>
#include <random>
#include <set>

#include "query/ivf_index.h"
#include "query/pca_index.h"
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
  // n rows, one after another (a batch of query vectors).
  std::vector<float> Rows(int n) {
    std::vector<float> out;
    for (int i = 0; i < n; ++i) {
      auto v = Row();
      out.insert(out.end(), v.begin(), v.end());
    }
    return out;
  }

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

SearchResult SearchWith(const storage::Store& store, const QueryEngine::Options& o, const std::vector<float>& q,
                        int nq, int k) {
  auto engine = QueryEngine::Create(&store, o);
  EXPECT_TRUE(engine.ok()) << engine.status();
  auto r = (*engine)->Search(q, nq, k, k);
  EXPECT_TRUE(r.ok()) << r.status();
  return *r;
}

SearchResult Search(const storage::Store& store, const IvfIndex* ivf, int nprobe, const std::vector<float>& q,
                    int nq, int k) {
  QueryEngine::Options o;
  o.ivf = ivf;
  o.nprobe = nprobe;
  return SearchWith(store, o, q, nq, k);
}

SearchResult SearchPca(const storage::Store& store, const PcaIndex* pca, int min_candidates,
                       const std::vector<float>& q, int nq, int k) {
  QueryEngine::Options o;
  o.pca = pca;
  o.min_candidates = min_candidates;
  o.candidates_per_k = 1;
  return SearchWith(store, o, q, nq, k);
}

// got equals the exact scan's answer for every query vector at both ends: k rows each, same rows, same scores bit
// for bit (the same kernel on the same rows).
void ExpectExactAnswers(const SearchResult& got, const SearchResult& exact, int nq, size_t k) {
  for (int j = 0; j < nq; ++j) {
    ASSERT_EQ(got.helpful[j].size(), k);
    ASSERT_EQ(got.harmful[j].size(), k);
    for (size_t i = 0; i < k; ++i) {
      EXPECT_EQ(got.helpful[j][i].index, exact.helpful[j][i].index);
      EXPECT_EQ(got.helpful[j][i].score, exact.helpful[j][i].score);
      EXPECT_EQ(got.harmful[j][i].index, exact.harmful[j][i].index);
      EXPECT_EQ(got.harmful[j][i].score, exact.harmful[j][i].score);
    }
  }
}

int64_t RowsScored(const SearchResult& r) {
  int64_t n = 0;
  for (const auto& t : r.shard_timings) n += t.rows;
  return n;
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
  const std::vector<float> q = d.Rows(4);
  const SearchResult exact = Search(*store, nullptr, 0, q, 4, 25);
  ExpectExactAnswers(Search(*store, index->get(), 20, q, 4, 25), exact, 4, 25);
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
  const std::vector<float> q = d.Rows(nq);
  const SearchResult exact = Search(*store, nullptr, 0, q, nq, 10);
  const SearchResult ann = Search(*store, index->get(), 8, q, nq, 10);
  double rh = 0, rm = 0;
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
  // A third of the rows read at random would give about 0.33; the lists give about 0.95 (the harmful end, whose
  // rows are spread over more lists, dips to 0.88 on about one seed in a hundred).
  EXPECT_GE(rh, 0.85);
  EXPECT_GE(rm, 0.85);
  // 16 of 48 lists at most (8 per end): well under the whole store for 16 vectors.
  EXPECT_LT(RowsScored(ann), int64_t{nq} * 6000 / 2);
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
    const SearchResult r = Search(*store, index->get(), 4, v, 1, 1);  // 8 of 12 lists
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


// Rows of a planted rank-8 subspace (random orthonormal directions, strong and distinct variances) plus weak
// isotropic noise and an offset: an 8-dim code must span exactly that subspace.
TEST(PcaIndex, DirectionsRecoverAPlantedSubspaceAndCodesAreExact) {
  SCOPED_TRACE(rapidin::testing::FuzzReplay());
  TempDir dir;
  Data d(Seed() + 10);
  constexpr int kRank = 8;
  std::vector<std::vector<float>> basis;
  for (int r = 0; r < kRank; ++r) {
    auto v = d.Noise(1.0f);
    for (const auto& u : basis) {  // Gram-Schmidt
      double dot = 0;
      for (int i = 0; i < kK; ++i) dot += double(v[i]) * u[i];
      for (int i = 0; i < kK; ++i) v[i] -= static_cast<float>(dot * u[i]);
    }
    basis.push_back(Data::Unit(v));
  }
  const std::vector<float> offset = d.Noise(0.3f);
  storage::StoreOptions so;
  so.create_if_missing = true;
  so.k = kK;
  so.num_shards = 2;
  so.sync_writes = false;
  auto store = storage::Store::Open(dir.path("s"), so);
  ASSERT_TRUE(store.ok());
  std::normal_distribution<float> g;
  std::vector<storage::IngestItem> items;
  for (int i = 0; i < 3000; ++i) {
    std::vector<float> v = d.Noise(0.01f);
    for (int r = 0; r < kRank; ++r) {
      const float c = g(d.rng) * (3.0f - 0.3f * r);
      for (int j = 0; j < kK; ++j) v[j] += c * basis[r][j];
    }
    for (int j = 0; j < kK; ++j) v[j] += offset[j];
    items.push_back(Item("r" + std::to_string(i), v));
  }
  ASSERT_TRUE((*store)->Ingest(items).ok());
  PcaOptions po;
  po.dim = kRank;
  auto index = PcaIndex::Build(**store, po);
  ASSERT_TRUE(index.ok()) << index.status();
  // Every planted direction lies in the code's span: |A u| = 1 (A has orthonormal rows).
  for (int r = 0; r < kRank; ++r) {
    std::vector<float> p(kRank);
    (*index)->Project(basis[r].data(), p.data());
    double n2 = 0;
    for (float x : p) n2 += double(x) * x;
    EXPECT_NEAR(n2, 1.0, 1e-3) << "direction " << r;
  }
  // The code scores equal (A q).(A (x - mean)) in double for every row, up to the codes' fp16 rounding.
  const std::vector<float> q = d.Noise(1.0f);
  std::vector<float> qp(kRank);
  (*index)->Project(q.data(), qp.data());
  std::vector<kernels::TopK> hp{kernels::TopK(3000, true)}, hm{kernels::TopK(0, false)};
  ASSERT_TRUE((*index)->ScanCodes(0, 3000, qp.data(), 1, &hp, &hm).ok());
  const auto all = hp[0].Sorted();
  ASSERT_EQ(all.size(), 3000u);
  std::vector<double> mean(kK, 0.0);
  for (const auto& it : items) {
    for (int j = 0; j < kK; ++j) mean[j] += rapidin::testing::Fp16Rounded(it.vector)[j] / 3000.0;
  }
  // int8 codes: each direction's code is off by at most half a unit, so a score by at most
  // sum_d |q'_d| scale_d / 2 (plus float rounding).
  double bound = 0;
  for (int r = 0; r < kRank; ++r) bound += 0.5 * std::fabs(qp[r]) * (*index)->scale()[r];
  double worst = 0, scale = 0;
  for (const auto& c : all) {
    const auto x = rapidin::testing::Fp16Rounded(items[c.index].vector);
    std::vector<float> centred(kK);
    for (int j = 0; j < kK; ++j) centred[j] = static_cast<float>(x[j] - mean[j]);
    std::vector<float> code(kRank);
    (*index)->Project(centred.data(), code.data());
    double want = 0;
    for (int r = 0; r < kRank; ++r) want += double(qp[r]) * code[r];
    worst = std::max(worst, std::fabs(c.score - want));
    scale = std::max(scale, std::fabs(want));
  }
  EXPECT_GT(scale, 1.0);
  EXPECT_LE(worst, bound * 1.001 + 1e-4 * scale);  // the sample is every row here: no code is clamped
  EXPECT_LT(bound, 0.05 * scale);                   // and the bound is tight enough to mean something
}

TEST(PcaIndex, EnoughCandidatesIsTheExactScanAndFewKeepRecall) {
  SCOPED_TRACE(rapidin::testing::FuzzReplay());
  TempDir dir;
  Data d(Seed() + 11);
  auto store = MakeStore(dir.path("s"), d, 5000);
  PcaOptions po;
  po.dim = 32;
  auto index = PcaIndex::Build(*store, po);
  ASSERT_TRUE(index.ok()) << index.status();
  EXPECT_EQ((*index)->rows(), 5000u);
  const int nq = 16;
  const std::vector<float> q = d.Rows(nq);
  const SearchResult exact = Search(*store, nullptr, 0, q, nq, 10);
  ExpectExactAnswers(SearchPca(*store, index->get(), 5000, q, nq, 10), exact, nq, 10);
  const SearchResult few = SearchPca(*store, index->get(), 100, q, nq, 10);  // 100 per end and worker of 5000
  double rh = 0, rm = 0;
  for (int j = 0; j < nq; ++j) {
    rh += Recall(few.helpful[j], exact.helpful[j]) / nq;
    rm += Recall(few.harmful[j], exact.harmful[j]) / nq;
    for (size_t i = 0; i < few.helpful[j].size(); ++i) {  // scores are exact: equal to the scan's for that row
      for (const auto& e : exact.helpful[j]) {
        if (e.index == few.helpful[j][i].index) EXPECT_EQ(e.score, few.helpful[j][i].score);
      }
    }
  }
  EXPECT_GE(rh, 0.95);
  EXPECT_GE(rm, 0.95);
  EXPECT_LE(RowsScored(few), int64_t{nq} * 3 * 2 * 100);  // 3 workers, 2 ends, 100 candidates
}

TEST(PcaIndex, PersistsFollowsWritesAndRefusesDamage) {
  SCOPED_TRACE(rapidin::testing::FuzzReplay());
  TempDir dir;
  Data d(Seed() + 12);
  const std::string path = dir.path("s");
  PcaOptions po;
  po.dim = 32;  // spans the 24 cluster directions: codes rank rows nearly as the exact scores do
  const std::vector<float> q = d.Row();
  std::vector<float> qp(32);
  auto scores = [&](const PcaIndex& index) {
    index.Project(q.data(), qp.data());
    std::vector<kernels::TopK> hp{kernels::TopK(1 << 20, true)}, hm{kernels::TopK(0, false)};
    EXPECT_TRUE(index.ScanCodes(0, 1 << 20, qp.data(), 1, &hp, &hm).ok());
    return hp[0].Sorted();
  };
  auto same = [](const std::vector<kernels::Candidate>& a, const std::vector<kernels::Candidate>& b) {
    if (a.size() != b.size()) return false;
    for (size_t i = 0; i < a.size(); ++i) {
      if (a[i].index != b[i].index || a[i].score != b[i].score) return false;
    }
    return true;
  };
  // Equal up to one code unit: sgemm over 2 rows and over 1024 may round differently, and a value on a rounding
  // boundary then lands one int8 unit away; a score moves by at most sum_d |q'_d| scale_d.
  auto close = [&](const std::vector<kernels::Candidate>& a, const std::vector<kernels::Candidate>& b,
                   const PcaIndex& index) {
    if (a.size() != b.size()) return false;
    double unit = 0;
    for (int d = 0; d < index.dim(); ++d) unit += std::fabs(qp[d]) * index.scale()[d];
    std::map<int64_t, float> by_row;
    for (const auto& c : b) by_row[c.index] = c.score;
    for (const auto& c : a) {
      auto it = by_row.find(c.index);
      if (it == by_row.end() || std::fabs(it->second - c.score) > unit) return false;
    }
    return true;
  };
  std::vector<kernels::Candidate> before;
  {
    auto store = MakeStore(path, d, 1500);
    std::string how;
    auto index = PcaIndex::Open(*store, po, false, &how);
    ASSERT_TRUE(index.ok()) << index.status();
    EXPECT_NE(how.find("built"), std::string::npos) << how;
    before = scores(**index);
    // Writes through the index: a deleted row leaves, a new one (reusing the row) and a replaced one get codes
    // equal to a full reprojection's.
    auto del = store->Delete({"r3", "r4"});
    ASSERT_TRUE(del.ok());
    (*index)->ApplyDelete(*del);
    EXPECT_EQ((*index)->rows(), 1498u);
    std::vector<storage::IngestItem> items = {Item("fresh", d.Row()), Item("r9", d.Row())};
    auto ing = store->Ingest(items);
    ASSERT_TRUE(ing.ok());
    (*index)->ApplyIngest(*ing, items);
    EXPECT_EQ((*index)->rows(), 1499u);
    EXPECT_EQ((*index)->sequence(), store->sequence());
    const auto incremental = scores(**index);
    ASSERT_TRUE((*index)->Reproject(*store, po).ok());
    const auto reprojected = scores(**index);
    EXPECT_TRUE(close(reprojected, incremental, **index));
    EXPECT_FALSE(same(incremental, before));
    ASSERT_TRUE((*index)->Save(PcaIndex::DefaultPath(path)).ok());
    before = reprojected;
  }
  {
    auto store = Reopen(path);
    auto loaded = PcaIndex::Load(PcaIndex::DefaultPath(path), *store);
    ASSERT_TRUE(loaded.ok()) << loaded.status();
    EXPECT_FALSE((*loaded)->stale());
    EXPECT_TRUE(same(scores(**loaded), before));
    ASSERT_TRUE(store->Ingest({Item("behind", q)}).ok());  // a write the index does not see
  }
  auto store = Reopen(path);
  std::string how;
  auto index = PcaIndex::Open(*store, po, false, &how);
  ASSERT_TRUE(index.ok()) << index.status();
  EXPECT_NE(how.find("reprojected"), std::string::npos) << how;
  const SearchResult r = SearchPca(*store, index->get(), 20, q, 1, 1);
  ASSERT_EQ(r.helpful[0].size(), 1u);
  auto behind = store->GetRecordById("behind");
  ASSERT_TRUE(behind.ok());
  EXPECT_EQ(behind->index(), 4u);  // the second deleted row, reused
  EXPECT_EQ(r.helpful[0][0].index, 4);  // the row written behind its back, found through the index

  // Damage: truncated or flipped bytes are DATA_LOSS and Open rebuilds; a file for another K is refused.
  const std::string file = PcaIndex::DefaultPath(path);
  std::string good;
  {
    std::ifstream f(file, std::ios::binary);
    good.assign(std::istreambuf_iterator<char>(f), {});
  }
  auto write = [&](const std::string& s) { std::ofstream(file, std::ios::binary | std::ios::trunc) << s; };
  std::mt19937_64 rng(Seed());
  for (int t = 0; t < 10; ++t) {
    std::string bad = t == 0 ? good.substr(0, good.size() - 3) : good;
    if (t > 0) bad[rng() % bad.size()] ^= static_cast<char>(1 + rng() % 255);
    write(bad);
    EXPECT_EQ(PcaIndex::Load(file, *store).status().code(), absl::StatusCode::kDataLoss);
  }
  auto rebuilt = PcaIndex::Open(*store, po, false, &how);
  ASSERT_TRUE(rebuilt.ok()) << rebuilt.status();
  EXPECT_NE(how.find("damaged"), std::string::npos) << how;
  TempDir other;
  storage::StoreOptions so;
  so.create_if_missing = true;
  so.k = kK + 2;
  auto s2 = storage::Store::Open(other.path("s"), so);
  ASSERT_TRUE(s2.ok());
  ASSERT_TRUE((*rebuilt)->Save(PcaIndex::DefaultPath(other.path("s"))).ok());
  EXPECT_EQ(PcaIndex::Load(PcaIndex::DefaultPath(other.path("s")), **s2).status().code(),
            absl::StatusCode::kFailedPrecondition);
  PcaOptions too_long;
  too_long.dim = kK + 1;
  EXPECT_EQ(PcaIndex::Build(*store, too_long).status().code(), absl::StatusCode::kFailedPrecondition);
}

}  // namespace
}  // namespace rapidin::query
