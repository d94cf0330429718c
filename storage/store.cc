#include "storage/store.h"

#include <algorithm>
#include <cstdarg>
#include <cstdio>
#include <chrono>
#include <cmath>
#include <filesystem>
#include <set>
#include <tuple>

#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "base/mutex.h"
#include "kernels/half.h"
#include "kernels/hash.h"
#include "rocksdb/db.h"
#include "rocksdb/options.h"
#include "rocksdb/table.h"
#include "rocksdb/write_batch.h"
#include "storage/internal/host_shard.h"

namespace rapidin::storage {
namespace {

constexpr char kManifestKey[] = "manifest";
const char* const kCfNames[] = {"manifest", "records", "vectors"};

// The one place RocksDB statuses become absl::Status.
absl::Status FromRocks(const rocksdb::Status& s, absl::string_view what) {
  if (s.ok()) return absl::OkStatus();
  const std::string msg = absl::StrCat(what, ": ", s.ToString());
  if (s.IsNotFound()) return absl::NotFoundError(msg);
  if (s.IsCorruption()) return absl::DataLossError(msg);
  if (s.IsIOError() && s.ToString().find("lock") != std::string::npos) {
    return absl::UnavailableError(absl::StrCat(msg, " (is another process using this store?)"));
  }
  if (s.IsInvalidArgument()) return absl::InvalidArgumentError(msg);
  if (s.IsNoSpace() || s.ToString().find("No space left") != std::string::npos) {
    return absl::ResourceExhaustedError(
        absl::StrCat(msg, " (the store's disk is full: nothing of this write was applied; free space and retry)"));
  }
  return absl::InternalError(msg);
}

std::string BigEndian64(uint64_t v) {
  std::string s(8, '\0');
  for (int i = 7; i >= 0; --i) {
    s[i] = static_cast<char>(v & 0xff);
    v >>= 8;
  }
  return s;
}

uint64_t FromBigEndian64(const rocksdb::Slice& s) {
  uint64_t v = 0;
  for (size_t i = 0; i < 8 && i < s.size(); ++i) v = (v << 8) | static_cast<uint8_t>(s[i]);
  return v;
}

std::string RecordKey(uint64_t index) { return "r" + BigEndian64(index); }
std::string IdKey(const std::string& id) { return "i" + id; }
std::string FreeKey(uint64_t index) { return "f" + BigEndian64(index); }

// A deleted row in memory: fp16 quiet NaNs, whose scores are NaN, which no top-k keeps (CPU or GPU).
const std::vector<uint16_t>& TombstoneRow(uint32_t k) {
  thread_local std::vector<uint16_t> row;
  if (row.size() != k) row.assign(k, 0x7E00);
  return row;
}

}  // namespace

std::string ProjectionStateId(const std::string& projection_state) {
  return absl::StrFormat("%016x",
                         kernels::Fnv1a(kernels::kFnv1aOffset, projection_state.data(), projection_state.size()));
}

// RocksDB's informational log goes to stderr (warnings and errors only), not to a LOG file in the
// store: on a full disk Debian's RocksDB 7.8 aborts (an assertion in WritableFileWriter) when it writes again to a
// LOG file whose last write failed, so nothing but data may live on the store's disk.
class ServiceLogger final : public rocksdb::Logger {
 public:
  ServiceLogger() : rocksdb::Logger(rocksdb::InfoLogLevel::WARN_LEVEL) {}
  void Logv(const char* format, va_list ap) override { Logv(rocksdb::InfoLogLevel::INFO_LEVEL, format, ap); }
  void Logv(const rocksdb::InfoLogLevel level, const char* format, va_list ap) override {
    if (level < GetInfoLogLevel() || level == rocksdb::InfoLogLevel::HEADER_LEVEL) return;
    char buf[2048];
    std::vsnprintf(buf, sizeof buf, format, ap);
    // stderr, one line: stdout belongs to the programs' output (JSON, tables, the crash writer's protocol).
    std::fprintf(stderr, "rocksdb %s: %s\n", level >= rocksdb::InfoLogLevel::ERROR_LEVEL ? "error" : "warning", buf);
  }
};

struct Store::Impl {
  std::string path;
  StoreOptions options;
  std::unique_ptr<rocksdb::DB> db;
  std::vector<rocksdb::ColumnFamilyHandle*> handles;  // manifest, records, vectors
  rocksdb::ColumnFamilyHandle* cf_manifest() const { return handles[0]; }
  rocksdb::ColumnFamilyHandle* cf_records() const { return handles[1]; }
  rocksdb::ColumnFamilyHandle* cf_vectors() const { return handles[2]; }

