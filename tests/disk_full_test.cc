// A full disk under the store (a tmpfs mounted with a size; needs root to mount, and skips without it): the write
// that does not fit is refused with RESOURCE_EXHAUSTED and leaves nothing behind, reads go on, the store takes
// writes again once there is space (RocksDB's own recovery: it waits for free space to cover its write buffers and
// polls every few seconds), and every acknowledged batch survives a reopen.
#include <gtest/gtest.h>

#include <chrono>
#include <thread>

#include "storage/store.h"
#include "tests/test_util.h"
#include "tests/tmpfs.h"

namespace rapidin::storage {
namespace {

using rapidin::testing::SeededVector;
using rapidin::testing::TempDir;
using rapidin::testing::Tmpfs;

constexpr int kK = 1024;  // 2 KiB a row

std::vector<IngestItem> Batch(int b) {
  std::vector<IngestItem> items(8);
  for (int i = 0; i < 8; ++i) {
    items[i].record.set_id("b" + std::to_string(b) + "-" + std::to_string(i));
    items[i].record.set_text(std::string(512, 'x'));
    items[i].vector = SeededVector(b * 8 + i, kK);
  }
  return items;
}


TEST(DiskFull, RefusedWholeThenWritesAgainWithSpaceAndNothingAcknowledgedIsLost) {
  TempDir dir;
  Tmpfs fs(dir.path(""), "8m");
  if (!fs.mounted()) GTEST_SKIP() << "cannot mount a tmpfs here (needs root): the full-disk test does not run";
  StoreOptions o;
  o.create_if_missing = true;
  o.k = kK;
  o.num_shards = 2;
  const std::string path = dir.path("store");
  int acked = 0;
  {
    auto s = Store::Open(path, o);
    ASSERT_TRUE(s.ok()) << s.status();
    Store& store = **s;
    absl::Status refused;
    for (int b = 0; b < 10000; ++b) {
      auto r = store.Ingest(Batch(b));
      if (!r.ok()) {
        refused = r.status();
        break;
      }
      ++acked;
    }
    ASSERT_GT(acked, 10);
    ASSERT_EQ(refused.code(), absl::StatusCode::kResourceExhausted) << refused;
    EXPECT_NE(refused.message().find("disk is full"), std::string::npos) << refused;
    // Nothing of the refused batch, everything before it; reads go on.
    EXPECT_EQ(store.live_records(), static_cast<uint64_t>(acked) * 8);
    EXPECT_TRUE(absl::IsNotFound(store.GetRecordById("b" + std::to_string(acked) + "-0").status()));
    auto first = store.GetRecordById("b0-0");
    ASSERT_TRUE(first.ok()) << first.status();
    // Still full: refused again, with a clear status (no crash, no partial write).
    auto again = store.Ingest(Batch(acked));
    EXPECT_FALSE(again.ok());
    EXPECT_TRUE(absl::IsResourceExhausted(again.status()) || absl::IsUnavailable(again.status())) << again.status();
    // Space again: RocksDB recovers once the free space covers its write buffers (64 MiB here).
    ASSERT_TRUE(fs.Resize("160m"));
    absl::Status last;
    const auto t0 = std::chrono::steady_clock::now();
    while (std::chrono::steady_clock::now() - t0 < std::chrono::seconds(60)) {
      auto r = store.Ingest(Batch(acked));
      last = r.status();
      if (r.ok()) break;
      ASSERT_TRUE(absl::IsResourceExhausted(last) || absl::IsUnavailable(last)) << last;
      std::this_thread::sleep_for(std::chrono::milliseconds(200));
    }
    ASSERT_TRUE(last.ok()) << "no write accepted within 60 s of freeing space: " << last;
    ++acked;
    std::cout << "writes accepted again "
              << std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count()
              << " s after the disk grew\n";
  }
  auto s = Store::Open(path, StoreOptions{});
  ASSERT_TRUE(s.ok()) << s.status();
  EXPECT_EQ((*s)->live_records(), static_cast<uint64_t>(acked) * 8);
  for (int b = 0; b < acked; b += 7) {
    auto v = (*s)->GetVector((*(*s)->GetRecordById("b" + std::to_string(b) + "-3")).index());
    ASSERT_TRUE(v.ok()) << v.status();
    EXPECT_EQ(*v, rapidin::testing::Fp16Rounded(SeededVector(b * 8 + 3, kK)));
  }
}

}  // namespace
}  // namespace rapidin::storage
