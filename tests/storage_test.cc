// storage/: manifest validation, atomic idempotent ingest, host-tier sharding, crash safety.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <rocksdb/db.h>

#include <chrono>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <functional>
#include <cstdio>
#include <random>
#include <thread>

#include "kernels/half.h"
#include "storage/internal/host_shard.h"
#include "storage/store.h"
#include "tests/test_util.h"

namespace rapidin::storage {
namespace {

using rapidin::testing::Fp16Rounded;
using rapidin::testing::Item;
using rapidin::testing::SeededVector;
using rapidin::testing::TempDir;

std::unique_ptr<Store> MustOpen(const std::string& path, uint32_t k, int shards = 2, bool create = true,
                                const std::string& ps = "") {
  StoreOptions o;
  o.create_if_missing = create;
  o.k = k;
  o.num_shards = shards;
  o.projection_state = ps;
  auto s = Store::Open(path, o);
  EXPECT_TRUE(s.ok()) << s.status();
  return s.ok() ? std::move(*s) : nullptr;
}

// Checks every host-tier shard: 64-byte aligned, rows dealt round-robin (shard sh holds sh, sh + S, ...), each
// row equal to the fp16 rounding of vecs[its global index]. Returns the rows held in all.
int64_t RowsInShards(const Store& s, const std::vector<std::vector<float>>& vecs, int k) {
  int64_t total = 0;
  for (int sh = 0; sh < s.num_shards(); ++sh) {
    EXPECT_TRUE(s.WithShard(sh, [&](const ShardView& v) {
                   EXPECT_EQ(reinterpret_cast<uintptr_t>(v.rows) % 64, 0u);
                   EXPECT_EQ(v.first_index, sh);
                   EXPECT_EQ(v.index_stride, s.num_shards());
                   for (int64_t r = 0; r < v.n; ++r) {
                     const auto want = Fp16Rounded(vecs[v.first_index + r * v.index_stride]);
                     for (int c = 0; c < k; ++c) EXPECT_EQ(kernels::HalfToFloat(v.rows[r * k + c]), want[c]);
                   }
                   total += v.n;
                   return absl::OkStatus();
                 }).ok());
  }
  return total;
}

TEST(Store, CreateOpenAndValidateManifest) {
  TempDir dir;
  const std::string path = dir.path("s");
  {
    StoreOptions o;
    auto missing = Store::Open(path, o);
    EXPECT_EQ(missing.status().code(), absl::StatusCode::kNotFound);
    o.create_if_missing = true;
    EXPECT_EQ(Store::Open(path, o).status().code(), absl::StatusCode::kInvalidArgument);  // no K
  }
  { auto s = MustOpen(path, 16, 2, true, "state-A"); ASSERT_NE(s, nullptr); EXPECT_EQ(s->k(), 16u); }
  {
    StoreOptions o;
    auto s = Store::Open(path, o);  // K and state come from the manifest
    ASSERT_TRUE(s.ok()) << s.status();
    EXPECT_EQ((*s)->manifest().projection_state(), "state-A");
    EXPECT_EQ((*s)->manifest().projection_state_id(), ProjectionStateId("state-A"));
    EXPECT_EQ((*s)->manifest().format_version(), kFormatVersion);
  }
  StoreOptions wrong_k;
  wrong_k.k = 32;
  EXPECT_EQ(Store::Open(path, wrong_k).status().code(), absl::StatusCode::kInvalidArgument);
  StoreOptions wrong_state;
  wrong_state.projection_state = "state-B";
  auto st = Store::Open(path, wrong_state).status();
  EXPECT_EQ(st.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(st.message().find(ProjectionStateId("state-A")), std::string::npos) << st;
  StoreOptions bad_shards;
  bad_shards.num_shards = 0;
  EXPECT_EQ(Store::Open(path, bad_shards).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(Store, RefusesNonStoreDirectoryAndSecondOpener) {
  TempDir dir;
  std::FILE* f = std::fopen(dir.path("junk.txt").c_str(), "w");
  std::fputs("x", f);
  std::fclose(f);
  StoreOptions o;
  o.create_if_missing = true;
  o.k = 4;
  EXPECT_EQ(Store::Open(dir.path(), o).status().code(), absl::StatusCode::kInvalidArgument);
  auto a = MustOpen(dir.path("s"), 4);
  auto b = Store::Open(dir.path("s"), o);
  EXPECT_EQ(b.status().code(), absl::StatusCode::kUnavailable) << b.status();
}

TEST(Store, IngestGetReplaceAndReopen) {
  TempDir dir;
  const int k = 13;
  std::vector<std::vector<float>> vecs;
  {
    auto s = MustOpen(dir.path("s"), k, 3);
    std::vector<IngestItem> batch;
    for (int i = 0; i < 10; ++i) {
      vecs.push_back(SeededVector(i, k));
      batch.push_back(Item("id" + std::to_string(i), vecs.back()));
    }
    auto r = s->Ingest(batch);
    ASSERT_TRUE(r.ok()) << r.status();
    EXPECT_EQ(r->inserted, 10u);
    EXPECT_EQ(s->size(), 10u);
    // Replace id3, add id10, and send id10 twice: the last occurrence wins.
    vecs[3] = SeededVector(103, k);
    vecs.push_back(SeededVector(110, k));
    r = s->Ingest({Item("id3", vecs[3], "new text"), Item("id10", SeededVector(999, k)), Item("id10", vecs[10])});
    ASSERT_TRUE(r.ok()) << r.status();
    EXPECT_EQ(r->inserted, 1u);
    EXPECT_EQ(r->replaced, 1u);
    EXPECT_EQ(s->size(), 11u);
    // Idempotent: the same batch again changes nothing but counts replacements.
    r = s->Ingest({Item("id3", vecs[3], "new text")});
    ASSERT_TRUE(r.ok());
    EXPECT_EQ(s->size(), 11u);
  }
  for (int shards : {1, 3, 4}) {
    auto s = MustOpen(dir.path("s"), k, shards, false);
    ASSERT_EQ(s->size(), 11u);
    for (int i = 0; i < 11; ++i) {
      auto rec = s->GetRecordById("id" + std::to_string(i));
      ASSERT_TRUE(rec.ok()) << rec.status();
      EXPECT_EQ(rec->index(), static_cast<uint64_t>(i));
      auto v = s->GetVector(rec->index());
      ASSERT_TRUE(v.ok());
      EXPECT_EQ(*v, Fp16Rounded(vecs[i])) << "row " << i << " with " << shards << " shards";
    }
    EXPECT_EQ(s->GetRecordById("id3")->record().text(), "new text");
    EXPECT_EQ(s->GetRecordById("nope").status().code(), absl::StatusCode::kNotFound);
    // Shards interleave rows round-robin, arrays are 64-byte aligned, and together hold every row once.
    EXPECT_EQ(RowsInShards(*s, vecs, k), 11);
    EXPECT_EQ(s->Usage().host_bytes, 11u * k * 2);
  }
}

// GPU tiers keep device copies in sync by these numbers: appends bump the generation, in-place replaces also
// set the rewrite generation; a shard the batch did not touch keeps both.
TEST(Store, ShardGenerationsTrackAppendsAndRewrites) {
  TempDir dir;
  auto s = MustOpen(dir.path("s"), 8, 2);
  ASSERT_NE(s, nullptr);
  auto gens = [&](int shard) {
    std::pair<uint64_t, uint64_t> g;
    EXPECT_TRUE(s->WithShard(shard, [&](const ShardView& v) {
      g = {v.generation, v.rewrite_generation};
      return absl::OkStatus();
    }).ok());
    return g;
  };
  const auto g0 = gens(0), g1 = gens(1);
  ASSERT_TRUE(s->Ingest({Item("a", SeededVector(1, 8)), Item("b", SeededVector(2, 8))}).ok());  // rows 0, 1
  const auto a0 = gens(0), a1 = gens(1);
  EXPECT_GT(a0.first, g0.first);
  EXPECT_GT(a1.first, g1.first);
  EXPECT_EQ(a0.second, g0.second);  // appends only
  ASSERT_TRUE(s->Ingest({Item("c", SeededVector(3, 8))}).ok());  // row 2: shard 0 only
  EXPECT_GT(gens(0).first, a0.first);
  EXPECT_EQ(gens(1), a1);
  ASSERT_TRUE(s->Ingest({Item("b", SeededVector(4, 8))}).ok());  // replaces row 1 in shard 1
  const auto r1 = gens(1);
  EXPECT_GT(r1.first, a1.first);
  EXPECT_EQ(r1.second, r1.first);
}

// Cold tier: with a host budget only the first rows that fit are resident; the rest are read from disk on demand
// and follow ingest (appends past the budget, replacements of cold and resident rows), across reopen.
TEST(Store, ColdTierBeyondTheHostBudget) {
  TempDir dir;
  const int k = 16;
  std::vector<std::vector<float>> vecs;
  {
    auto s = MustOpen(dir.path("s"), k, 3);
    ASSERT_NE(s, nullptr);
    std::vector<IngestItem> batch;
    for (int i = 0; i < 40; ++i) {
      vecs.push_back(SeededVector(500 + i, k));
      batch.push_back(Item("id" + std::to_string(i), vecs.back()));
    }
    ASSERT_TRUE(s->Ingest(batch).ok());
  }
  StoreOptions o;
  o.num_shards = 3;
  o.host_budget_bytes = 25 * k * 2 + 7;  // 25 rows fit
  auto check = [&](Store* s, uint64_t resident) {
    const uint64_t n = vecs.size();
    ASSERT_EQ(s->size(), n);
    EXPECT_EQ(s->ColdRange(), std::make_pair(resident, n));
    const TierUsage u = s->Usage();
    EXPECT_EQ(u.host_records, resident);
    EXPECT_EQ(u.host_bytes, resident * k * 2);
    EXPECT_EQ(u.cold_records, n - resident);
    EXPECT_EQ(u.cold_bytes, (n - resident) * k * 2);
    EXPECT_EQ(RowsInShards(*s, vecs, k), static_cast<int64_t>(resident));
    internal::AlignedRows rows(k);
    ASSERT_TRUE(s->ReadRows(resident, static_cast<int64_t>(n - resident), &rows).ok());
    ASSERT_EQ(rows.n(), static_cast<int64_t>(n - resident));
    EXPECT_EQ(reinterpret_cast<uintptr_t>(rows.data()) % 64, 0u);
    for (uint64_t g = resident; g < n; ++g) {
      const auto want = Fp16Rounded(vecs[g]);
      for (int c = 0; c < k; ++c) EXPECT_EQ(kernels::HalfToFloat(rows.row(g - resident)[c]), want[c]) << g;
      EXPECT_EQ(*s->GetVector(g), want);  // cold rows through GetVector too
    }
    EXPECT_EQ(s->ReadRows(n - 1, 2, &rows).code(), absl::StatusCode::kOutOfRange);
  };
  {
    auto s = Store::Open(dir.path("s"), o);
    ASSERT_TRUE(s.ok()) << s.status();
    check(s->get(), 25);
    // Replace a resident row and a cold row, append 3 rows (cold: the budget is full).
    vecs[4] = SeededVector(904, k);
    vecs[30] = SeededVector(930, k);
    std::vector<IngestItem> batch = {Item("id4", vecs[4]), Item("id30", vecs[30])};
    for (int i = 40; i < 43; ++i) {
      vecs.push_back(SeededVector(500 + i, k));
      batch.push_back(Item("id" + std::to_string(i), vecs.back()));
    }
    auto r = (*s)->Ingest(batch);
    ASSERT_TRUE(r.ok()) << r.status();
    EXPECT_EQ(r->replaced, 2u);
    EXPECT_EQ(r->inserted, 3u);
    check(s->get(), 25);
  }
  {  // Reopen with the budget: the same split; without: every row resident.
    auto s = Store::Open(dir.path("s"), o);
    ASSERT_TRUE(s.ok()) << s.status();
    check(s->get(), 25);
  }
  {
    StoreOptions all;
    all.num_shards = 2;
    auto s = Store::Open(dir.path("s"), all);
    ASSERT_TRUE(s.ok()) << s.status();
    check(s->get(), vecs.size());
  }
  {  // A budget larger than the store: no cold rows, and appends stay resident until it is full.
    StoreOptions big = o;
    big.host_budget_bytes = 44 * k * 2;
    auto s = Store::Open(dir.path("s"), big);
    ASSERT_TRUE(s.ok());
    check(s->get(), 43);
    vecs.push_back(SeededVector(777, k));
    vecs.push_back(SeededVector(778, k));
    ASSERT_TRUE((*s)->Ingest({Item("x", vecs[43]), Item("y", vecs[44])}).ok());
    check(s->get(), 44);
  }
}

int allocations = 0, frees = 0;
void* CountingAlloc(size_t bytes) {
  ++allocations;
  return std::aligned_alloc(64, (bytes + 63) / 64 * 64);
}
void CountingFree(void* p) {
  ++frees;
  std::free(p);
}

TEST(Store, HostTierUsesTheGivenAllocator) {
  TempDir dir;
  allocations = frees = 0;
  {
    StoreOptions o;
    o.create_if_missing = true;
    o.k = 8;
    o.host_allocator = {&CountingAlloc, &CountingFree};
    auto s = Store::Open(dir.path("s"), o);
    ASSERT_TRUE(s.ok()) << s.status();
    std::vector<rapidin::storage::IngestItem> batch;
    for (int i = 0; i < 3000; ++i) batch.push_back(Item("r" + std::to_string(i), SeededVector(i, 8)));
    ASSERT_TRUE((*s)->Ingest(batch).ok());
    EXPECT_GT(allocations, 0);
    auto v = (*s)->GetVector(2999);
    ASSERT_TRUE(v.ok());
    EXPECT_EQ(*v, Fp16Rounded(SeededVector(2999, 8)));
  }
  EXPECT_EQ(allocations, frees);  // every block went back through the same allocator
}

// Opens the store's RocksDB directly (as a disk fault or another tool might leave it), runs fn, and closes it.
void WithRawDb(const std::string& path, const std::function<void(rocksdb::DB*, rocksdb::ColumnFamilyHandle* manifest,
                                                                 rocksdb::ColumnFamilyHandle* records,
                                                                 rocksdb::ColumnFamilyHandle* vectors)>& fn) {
  std::vector<rocksdb::ColumnFamilyDescriptor> cfs;
  for (const char* name : {"default", "manifest", "records", "vectors"}) cfs.emplace_back(name, rocksdb::ColumnFamilyOptions());
  std::vector<rocksdb::ColumnFamilyHandle*> h;
  rocksdb::DB* db = nullptr;
  ASSERT_TRUE(rocksdb::DB::Open(rocksdb::DBOptions(), path, cfs, &h, &db).ok());
  fn(db, h[1], h[2], h[3]);
  for (auto* c : h) db->DestroyColumnFamilyHandle(c);
  delete db;
}

std::string RowKey(uint64_t row) {
  std::string s(8, '\0');
  for (int i = 7; i >= 0; --i, row >>= 8) s[i] = static_cast<char>(row & 0xff);
  return s;
}

// Damage on disk gives DATA_LOSS naming what is wrong, never a crash or silently wrong rows: the manifest, a
// missing or short vector row (resident or cold), a record that does not parse, and flipped bytes in a table file
// (RocksDB's block checksums).
TEST(Store, DamagedStoresAreDataLossNotCrashes) {
  const int k = 16, n = 50;
  auto fresh = [&](const std::string& path) {
    auto s = MustOpen(path, k, 3);
    ASSERT_NE(s, nullptr);
    std::vector<IngestItem> batch;
    for (int i = 0; i < n; ++i) batch.push_back(Item("id" + std::to_string(i), SeededVector(900 + i, k)));
    ASSERT_TRUE(s->Ingest(batch).ok());
  };
  auto open_status = [&](const std::string& path, uint64_t budget = 0) {
    StoreOptions o;
    o.host_budget_bytes = budget;
    return Store::Open(path, o).status();
  };
  auto expect_loss = [](const absl::Status& st, const std::string& words) {
    EXPECT_EQ(st.code(), absl::StatusCode::kDataLoss) << st;
    EXPECT_NE(st.message().find(words), std::string::npos) << st << " should say \"" << words << "\"";
  };
  TempDir dir;
  rocksdb::WriteOptions wo;

  fresh(dir.path("manifest"));
  WithRawDb(dir.path("manifest"), [&](rocksdb::DB* db, auto* m, auto*, auto*) {
    ASSERT_TRUE(db->Put(wo, m, "manifest", std::string("\xff\xff\x01", 3)).ok());
  });
  expect_loss(open_status(dir.path("manifest")), "manifest does not parse");
  WithRawDb(dir.path("manifest"), [&](rocksdb::DB* db, auto* m, auto*, auto*) {
    ASSERT_TRUE(db->Delete(wo, m, "manifest").ok());
  });
  expect_loss(open_status(dir.path("manifest")), "no manifest");

  // A manifest that counts fewer rows than are stored (the next ingest would overwrite the rest).
  fresh(dir.path("count"));
  WithRawDb(dir.path("count"), [&](rocksdb::DB* db, auto* m, auto*, auto*) {
    std::string blob;
    ASSERT_TRUE(db->Get(rocksdb::ReadOptions(), m, "manifest", &blob).ok());
    rapidin::v1::Manifest man;
    ASSERT_TRUE(man.ParseFromString(blob));
    man.set_record_count(n - 5);
    ASSERT_TRUE(db->Put(wo, m, "manifest", man.SerializeAsString()).ok());
  });
  expect_loss(open_status(dir.path("count")), "manifest says 45 records but vectors hold row 45");
  expect_loss(open_status(dir.path("count"), 10 * k * 2), "hold row 45");

  fresh(dir.path("hole"));
  WithRawDb(dir.path("hole"), [&](rocksdb::DB* db, auto*, auto*, auto* v) {
    ASSERT_TRUE(db->Delete(wo, v, RowKey(20)).ok());
  });
  expect_loss(open_status(dir.path("hole")), "expected row 20");
  // The same hole in the cold tier: the store opens (only the last cold row is checked then), and reading the
  // range that holds it names the row.
  {
    StoreOptions o;
    o.host_budget_bytes = 10 * k * 2;
    auto s = Store::Open(dir.path("hole"), o);
    ASSERT_TRUE(s.ok()) << s.status();
    internal::AlignedRows rows(k);
    expect_loss((*s)->ReadRows(10, 40, &rows), "row 20 is missing");
    EXPECT_TRUE((*s)->ReadRows(21, 29, &rows).ok());
  }

  fresh(dir.path("last"));
  WithRawDb(dir.path("last"), [&](rocksdb::DB* db, auto*, auto*, auto* v) {
    ASSERT_TRUE(db->Delete(wo, v, RowKey(n - 1)).ok());
  });
  expect_loss(open_status(dir.path("last")), "holds 49");
  expect_loss(open_status(dir.path("last"), 10 * k * 2), "row 49 is missing");

  fresh(dir.path("short"));
  WithRawDb(dir.path("short"), [&](rocksdb::DB* db, auto*, auto*, auto* v) {
    ASSERT_TRUE(db->Put(wo, v, RowKey(7), "abc").ok());
  });
  expect_loss(open_status(dir.path("short")), "row 7 has 3 bytes");

  fresh(dir.path("record"));
  WithRawDb(dir.path("record"), [&](rocksdb::DB* db, auto*, auto* r, auto*) {
    ASSERT_TRUE(db->Put(wo, r, "r" + RowKey(3), std::string("\xff\xff\x01", 3)).ok());
  });
  {
    StoreOptions o;
    auto s = Store::Open(dir.path("record"), o);
    ASSERT_TRUE(s.ok()) << s.status();
    expect_loss((*s)->GetRecordByIndex(3).status(), "record at row 3 does not parse");
    EXPECT_TRUE((*s)->GetRecordByIndex(4).ok());
  }

  // Flipped bytes in the middle of the vectors' table file.
  fresh(dir.path("sst"));
  WithRawDb(dir.path("sst"), [&](rocksdb::DB* db, auto*, auto*, auto* v) {
    ASSERT_TRUE(db->Flush(rocksdb::FlushOptions(), v).ok());
  });
  std::string sst;
  uintmax_t biggest = 0;
  for (const auto& e : std::filesystem::directory_iterator(dir.path("sst"))) {
    if (e.path().extension() == ".sst" && e.file_size() > biggest) biggest = e.file_size(), sst = e.path();
  }
  ASSERT_GT(biggest, 1000u) << "no table file with the vectors";
  {
    std::fstream f(sst, std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(static_cast<std::streamoff>(biggest / 4));
    f.write("\x5a\xa5\x5a\xa5", 4);
  }
  const absl::Status st = open_status(dir.path("sst"));
  EXPECT_EQ(st.code(), absl::StatusCode::kDataLoss) << st;
  EXPECT_NE(st.message().find("checksum"), std::string::npos) << st;
}

// A row count whose bytes overflow size_t (a manifest's record_count of 2^62, found by the mutation test below
// with RAPIDIN_FUZZ_SEED=182137) is refused, not wrapped to a tiny buffer that the rows then overrun.
TEST(AlignedRows, ImpossibleSizesAreRefusedNotWrapped) {
  rapidin::storage::internal::AlignedRows rows(16);
  EXPECT_FALSE(rows.Reserve(int64_t{1} << 62));
  EXPECT_FALSE(rows.Reserve(INT64_MAX));
  ASSERT_TRUE(rows.Reserve(3));
  std::vector<uint16_t> row(16, 7);
  for (int i = 0; i < 3; ++i) rows.Append(row.data());
  EXPECT_EQ(rows.n(), 3);
  EXPECT_EQ(rows.row(2)[15], 7);
}

// Random edits of the stored manifest: each open either fails with a status or finds the store as it is (same K,
// same rows); none crashes or loads rows under the wrong K.
TEST(Store, MutatedManifestsAreRefusedOrHarmless) {
  const uint64_t seed = rapidin::testing::FuzzSeed();
  SCOPED_TRACE(rapidin::testing::FuzzReplay());
  std::mt19937_64 rng(seed);
  TempDir dir;
  const int k = 16, n = 30;
  {
    auto s = MustOpen(dir.path("s"), k, 2, true, "rapidgrad/v1 test state");
    ASSERT_NE(s, nullptr);
    std::vector<IngestItem> batch;
    for (int i = 0; i < n; ++i) batch.push_back(Item("id" + std::to_string(i), SeededVector(i, k)));
    ASSERT_TRUE(s->Ingest(batch).ok());
  }
  std::string good;
  WithRawDb(dir.path("s"), [&](rocksdb::DB* db, auto* m, auto*, auto*) {
    ASSERT_TRUE(db->Get(rocksdb::ReadOptions(), m, "manifest", &good).ok());
  });
  int opened = 0, refused = 0;
  for (int i = 0; i < 100; ++i) {
    std::string bad = good;
    for (int j = 0, e = 1 + rng() % 3; j < e; ++j) bad = rapidin::testing::Mutate(bad, 0, rng);
    WithRawDb(dir.path("s"), [&](rocksdb::DB* db, auto* m, auto*, auto*) {
      ASSERT_TRUE(db->Put(rocksdb::WriteOptions(), m, "manifest", bad).ok());
    });
    StoreOptions o;
    o.num_shards = 2;
    auto s = Store::Open(dir.path("s"), o);
    if (!s.ok()) {
      ++refused;
      EXPECT_FALSE(s.status().message().empty());
      continue;
    }
    ++opened;
    EXPECT_EQ((*s)->k(), static_cast<uint32_t>(k));
    EXPECT_EQ((*s)->size(), static_cast<uint64_t>(n));
    EXPECT_EQ(RowsInShards(**s, [&] {
                std::vector<std::vector<float>> v;
                for (int r = 0; r < n; ++r) v.push_back(SeededVector(r, k));
                return v;
              }(), k),
              n);
  }
  std::cout << "mutated manifests: " << opened << " opened, " << refused << " refused\n";
  EXPECT_GT(refused, 0);
}

TEST(Store, BadBatchIsRejectedWhole) {
  TempDir dir;
  const int k = 8;
  auto s = MustOpen(dir.path("s"), k);
  ASSERT_TRUE(s->Ingest({Item("a", SeededVector(1, k))}).ok());
  auto nan = SeededVector(2, k);
  nan[5] = std::nanf("");
  auto big = SeededVector(3, k);
  big[0] = 1e6f;
  auto inf = SeededVector(4, k);
  inf[7] = INFINITY;
  const std::vector<std::vector<IngestItem>> bad = {
      {Item("b", SeededVector(5, k)), Item("c", SeededVector(6, k - 1))},  // wrong K
      {Item("b", SeededVector(5, k)), Item("d", nan)},
      {Item("b", SeededVector(5, k)), Item("e", big)},
      {Item("b", SeededVector(5, k)), Item("f", inf)},
      {Item("b", SeededVector(5, k)), Item("", SeededVector(7, k))},
      {Item(std::string(kMaxIdBytes + 1, 'x'), SeededVector(7, k))},
      {Item("a", SeededVector(8, k)), Item("g", SeededVector(9, k + 1))},  // would replace "a"
  };
  for (const auto& b : bad) {
    auto r = s->Ingest(b);
    EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument) << r.status();
    EXPECT_EQ(s->size(), 1u);
    EXPECT_EQ(s->GetRecordById("b").status().code(), absl::StatusCode::kNotFound);
    EXPECT_EQ(*s->GetVector(0), Fp16Rounded(SeededVector(1, k)));
  }
}

// Runs tests/crash_writer on a new store at `path` (with `deletes`, it also deletes as it goes), waits until it
// has acknowledged batch `wait_for`, sleeps `sleep_us` so the kill lands at a varying moment, and SIGKILLs it.
// *committed: the last batch it acknowledged.
void RunWriterAndKill(const std::string& path, int k, int batch, bool deletes, int wait_for, int sleep_us,
                      int* committed) {
  int out[2];
  ASSERT_EQ(pipe(out), 0);
  const pid_t pid = fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    dup2(out[1], STDOUT_FILENO);
    close(out[0]);
    execl(RAPIDIN_CRASH_WRITER, RAPIDIN_CRASH_WRITER, path.c_str(), std::to_string(k).c_str(),
          std::to_string(batch).c_str(), deletes ? "delete" : static_cast<char*>(nullptr),
          static_cast<char*>(nullptr));
    _exit(127);
  }
  close(out[1]);
  std::FILE* in = fdopen(out[0], "r");
  int b = 0;
  *committed = -1;
  while (*committed < wait_for && std::fscanf(in, "%d", &b) == 1) *committed = b;
  std::this_thread::sleep_for(std::chrono::microseconds(sleep_us));
  kill(pid, SIGKILL);
  int status = 0;
  waitpid(pid, &status, 0);
  std::fclose(in);
  ASSERT_TRUE(WIFSIGNALED(status)) << "writer exited on its own: " << status;
}

// A writer process is SIGKILLed in the middle of ingesting; the store must open with every batch either
// fully present (records and vectors) or absent.
TEST(Store, KilledWriterLeavesWholeBatches) {
  const int k = 64, batch = 40;
  for (int trial = 0; trial < 3; ++trial) {
    TempDir dir;
    const std::string path = dir.path("s");
    int committed = -1;
    RunWriterAndKill(path, k, batch, /*deletes=*/false, 3 + trial * 4, 300 * trial, &committed);
    if (::testing::Test::HasFatalFailure()) return;
    ASSERT_GE(committed, 3);

    auto s = MustOpen(path, k, 2, false);
    ASSERT_NE(s, nullptr);
    const uint64_t n = s->size();
    ASSERT_EQ(n % batch, 0u) << "a partial batch survived: " << n << " records";
    ASSERT_GE(n / batch, static_cast<uint64_t>(committed + 1)) << "a committed batch was lost";
    for (uint64_t row = 0; row < n; ++row) {
      const int bb = static_cast<int>(row / batch), i = static_cast<int>(row % batch);
      auto rec = s->GetRecordByIndex(row);
      ASSERT_TRUE(rec.ok()) << rec.status();
      ASSERT_EQ(rec->record().id(), "b" + std::to_string(bb) + "-" + std::to_string(i));
      ASSERT_EQ(*s->GetVector(row), Fp16Rounded(SeededVector(bb * 1000 + i, k)));
    }
    // The next batch's first record must be absent.
    EXPECT_EQ(s->GetRecordById("b" + std::to_string(n / batch) + "-0").status().code(),
              absl::StatusCode::kNotFound);
    // And the store keeps working.
    ASSERT_TRUE(s->Ingest({Item("after-crash", SeededVector(7, k))}).ok());
    s.reset();
    // Reopened with a host budget of one batch, the rows past it are read back from disk (the cold tier).
    StoreOptions o;
    o.host_budget_bytes = batch * k * 2;
    auto cold = Store::Open(path, o);
    ASSERT_TRUE(cold.ok()) << cold.status();
    ASSERT_EQ((*cold)->ColdRange(), std::make_pair(uint64_t{batch}, n + 1));
    internal::AlignedRows rows(k);
    ASSERT_TRUE((*cold)->ReadRows(batch, static_cast<int64_t>(n + 1 - batch), &rows).ok());
    for (uint64_t row = batch; row < n; ++row) {
      const auto want = Fp16Rounded(SeededVector((row / batch) * 1000 + row % batch, k));
      for (int c = 0; c < k; ++c) ASSERT_EQ(kernels::HalfToFloat(rows.row(row - batch)[c]), want[c]) << row;
    }
    EXPECT_EQ(*(*cold)->GetVector(n), Fp16Rounded(SeededVector(7, k)));
  }
}

bool AllNaN(const uint16_t* row, int k) {
  for (int c = 0; c < k; ++c) {
    if (!std::isnan(kernels::HalfToFloat(row[c]))) return false;
  }
  return true;
}

// Deleted records are gone from GetRecord*, their rows (resident or cold) are NaN (which no top-k keeps), the
// counts add up, a second delete is harmless, the deletion survives a reopen, and new ids reuse the freed rows.
TEST(Store, DeleteIsDurableIdempotentAndNewIdsReuseTheRows) {
  TempDir dir;
  const int k = 16, n = 40;
  std::vector<std::vector<float>> vecs;
  {
    auto s = MustOpen(dir.path("s"), k, 3);
    ASSERT_NE(s, nullptr);
    std::vector<IngestItem> batch;
    for (int i = 0; i < n; ++i) {
      vecs.push_back(SeededVector(700 + i, k));
      batch.push_back(Item("id" + std::to_string(i), vecs.back()));
    }
    ASSERT_TRUE(s->Ingest(batch).ok());
  }
  StoreOptions o;
  o.num_shards = 3;
  o.host_budget_bytes = 25 * k * 2;  // rows 0..24 resident, 25..39 cold
  auto check = [&](Store* s) {
    EXPECT_EQ(s->size(), uint64_t{n});
    EXPECT_EQ(s->live_records(), uint64_t{n - 2});
    EXPECT_EQ(s->manifest().deleted_count(), 2u);
    for (int gone : {7, 31}) {
      EXPECT_EQ(s->GetRecordById("id" + std::to_string(gone)).status().code(), absl::StatusCode::kNotFound);
      EXPECT_EQ(s->GetRecordByIndex(gone).status().code(), absl::StatusCode::kNotFound);
      auto vec = s->GetVector(gone);
      ASSERT_TRUE(vec.ok()) << vec.status();
      for (float v : *vec) EXPECT_TRUE(std::isnan(v)) << gone;
    }
    EXPECT_TRUE(s->WithShard(7 % 3, [&](const ShardView& v) {
                   EXPECT_TRUE(AllNaN(v.rows + (7 / 3) * k, k));
                   EXPECT_FALSE(AllNaN(v.rows + (4 / 3) * k, k));
                   return absl::OkStatus();
                 }).ok());
    internal::AlignedRows rows(k);
    ASSERT_TRUE(s->ReadRows(25, n - 25, &rows).ok());
    EXPECT_TRUE(AllNaN(rows.row(31 - 25), k));
    EXPECT_EQ(*s->GetVector(30), Fp16Rounded(vecs[30]));
    EXPECT_EQ(s->GetRecordById("id8")->index(), 8u);
  };
  {
    auto s = Store::Open(dir.path("s"), o);
    ASSERT_TRUE(s.ok()) << s.status();
    uint64_t gen_before = 0;
    ASSERT_TRUE((*s)->WithShard(7 % 3, [&](const ShardView& v) {
                   gen_before = v.generation;
                   return absl::OkStatus();
                 }).ok());
    EXPECT_EQ((*s)->Delete({"id7", ""}).status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_EQ((*s)->live_records(), uint64_t{n}) << "a refused request deletes nothing";
    auto r = (*s)->Delete({"id7", "id31", "id7", "nope"});
    ASSERT_TRUE(r.ok()) << r.status();
    EXPECT_EQ(r->deleted, 2u);
    EXPECT_EQ(r->not_found, 1u);
    ASSERT_TRUE((*s)->WithShard(7 % 3, [&](const ShardView& v) {
                   EXPECT_GT(v.rewrite_generation, gen_before) << "a GPU copy must be refreshed";
                   return absl::OkStatus();
                 }).ok());
    check(s->get());
    auto again = (*s)->Delete({"id7", "id31"});
    ASSERT_TRUE(again.ok());
    EXPECT_EQ(again->deleted, 0u);
    EXPECT_EQ(again->not_found, 2u);
    check(s->get());
  }
  {
    auto s = Store::Open(dir.path("s"), o);  // the deletions were synced: they survive the reopen
    ASSERT_TRUE(s.ok()) << s.status();
    check(s->get());
    // Three new ids: the freed rows first (resident row 7, then cold row 31), then a new row.
    auto back = (*s)->Ingest({Item("id7", SeededVector(1, k)), Item("new1", SeededVector(2, k)),
                              Item("new2", SeededVector(3, k))});
    ASSERT_TRUE(back.ok());
    EXPECT_EQ(back->inserted, 3u);
    EXPECT_EQ((*s)->GetRecordById("id7")->index(), 7u);
    EXPECT_EQ((*s)->GetRecordById("new1")->index(), 31u);
    EXPECT_EQ((*s)->GetRecordById("new2")->index(), uint64_t{n});
    EXPECT_EQ((*s)->size(), uint64_t{n + 1});
    EXPECT_EQ((*s)->live_records(), uint64_t{n + 1});
    EXPECT_EQ(*(*s)->GetVector(7), Fp16Rounded(SeededVector(1, k)));
    EXPECT_EQ(*(*s)->GetVector(31), Fp16Rounded(SeededVector(2, k)));
    EXPECT_TRUE((*s)->WithShard(7 % 3, [&](const ShardView& v) {
                   EXPECT_EQ(kernels::HalfToFloat(v.rows[(7 / 3) * k]), Fp16Rounded(SeededVector(1, k))[0]);
                   return absl::OkStatus();
                 }).ok());
  }
  {
    auto s = Store::Open(dir.path("s"), o);  // and the reuse is durable too
    ASSERT_TRUE(s.ok()) << s.status();
    EXPECT_EQ((*s)->manifest().deleted_count(), 0u);
    EXPECT_EQ((*s)->GetRecordById("new1")->index(), 31u);
    EXPECT_EQ(*(*s)->GetVector(31), Fp16Rounded(SeededVector(2, k)));
    auto more = (*s)->Ingest({Item("new3", SeededVector(4, k))});
    ASSERT_TRUE(more.ok());
    EXPECT_EQ((*s)->GetRecordById("new3")->index(), uint64_t{n + 1}) << "no freed row is left";
  }
}

TEST(Store, CompactionReclaimsTheSpaceOfDeletedRecords) {
  TempDir dir;
  const int k = 512, n = 400;
  auto s = MustOpen(dir.path("s"), k, 2);
  ASSERT_NE(s, nullptr);
  std::vector<IngestItem> batch;
  std::vector<std::string> ids;
  for (int i = 0; i < n; ++i) {
    batch.push_back(Item("id" + std::to_string(i), SeededVector(i, k)));
    if (i % 10 != 0) ids.push_back("id" + std::to_string(i));
  }
  ASSERT_TRUE(s->Ingest(batch).ok());
  ASSERT_TRUE(s->Compact().ok());
  const uint64_t before = s->Usage().disk_bytes;
  auto r = s->Delete(ids);
  ASSERT_TRUE(r.ok());
  ASSERT_EQ(r->deleted, ids.size());
  ASSERT_TRUE(s->Compact().ok());
  const uint64_t after = s->Usage().disk_bytes;
  EXPECT_LT(after, before / 3) << "disk bytes " << before << " -> " << after << " after deleting 90%";
  EXPECT_EQ(*s->GetVector(10), Fp16Rounded(SeededVector(10, k)));
}

// kill -9 while a writer ingests and deletes: every ingest batch and every delete request is whole or absent,
// and what the writer had acknowledged is there.
TEST(Store, KilledWriterLeavesWholeDeletes) {
  const int k = 32, batch = 20;
  for (int trial = 0; trial < 4; ++trial) {
    TempDir dir;
    const std::string path = dir.path("s");
    int committed = -1;
    RunWriterAndKill(path, k, batch, /*deletes=*/true, 3 + trial * 3, 200 * trial, &committed);
    if (::testing::Test::HasFatalFailure()) return;

    auto s = MustOpen(path, k, 2, false);
    ASSERT_NE(s, nullptr);
    // Batches ingested: odd ids are never deleted, so "b<bb>-1" says whether batch bb is there.
    int batches = 0;
    while (s->GetRecordById("b" + std::to_string(batches) + "-1").ok()) ++batches;
    ASSERT_GE(batches, committed + 1) << "a committed batch was lost";
    uint64_t live = 0;
    for (int bb = 0; bb <= batches; ++bb) {
      int gone = 0;
      for (int i = 0; i < batch; ++i) {
        const std::string id = "b" + std::to_string(bb) + "-" + std::to_string(i);
        auto rec = s->GetRecordById(id);
        if (rec.ok()) {
          ASSERT_LT(bb, batches) << id << ": part of a batch that is not whole";
          ASSERT_EQ(*s->GetVector(rec->index()), Fp16Rounded(SeededVector(bb * 1000 + i, k))) << id;
          ++live;
        } else {
          ASSERT_EQ(rec.status().code(), absl::StatusCode::kNotFound);
          if (bb == batches) continue;
          ASSERT_EQ(i % 2, 0) << id << ": only even ids are deleted";
          ++gone;
        }
      }
      if (bb == batches) continue;
      // Batch bb's delete ran after batch bb + 1's ingest: acknowledged for bb < committed, whole or absent after.
      if (bb < committed) {
        ASSERT_EQ(gone, batch / 2) << "an acknowledged delete of batch " << bb << " was lost";
      } else {
        ASSERT_TRUE(gone == 0 || gone == batch / 2) << "a partial delete of batch " << bb << ": " << gone;
      }
    }
    EXPECT_EQ(s->live_records(), live);
    EXPECT_EQ(s->size() - s->manifest().deleted_count(), live);
    // Freed rows were reused: the store holds fewer rows than were ever ingested.
    if (batches > 3) EXPECT_LT(s->size(), static_cast<uint64_t>(batches * batch));
  }
}

}  // namespace
}  // namespace rapidin::storage