  mutable Mutex manifest_mu;
  rapidin::v1::Manifest manifest ABSL_GUARDED_BY(manifest_mu);

  Mutex ingest_mu;  // serialises writers (the read-modify-write of ids, rows and the manifest)
  // A write failed (a full disk): RocksDB then refuses every write until DB::Resume(), even once there is space.
  bool write_failed ABSL_GUARDED_BY(ingest_mu) = false;

  // Before a write: after a failed one, asks RocksDB to recover (it flushes what it could not); its error, mapped
  // by FromRocks, when it still cannot (the disk is still full).
  absl::Status ResumeAfterFailedWrite() ABSL_EXCLUSIVE_LOCKS_REQUIRED(ingest_mu) {
    if (!write_failed) return absl::OkStatus();
    const rocksdb::Status rs = db->Resume();
    if (rs.IsBusy()) {  // RocksDB's own recovery (it polls for free space) is under way
      return absl::UnavailableError(
          "the store is recovering from a failed write (a full disk?); nothing was written: retry shortly");
    }
    absl::Status st = FromRocks(rs, "recovering from the last failed write");
    if (st.ok()) write_failed = false;
    return st;
  }
  absl::Status Write(const rocksdb::WriteOptions& wo, rocksdb::WriteBatch* wb, absl::string_view what)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(ingest_mu) {
    if (absl::Status st = ResumeAfterFailedWrite(); !st.ok()) return st;
    absl::Status st = FromRocks(db->Write(wo, wb), what);
    if (!st.ok()) write_failed = true;
    return st;
  }
  // Rows of deleted records, which new ids reuse (smallest first) so that churn does not grow the store. On disk:
  // a FreeKey per row, written with the tombstone and removed when the row is reused.
  std::set<uint64_t> free_rows ABSL_GUARDED_BY(ingest_mu);
  struct Shard {
    Shard(int64_t k, internal::HostAllocator a) : rows(k, a) {}
    mutable SharedMutex mu;  // writers: Ingest and the load at Open; readers: scans, GetVector, Usage
    internal::AlignedRows rows ABSL_GUARDED_BY(mu);
    uint64_t generation ABSL_GUARDED_BY(mu) = 1;  // see ShardView
    uint64_t rewrite_generation ABSL_GUARDED_BY(mu) = 0;
  };
  std::vector<std::unique_ptr<Shard>> shards;
  uint64_t resident_limit = ~uint64_t{0};  // rows [0, resident_limit) may live in the host tier

  uint64_t Resident(uint64_t count) const { return std::min(count, resident_limit); }

  ~Impl() {
    for (auto* h : handles) {
      if (db) db->DestroyColumnFamilyHandle(h);
    }
    if (db) db->Close();
  }

  int num_shards() const { return static_cast<int>(shards.size()); }
  uint32_t k() const {
    MutexLock l(&manifest_mu);
    return manifest.k();
  }

  absl::Status WriteManifest(const rapidin::v1::Manifest& m) {
    rocksdb::WriteOptions wo;
    wo.sync = options.sync_writes;
    return FromRocks(db->Put(wo, cf_manifest(), kManifestKey, m.SerializeAsString()), "writing manifest");
  }

