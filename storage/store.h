// The gradient store: start here for storage.
//
// A store is a directory holding one RocksDB database with three column families:
//   manifest  "manifest" -> rapidin.v1.Manifest (K, dtype, projection state, record count, format version)
//   records   'r' + be64(index) -> StoredRecord, 'i' + id -> be64(index)
//   vectors   be64(index) -> K little-endian fp16 values
// Rows are numbered 0..N-1 in ingest order. Every ingest batch is one RocksDB WriteBatch (records, vectors and
// the manifest's record count together, WAL fsynced), so a process killed mid-ingest leaves each batch either
// fully present or absent, and the store opens.
//
// Host tier: at Open the vectors are loaded into `num_shards` contiguous, 64-byte aligned row-major fp16 arrays.
// Rows are dealt round-robin: global index g lives in shard g % S at local row g / S, so shards stay balanced as
// ingest appends to memory and disk together.
// Cold tier: with a host budget, only the first rows that fit (rows [0, H), H = budget / (2K)) are resident; the
// rows [H, N) stay on disk only and are read from RocksDB on demand, in chunks (ColdRange, ReadRows). Rows
// ingested past H go to disk only; replacing a cold row is a disk write.
//
// Thread-safety: all methods are safe to call concurrently. Ingest calls are serialised; scans (WithShard) hold
// a shard's reader lock and only block an ingest that touches that shard.
#ifndef RAPIDIN_STORAGE_STORE_H_
#define RAPIDIN_STORAGE_STORE_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kernels/gpu_types.h"
#include "rapidin/v1/store.pb.h"
#include "storage/internal/host_shard.h"

namespace rapidin::storage {

constexpr uint32_t kFormatVersion = 1;
constexpr size_t kMaxIdBytes = 1024;

struct StoreOptions {
  bool create_if_missing = false;
  uint32_t k = 0;                    // required to create; if set when opening, must match the store
  std::string projection_state;      // written at creation; if non-empty when opening, must match
  int num_shards = 1;                // host-tier shards (not part of the on-disk format)
  // Bytes of vectors kept in host memory; 0: all of them. The rest is the cold tier (disk only).
  uint64_t host_budget_bytes = 0;
  bool sync_writes = true;           // fsync the WAL on every batch
  // Allocator of the host tier (page-locked memory for the CUDA backend's warm tier).
  internal::HostAllocator host_allocator;
  // Called while loading vectors at Open (every ~1% and at the end).
  std::function<void(uint64_t loaded, uint64_t total)> progress;
};

struct IngestItem {
  rapidin::v1::Record record;
  std::vector<float> vector;         // K values
};

struct IngestResult {
  uint64_t inserted = 0;
  uint64_t replaced = 0;
  std::vector<uint64_t> rows;        // the row each item of the batch was written to, in batch order
  uint64_t sequence = 0;             // the store's write sequence() right after this batch
};

struct DeleteResult {
  uint64_t deleted = 0;
  uint64_t not_found = 0;
  std::vector<uint64_t> rows;        // the rows that became tombstones
  uint64_t sequence = 0;             // the store's write sequence() right after the deletion
};

// Read-only view of one shard's rows (fp16, 64-byte aligned), valid while the callback of WithShard runs.
// The row fields are kernels::ShardRows, which the GPU scanner takes as is.
struct ShardView : kernels::ShardRows {
  int shard = 0;
};

struct TierUsage {
  uint64_t host_records = 0;
  uint64_t host_bytes = 0;           // bytes of vector data resident in host memory
  uint64_t disk_bytes = 0;           // RocksDB's live SST + WAL size estimate
  uint64_t cold_records = 0;         // rows read from disk on demand (not resident)
  uint64_t cold_bytes = 0;           // their vector bytes
};

// Hex hash identifying a projection state blob (FNV-1a 64).
std::string ProjectionStateId(const std::string& projection_state);

class Store {
 public:
  // Opens (or creates) the store at `path` and loads the host tier.
  // Errors: NOT_FOUND (no store and !create_if_missing), INVALID_ARGUMENT (bad options, or options that
  // contradict the manifest), DATA_LOSS (corrupt manifest or vectors), UNAVAILABLE (locked by another process).
  static absl::StatusOr<std::unique_ptr<Store>> Open(const std::string& path, const StoreOptions& options);
  ~Store();
  Store(const Store&) = delete;
  Store& operator=(const Store&) = delete;

  // Applies the batch atomically: every item is validated first (non-empty id of at most kMaxIdBytes, K finite
  // values within fp16 range); any bad item rejects the whole batch (INVALID_ARGUMENT, naming the item).
  // An id already in the store is replaced in place; within a batch the last occurrence of an id wins.
  absl::StatusOr<IngestResult> Ingest(const std::vector<IngestItem>& batch);

  // Deletes the records with these ids in one synced batch: their records and ids are removed and their vector
  // rows become tombstones (an empty value on disk, a NaN row in memory, which no scan ever returns), so they
  // are gone from the next scan and from GetRecord*, and a kill -9 afterwards keeps them deleted. Ids not in the
  // store are counted in not_found (deleting twice is harmless). New ids ingested later reuse the deleted rows
  // (smallest first), so a store under churn does not grow.
  // Errors: INVALID_ARGUMENT for an empty id (nothing is deleted then).
  absl::StatusOr<DeleteResult> Delete(const std::vector<std::string>& ids);
  // Compacts the store's files so that the space of deleted records is reclaimed now (RocksDB would in time).
  absl::Status Compact();
  // Live records: size() less the deleted rows.
  uint64_t live_records() const;

  absl::StatusOr<rapidin::v1::StoredRecord> GetRecordById(const std::string& id) const;
  absl::StatusOr<rapidin::v1::StoredRecord> GetRecordByIndex(uint64_t index) const;
  // The row's vector as stored (fp16 widened to float; NaN for a deleted row).
  absl::StatusOr<std::vector<float>> GetVector(uint64_t index) const;

  // Runs fn on shard s under its reader lock (the resident rows only).
  absl::Status WithShard(int s, const std::function<absl::Status(const ShardView&)>& fn) const;

  // The cold tier's rows at this moment: [first, second); empty when every row is resident.
  std::pair<uint64_t, uint64_t> ColdRange() const;
  // Reads rows [begin, begin + count) from disk into *out (replacing its rows), from one consistent snapshot.
  // Errors: OUT_OF_RANGE past the last row, DATA_LOSS for a missing or malformed row.
  absl::Status ReadRows(uint64_t begin, int64_t count, internal::AlignedRows* out) const;

  rapidin::v1::Manifest manifest() const;
  uint64_t size() const;
  uint32_t k() const;
  int num_shards() const;
  const std::string& path() const;
  TierUsage Usage() const;
  // RocksDB's last write sequence number: it grows with every write (ingest, delete) and persists, so a file
  // derived from the store (the IVF index) can tell at load whether the store changed since it was written.
  uint64_t sequence() const;

 private:
  struct Impl;
  explicit Store(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace rapidin::storage

#endif  // RAPIDIN_STORAGE_STORE_H_
