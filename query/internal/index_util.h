// What the two indexes (ivf_index.h, pca_index.h) share: their file framing (magic, checksum, atomic replace),
// the training sample, and a pass over every row of a store.
#ifndef RAPIDIN_QUERY_INTERNAL_INDEX_UTIL_H_
#define RAPIDIN_QUERY_INTERNAL_INDEX_UTIL_H_

#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "storage/store.h"

namespace rapidin::query::internal {

template <typename T>
void Put(std::string* out, const T& v) {
  out->append(reinterpret_cast<const char*>(&v), sizeof(T));
}

// Reads sizeof(T) bytes at *pos; false past the end.
template <typename T>
bool Get(const std::string& in, size_t* pos, T* v) {
  if (in.size() < *pos || in.size() - *pos < sizeof(T)) return false;
  std::memcpy(v, in.data() + *pos, sizeof(T));
  *pos += sizeof(T);
  return true;
}

inline bool RowDeleted(const float* row) { return std::isnan(row[0]); }

// Writes magic + body + FNV-1a checksum to path through a temporary file, fsync and rename (then fsyncs the
// directory), so a crash leaves the old file or the new one. Errors: INTERNAL with the system's reason.
absl::Status WriteIndexFile(const std::string& path, const char (&magic)[8], const std::string& body);

// Reads a file written by WriteIndexFile and returns its body. Errors: NOT_FOUND (no file), DATA_LOSS (another
// kind of file, truncated, or a checksum mismatch), naming the file.
absl::StatusOr<std::string> ReadIndexFile(const std::string& path, const char (&magic)[8], const std::string& what);

// Up to m live rows of the store in a seeded random choice, widened to float (row-major), read in row order.
// progress(done, total) every 4096 rows.
absl::StatusOr<std::vector<float>> SampleRows(const storage::Store& store, int64_t m, uint64_t seed,
                                              const std::function<void(uint64_t, uint64_t)>& progress,
                                              int64_t* taken);

// Calls fn on blocks of at most `block` rows until every row of the store has been seen once: the resident rows
// shard by shard (under the shard's reader lock), then the cold tier read from disk. Row i of a block has global
// index first + i * stride. Stops at fn's first error.
absl::Status ForEachRowBlock(
    const storage::Store& store, int64_t block,
    const std::function<absl::Status(const uint16_t* rows, int64_t n, uint64_t first, int64_t stride)>& fn);

// The start-up policy of both indexes: Load path; an index that fits (mismatch returns "") is returned as is, or
// brought up to date by refresh (then saved) when the store was written since; anything else (no file, damage,
// another store, a mismatch, or rebuild) is built anew and saved. *how says which, for the log.
template <typename Index, typename Options>
absl::StatusOr<std::unique_ptr<Index>> OpenIndexFile(const storage::Store& store, const Options& options,
                                                     bool rebuild, const std::string& path,
                                                     const std::function<std::string(const Index&)>& mismatch,
                                                     const std::function<absl::Status(Index&)>& refresh,
                                                     const char* refreshed, std::string* how) {
  std::string why = "rebuild asked for";
  if (!rebuild) {
    auto loaded = Index::Load(path, store);
    why = loaded.ok() ? mismatch(**loaded) : std::string(loaded.status().message());
    if (loaded.ok() && why.empty()) {
      std::unique_ptr<Index> index = std::move(*loaded);
      if (!index->stale()) {
        *how = absl::StrCat("loaded ", path);
        return index;
      }
      if (absl::Status st = refresh(*index); !st.ok()) return st;
      if (absl::Status st = index->Save(path); !st.ok()) return st;
      *how = absl::StrCat("loaded ", path, "; the store was written since, so every row was ", refreshed,
                          " and saved");
      return index;
    }
  }
  auto built = Index::Build(store, options);
  if (!built.ok()) return built.status();
  if (absl::Status st = (*built)->Save(path); !st.ok()) return st;
  *how = absl::StrCat("built and saved to ", path, " (", why, ")");
  return built;
}

}  // namespace rapidin::query::internal

#endif  // RAPIDIN_QUERY_INTERNAL_INDEX_UTIL_H_