  absl::Status LoadHostTier(uint64_t all, uint32_t k) {
    // Every batch writes its rows and the new record_count together, so rows past the count mean a damaged
    // manifest: refuse, or the next ingest would write new rows over them.
    for (auto [cf, key, what] : {std::tuple{cf_vectors(), BigEndian64(all), "vectors"},
                                 std::tuple{cf_records(), RecordKey(all), "records"}}) {
      std::unique_ptr<rocksdb::Iterator> it(db->NewIterator(rocksdb::ReadOptions(), cf));
      it->Seek(key);
      if (it->Valid() && it->key().size() == key.size() && it->key().starts_with(key.substr(0, key.size() - 8))) {
        return absl::DataLossError(absl::StrCat("manifest says ", all, " records but ", what, " hold row ",
                                                FromBigEndian64(it->key().ToString().substr(key.size() - 8))));
      }
      if (!it->status().ok()) return FromRocks(it->status(), what);
    }
    const uint64_t count = Resident(all);
    if (count < all) {  // the cold rows stay on disk: check that the last one is there
      std::string v;
      absl::Status st = FromRocks(db->Get(rocksdb::ReadOptions(), cf_vectors(), BigEndian64(all - 1), &v),
                                  "vectors");
      if (absl::IsNotFound(st)) {
        return absl::DataLossError(absl::StrCat("manifest says ", all, " records but row ", all - 1, " is missing"));
      }
      if (!st.ok()) return st;
      if (v.size() != k * sizeof(uint16_t) && !v.empty()) {
        return absl::DataLossError(absl::StrCat("vectors: row ", all - 1, " has ", v.size(), " bytes"));
      }
    }
    const int s_count = num_shards();
    for (int s = 0; s < s_count; ++s) {
      const int64_t rows = static_cast<int64_t>((count + s_count - 1 - s) / s_count);
      WriterMutexLock l(&shards[s]->mu);  // uncontended: the store is not shared yet
      if (!shards[s]->rows.Reserve(rows)) {
        return absl::ResourceExhaustedError(absl::StrCat("cannot allocate the host tier for ", count, " rows"));
      }
    }
    std::unique_ptr<rocksdb::Iterator> it(db->NewIterator(rocksdb::ReadOptions(), cf_vectors()));
    uint64_t expect = 0;
    const uint64_t step = count / 100 + 1;
    for (it->SeekToFirst(); it->Valid() && expect < count; it->Next()) {
      const uint64_t index = FromBigEndian64(it->key());
      if (it->key().size() != 8 || index != expect) {
        return absl::DataLossError(absl::StrCat("vectors: expected row ", expect, ", found key of row ", index));
      }
      if (it->value().size() != k * sizeof(uint16_t) && !it->value().empty()) {
        return absl::DataLossError(absl::StrCat("vectors: row ", index, " has ", it->value().size(),
                                                " bytes, expected ", k * sizeof(uint16_t)));
      }
      if (index >= count) break;  // caught below
      Shard& shard = *shards[index % s_count];
      WriterMutexLock l(&shard.mu);
      shard.rows.Append(it->value().empty() ? TombstoneRow(k).data()
                                            : reinterpret_cast<const uint16_t*>(it->value().data()));
      ++expect;
      if (options.progress && expect % step == 0) options.progress(expect, count);
    }
    if (!it->status().ok()) return FromRocks(it->status(), "reading vectors");
    if (expect != count) {
      return absl::DataLossError(
          absl::StrCat("manifest says ", count, " records but the vectors column family holds ", expect));
    }
    if (options.progress) options.progress(count, count);
    return absl::OkStatus();
  }
};

Store::Store(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Store::~Store() = default;

absl::StatusOr<std::unique_ptr<Store>> Store::Open(const std::string& path, const StoreOptions& options) {
  if (options.num_shards < 1 || options.num_shards > 1024) {
    return absl::InvalidArgumentError(absl::StrCat("num_shards must be 1..1024, got ", options.num_shards));
  }
  namespace fs = std::filesystem;
  std::error_code ec;
  const bool exists = fs::exists(fs::path(path) / "CURRENT", ec);
  if (!exists) {
    if (!options.create_if_missing) {
      return absl::NotFoundError(absl::StrCat("no store at ", path, " (create it with a K, e.g. --k 4096)"));
    }
    if (options.k == 0) return absl::InvalidArgumentError("creating a store needs K > 0");
    if (fs::exists(path, ec) && fs::is_directory(path, ec) && !fs::is_empty(path, ec)) {
      return absl::InvalidArgumentError(absl::StrCat(path, " exists, is not empty and is not a store"));
    }
  }

  if (!exists) {
    fs::create_directories(path, ec);  // else RocksDB logs an error about the missing directory, then makes it
    if (ec) return absl::FailedPreconditionError(absl::StrCat("cannot create ", path, ": ", ec.message()));
  }
  auto impl = std::make_unique<Impl>();
  impl->path = path;
  impl->options = options;
  rocksdb::DBOptions dbo;
  dbo.create_if_missing = !exists;
  dbo.create_missing_column_families = !exists;
  dbo.paranoid_checks = true;
  dbo.info_log = std::make_shared<ServiceLogger>();
  // Bounded memtables: RocksDB's default lets each column family hold up to 2 x 64 MB before a flush, so a
  // server under steady ingest/delete churn grew for many minutes (the soak of bench/results/reliability.md). All
  // column families together now hold at most 32 MB.
  dbo.db_write_buffer_size = 32 << 20;
  std::vector<rocksdb::ColumnFamilyDescriptor> cfs;
  cfs.emplace_back(rocksdb::kDefaultColumnFamilyName, rocksdb::ColumnFamilyOptions());
  for (const char* name : kCfNames) {
    rocksdb::ColumnFamilyOptions co;
    co.write_buffer_size = 16 << 20;
    if (std::string(name) == "vectors") {
      // Rows are 2K bytes of fp16 gradients: incompressible, read in key order by cold-tier scans. 64 KB blocks
      // (several rows each) and no compression cut the per-row block work; existing SST files keep their layout.
      rocksdb::BlockBasedTableOptions t;
      t.block_size = 64 << 10;
      co.table_factory.reset(rocksdb::NewBlockBasedTableFactory(t));
      co.compression = rocksdb::kNoCompression;
    }
    cfs.emplace_back(name, co);
  }
  std::vector<rocksdb::ColumnFamilyHandle*> handles;
  rocksdb::DB* raw = nullptr;
  absl::Status st = FromRocks(rocksdb::DB::Open(dbo, path, cfs, &handles, &raw), absl::StrCat("opening ", path));
  if (!st.ok()) {
    if (exists && absl::IsInvalidArgument(st)) {
      return absl::DataLossError(absl::StrCat(st.message(), " (not a rapidin store?)"));
    }
    return st;
  }
  impl->db.reset(raw);
  raw->DestroyColumnFamilyHandle(handles[0]);  // default CF unused
  impl->handles.assign(handles.begin() + 1, handles.end());

  rapidin::v1::Manifest m;
  std::string blob;
  rocksdb::Status rs = impl->db->Get(rocksdb::ReadOptions(), impl->cf_manifest(), kManifestKey, &blob);
  if (rs.IsNotFound()) {
    if (exists) return absl::DataLossError(absl::StrCat(path, ": store has no manifest"));
    m.set_format_version(kFormatVersion);
    m.set_k(options.k);
    m.set_dtype(rapidin::v1::VECTOR_DTYPE_FP16);
    m.set_projection_state(options.projection_state);
    m.set_projection_state_id(ProjectionStateId(options.projection_state));
    m.set_record_count(0);
    m.set_created_unix(std::chrono::duration_cast<std::chrono::seconds>(
                           std::chrono::system_clock::now().time_since_epoch())
                           .count());
    st = impl->WriteManifest(m);
    if (!st.ok()) return st;
  } else if (!rs.ok()) {
    return FromRocks(rs, "reading manifest");
  } else if (!m.ParseFromString(blob)) {
    return absl::DataLossError(absl::StrCat(path, ": manifest does not parse"));
  }

  // Validate what we found against the format and the caller's expectations.
  if (m.format_version() != kFormatVersion) {
    return absl::FailedPreconditionError(absl::StrCat("store format version ", m.format_version(),
                                                      " is not supported (this build reads ", kFormatVersion, ")"));
  }
  if (m.k() == 0) return absl::DataLossError("manifest has K = 0");
  if (m.dtype() != rapidin::v1::VECTOR_DTYPE_FP16) {
    return absl::FailedPreconditionError(absl::StrCat("vector dtype ", rapidin::v1::VectorDType_Name(m.dtype()),
                                                      " is not supported on the CPU tier"));
  }
  if (m.projection_state_id() != ProjectionStateId(m.projection_state())) {
    return absl::DataLossError("manifest's projection_state_id does not match its projection state");
  }
  if (options.k != 0 && options.k != m.k()) {
    return absl::InvalidArgumentError(absl::StrCat("store has K = ", m.k(), ", but K = ", options.k, " was asked for"));
  }
  if (!options.projection_state.empty() && options.projection_state != m.projection_state()) {
    return absl::FailedPreconditionError(
        absl::StrCat("store was built with projection state ", m.projection_state_id(), ", not ",
                     ProjectionStateId(options.projection_state)));
  }
  {
    MutexLock l(&impl->manifest_mu);
    impl->manifest = m;
  }
  for (int s = 0; s < options.num_shards; ++s) {
    impl->shards.push_back(std::make_unique<Impl::Shard>(m.k(), options.host_allocator));
  }
  if (options.host_budget_bytes > 0) impl->resident_limit = options.host_budget_bytes / (uint64_t{m.k()} * 2);
  st = impl->LoadHostTier(m.record_count(), m.k());
  if (!st.ok()) return st;
  {
    MutexLock l(&impl->ingest_mu);
    std::unique_ptr<rocksdb::Iterator> it(impl->db->NewIterator(rocksdb::ReadOptions(), impl->cf_records()));
    for (it->Seek("f"); it->Valid() && it->key().starts_with("f"); it->Next()) {
      const uint64_t g = FromBigEndian64(it->key().ToString().substr(1));
      if (it->key().size() != 9 || g >= m.record_count()) {
        return absl::DataLossError(absl::StrCat("records: a free-row key past the ", m.record_count(), " rows"));
      }
      impl->free_rows.insert(g);
    }
    if (!it->status().ok()) return FromRocks(it->status(), "reading free rows");
    if (impl->free_rows.size() != m.deleted_count()) {
      return absl::DataLossError(absl::StrCat("manifest says ", m.deleted_count(), " deleted rows, but ",
                                              impl->free_rows.size(), " are marked free"));
    }
  }
  return std::unique_ptr<Store>(new Store(std::move(impl)));
}

absl::StatusOr<IngestResult> Store::Ingest(const std::vector<IngestItem>& batch) {
  Impl& d = *impl_;
  const uint32_t k = d.k();
  // 1. Validate everything before touching anything.
  std::vector<std::vector<uint16_t>> halves(batch.size());
  for (size_t i = 0; i < batch.size(); ++i) {
    const IngestItem& item = batch[i];
    const std::string& id = item.record.id();
    if (id.empty()) return absl::InvalidArgumentError(absl::StrCat("record ", i, " of the batch has an empty id"));
    if (id.size() > kMaxIdBytes) {
      return absl::InvalidArgumentError(absl::StrCat("record ", i, ": id longer than ", kMaxIdBytes, " bytes"));
    }
    if (item.vector.size() != k) {
      return absl::InvalidArgumentError(absl::StrCat("record ", i, " (id \"", id, "\"): vector has ",
                                                     item.vector.size(), " values, the store's K is ", k));
    }
    halves[i].resize(k);
    for (uint32_t c = 0; c < k; ++c) {
      const float v = item.vector[c];
      if (!std::isfinite(v)) {
        return absl::InvalidArgumentError(
            absl::StrCat("record ", i, " (id \"", id, "\"): vector[", c, "] is not finite"));
      }
      if (!kernels::FitsHalf(v)) {
        return absl::InvalidArgumentError(absl::StrCat("record ", i, " (id \"", id, "\"): vector[", c, "] = ", v,
                                                       " is outside the fp16 range (|x| <= 65504)"));
      }
      halves[i][c] = kernels::FloatToHalf(v);
    }
  }

  MutexLock writer(&d.ingest_mu);
  rapidin::v1::Manifest m = manifest();
  const uint64_t old_count = m.record_count();
  uint64_t next = old_count;
  // 2. Resolve each id to its row: existing rows are replaced, new ids get a deleted record's row (smallest
  // first), else the next rows.
  absl::flat_hash_map<std::string, uint64_t> batch_rows;
  std::vector<uint64_t> rows(batch.size());
  std::vector<uint64_t> reused;
  auto free_it = d.free_rows.begin();
  IngestResult result;
  for (size_t i = 0; i < batch.size(); ++i) {
    const std::string& id = batch[i].record.id();
    auto it = batch_rows.find(id);
    if (it != batch_rows.end()) {
      rows[i] = it->second;
      continue;
    }
    std::string val;
    rocksdb::Status rs = d.db->Get(rocksdb::ReadOptions(), d.cf_records(), IdKey(id), &val);
    if (rs.ok()) {
      rows[i] = FromBigEndian64(val);
      ++result.replaced;
    } else if (rs.IsNotFound()) {
      if (free_it != d.free_rows.end()) {
        rows[i] = *free_it++;
        reused.push_back(rows[i]);
      } else {
        rows[i] = next++;
      }
      ++result.inserted;
    } else {
      return FromRocks(rs, "looking up record id");
    }
    batch_rows[id] = rows[i];
  }
  // 3. Make room in memory first, so that nothing can fail after the disk write.
  const int S = d.num_shards();
  const uint64_t resident = d.Resident(next);
  for (int s = 0; s < S; ++s) {
    const int64_t need = static_cast<int64_t>((resident + S - 1 - s) / S);
    WriterMutexLock l(&d.shards[s]->mu);
    if (!d.shards[s]->rows.Reserve(need)) {
      return absl::ResourceExhaustedError("host tier: out of memory for this batch");
    }
  }
  // 4. One atomic, synced write.
  rocksdb::WriteBatch wb;
  for (size_t i = 0; i < batch.size(); ++i) {
    rapidin::v1::StoredRecord sr;
    *sr.mutable_record() = batch[i].record;
    sr.set_index(rows[i]);
    wb.Put(d.cf_records(), RecordKey(rows[i]), sr.SerializeAsString());
    wb.Put(d.cf_records(), IdKey(batch[i].record.id()), BigEndian64(rows[i]));
    wb.Put(d.cf_vectors(), BigEndian64(rows[i]),
           rocksdb::Slice(reinterpret_cast<const char*>(halves[i].data()), k * sizeof(uint16_t)));
  }
  for (uint64_t g : reused) wb.Delete(d.cf_records(), FreeKey(g));
  m.set_record_count(next);
  m.set_deleted_count(m.deleted_count() - reused.size());
  wb.Put(d.cf_manifest(), kManifestKey, m.SerializeAsString());
  rocksdb::WriteOptions wo;
  wo.sync = d.options.sync_writes;
  absl::Status st = d.Write(wo, &wb, "writing batch");
  if (!st.ok()) return st;
  for (uint64_t g : reused) d.free_rows.erase(g);
  // 5. Memory follows disk: the last occurrence of each row's id wins, as it did in the WriteBatch. New rows
  // are appended in index order so that local positions stay g / S.
  absl::flat_hash_map<uint64_t, size_t> last_item;
  for (size_t i = 0; i < batch.size(); ++i) last_item[rows[i]] = i;
  std::vector<std::pair<uint64_t, size_t>> by_row(last_item.begin(), last_item.end());
  std::sort(by_row.begin(), by_row.end());
  for (const auto& [g, i] : by_row) {
    if (g >= resident) break;  // cold rows live on disk only
    auto& shard = *d.shards[g % S];
    WriterMutexLock l(&shard.mu);
    ++shard.generation;
    if (g < old_count) {
      shard.rows.Overwrite(static_cast<int64_t>(g / S), halves[i].data());
      shard.rewrite_generation = shard.generation;
    } else {
      shard.rows.Append(halves[i].data());
    }
  }
  {
    MutexLock l(&d.manifest_mu);
    d.manifest.set_record_count(next);
    d.manifest.set_deleted_count(m.deleted_count());
  }
  result.rows = std::move(rows);
  result.sequence = d.db->GetLatestSequenceNumber();
  return result;
}

absl::StatusOr<rapidin::v1::StoredRecord> Store::GetRecordByIndex(uint64_t index) const {
  std::string val;
  absl::Status st =
      FromRocks(impl_->db->Get(rocksdb::ReadOptions(), impl_->cf_records(), RecordKey(index), &val), "record");
  if (absl::IsNotFound(st)) return absl::NotFoundError(absl::StrCat("no record at row ", index));
  if (!st.ok()) return st;
  rapidin::v1::StoredRecord sr;
  if (!sr.ParseFromString(val)) return absl::DataLossError(absl::StrCat("record at row ", index, " does not parse"));
  return sr;
}

absl::StatusOr<DeleteResult> Store::Delete(const std::vector<std::string>& ids) {
  Impl& d = *impl_;
  for (size_t i = 0; i < ids.size(); ++i) {
    if (ids[i].empty()) return absl::InvalidArgumentError(absl::StrCat("ids[", i, "] is empty"));
  }
  MutexLock writer(&d.ingest_mu);
  rapidin::v1::Manifest m = manifest();
  DeleteResult result;
  std::vector<uint64_t> rows;
  absl::flat_hash_set<std::string> seen;
  rocksdb::WriteBatch wb;
  for (const std::string& id : ids) {
    if (!seen.insert(id).second) continue;  // twice in one request: once
    std::string val;
    rocksdb::Status rs = d.db->Get(rocksdb::ReadOptions(), d.cf_records(), IdKey(id), &val);
    if (rs.IsNotFound()) {
      ++result.not_found;
      continue;
    }
    if (!rs.ok()) return FromRocks(rs, "looking up record id");
    const uint64_t g = FromBigEndian64(val);
    rows.push_back(g);
    wb.Delete(d.cf_records(), IdKey(id));
    wb.Delete(d.cf_records(), RecordKey(g));
    wb.Put(d.cf_vectors(), BigEndian64(g), rocksdb::Slice());  // the tombstone: an empty row
    wb.Put(d.cf_records(), FreeKey(g), rocksdb::Slice());
    ++result.deleted;
  }
  if (rows.empty()) {
    result.sequence = d.db->GetLatestSequenceNumber();
    return result;
  }
  m.set_deleted_count(m.deleted_count() + rows.size());
  wb.Put(d.cf_manifest(), kManifestKey, m.SerializeAsString());
  rocksdb::WriteOptions wo;
  wo.sync = d.options.sync_writes;
  absl::Status st = d.Write(wo, &wb, "writing deletions");
  if (!st.ok()) return st;
  d.free_rows.insert(rows.begin(), rows.end());
  // Memory follows disk: resident rows become NaN rows (rewrites, so a GPU copy is refreshed whole).
  const int S = d.num_shards();
  const uint64_t resident = d.Resident(m.record_count());
  const uint32_t k = d.k();
  for (uint64_t g : rows) {
    if (g >= resident) continue;  // a cold row: the tombstone on disk is all there is
    auto& shard = *d.shards[g % S];
    WriterMutexLock l(&shard.mu);
    ++shard.generation;
    shard.rows.Overwrite(static_cast<int64_t>(g / S), TombstoneRow(k).data());
    shard.rewrite_generation = shard.generation;
  }
  {
    MutexLock l(&d.manifest_mu);
    d.manifest.set_deleted_count(m.deleted_count());
  }
  result.rows = std::move(rows);
  result.sequence = d.db->GetLatestSequenceNumber();
  return result;
}

absl::Status Store::Compact() {
  rocksdb::CompactRangeOptions o;
  o.bottommost_level_compaction = rocksdb::BottommostLevelCompaction::kForce;
  {
    MutexLock writer(&impl_->ingest_mu);  // not held while compacting, which may take long: writers go on
    if (absl::Status st = impl_->ResumeAfterFailedWrite(); !st.ok()) return st;
  }
  for (auto* h : impl_->handles) {
    absl::Status st = FromRocks(impl_->db->CompactRange(o, h, nullptr, nullptr), "compacting");
    if (!st.ok()) {
      MutexLock writer(&impl_->ingest_mu);
      impl_->write_failed = true;
      return st;
    }
  }
  return absl::OkStatus();
}

uint64_t Store::live_records() const {
  const rapidin::v1::Manifest m = manifest();
  return m.record_count() - m.deleted_count();
}

absl::StatusOr<rapidin::v1::StoredRecord> Store::GetRecordById(const std::string& id) const {
  std::string val;
  rocksdb::Status rs = impl_->db->Get(rocksdb::ReadOptions(), impl_->cf_records(), IdKey(id), &val);
  if (rs.IsNotFound()) return absl::NotFoundError(absl::StrCat("no record with id \"", id, "\""));
  if (!rs.ok()) return FromRocks(rs, "looking up record id");
  return GetRecordByIndex(FromBigEndian64(val));
}

absl::StatusOr<std::vector<float>> Store::GetVector(uint64_t index) const {
  const uint32_t k = impl_->k();
  auto widen = [k](const uint16_t* row) {
    std::vector<float> out(k);
    for (uint32_t c = 0; c < k; ++c) out[c] = kernels::HalfToFloat(row[c]);
    return out;
  };
  const auto [cold_begin, cold_end] = ColdRange();
  if (index >= cold_begin && index < cold_end) {
    internal::AlignedRows row(k);
    absl::Status st = ReadRows(index, 1, &row);
    if (!st.ok()) return st;
    return widen(row.data());
  }
  const int S = impl_->num_shards();
  const auto& shard = *impl_->shards[index % S];
  ReaderMutexLock l(&shard.mu);
  const int64_t r = static_cast<int64_t>(index / S);
  if (r >= shard.rows.n()) return absl::NotFoundError(absl::StrCat("no vector at row ", index));
  return widen(shard.rows.row(r));
}

absl::Status Store::WithShard(int s, const std::function<absl::Status(const ShardView&)>& fn) const {
  if (s < 0 || s >= impl_->num_shards()) return absl::OutOfRangeError(absl::StrCat("no shard ", s));
  const auto& shard = *impl_->shards[s];
  ReaderMutexLock l(&shard.mu);
  ShardView v;
  v.shard = s;
  v.rows = shard.rows.data();
  v.n = shard.rows.n();
  v.k = impl_->k();
  v.first_index = s;
  v.index_stride = impl_->num_shards();
  v.generation = shard.generation;
  v.rewrite_generation = shard.rewrite_generation;
  return fn(v);
}

std::pair<uint64_t, uint64_t> Store::ColdRange() const {
  const uint64_t n = size();
  return {impl_->Resident(n), n};
}

absl::Status Store::ReadRows(uint64_t begin, int64_t count, internal::AlignedRows* out) const {
  const uint64_t n = size();
  if (count < 0 || begin + static_cast<uint64_t>(count) > n) {
    return absl::OutOfRangeError(absl::StrCat("rows [", begin, ", ", begin + count, ") are not all in the store (",
                                              n, " rows)"));
  }
  const uint32_t k = impl_->k();
  out->Clear();
  if (!out->Reserve(count)) return absl::ResourceExhaustedError("cannot allocate a buffer for cold rows");
  rocksdb::ReadOptions ro;
  ro.fill_cache = false;  // a scan of the cold tier should not evict the block cache's records
  ro.readahead_size = 4 << 20;  // rows are read in key order: large sequential reads from disk
  std::unique_ptr<rocksdb::Iterator> it(impl_->db->NewIterator(ro, impl_->cf_vectors()));
  uint64_t expect = begin;
  for (it->Seek(BigEndian64(begin)); it->Valid() && expect < begin + count; it->Next(), ++expect) {
    if (it->key().size() != 8 || FromBigEndian64(it->key()) != expect) {
      return absl::DataLossError(absl::StrCat("vectors: row ", expect, " is missing"));
    }
    if (it->value().empty()) {  // a deleted row
      out->Append(TombstoneRow(k).data());
      continue;
    }
    if (it->value().size() != k * sizeof(uint16_t)) {
      return absl::DataLossError(absl::StrCat("vectors: row ", expect, " has ", it->value().size(), " bytes"));
    }
    out->Append(reinterpret_cast<const uint16_t*>(it->value().data()));
  }
  if (!it->status().ok()) return FromRocks(it->status(), "reading vectors");
  if (expect != begin + count) return absl::DataLossError(absl::StrCat("vectors: row ", expect, " is missing"));
  return absl::OkStatus();
}

rapidin::v1::Manifest Store::manifest() const {
  MutexLock l(&impl_->manifest_mu);
  return impl_->manifest;
}
uint64_t Store::size() const { return manifest().record_count(); }
uint32_t Store::k() const { return impl_->k(); }
int Store::num_shards() const { return impl_->num_shards(); }
const std::string& Store::path() const { return impl_->path; }
uint64_t Store::sequence() const { return impl_->db->GetLatestSequenceNumber(); }

TierUsage Store::Usage() const {
  TierUsage u;
  for (const auto& s : impl_->shards) {
    ReaderMutexLock l(&s->mu);
    u.host_records += s->rows.n();
    u.host_bytes += s->rows.bytes();
  }
  uint64_t sst = 0, wal = 0;
  for (auto* h : impl_->handles) {
    uint64_t v = 0;
    if (impl_->db->GetIntProperty(h, "rocksdb.live-sst-files-size", &v)) sst += v;
  }
  std::error_code ec;
  for (const auto& e : std::filesystem::directory_iterator(impl_->path, ec)) {
    if (e.path().extension() == ".log") wal += e.file_size(ec);
  }
  u.disk_bytes = sst + wal;
  const auto [cold_begin, cold_end] = ColdRange();
  u.cold_records = cold_end - cold_begin;
  u.cold_bytes = u.cold_records * impl_->k() * sizeof(uint16_t);
  return u;
}

}  // namespace rapidin::storage
