// `rapidin cache`: builds (or resumes) a store of RapidGrad-compressed gradients from an instruction data set.
// Thread-safety: one RunCache per store at a time (the store's lock refuses a second process); it runs its own
// worker threads (CacheOptions::threads).
#ifndef RAPIDIN_CACHE_CACHE_H_
#define RAPIDIN_CACHE_CACHE_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "model/engine.h"
#include "model/featurizer.h"

namespace rapidin::cache {

struct DataRecord {
  std::string id;
  model::Example example;
  std::string where;  // "FILE:LINE" or "FILE record N", for messages
  int64_t position = 0;  // 0-based position in the file
};

struct BadRecord {
  std::string where;
  std::string reason;
  int64_t position = 0;
};

// Reads a JSON array or JSONL file (optionally gzipped: .jsonl.gz, .json.gz) of records: Alpaca
// {id?, instruction, input?, output}, chat {id?, messages: [{role, content}, ...]} (at least one assistant turn)
// or plain text {id?, text}; the forms may mix. Records without an id get
// "<file stem>-<0-based position>". Bad records (unparsable line, missing or non-string fields, empty output,
// duplicate id) are returned in *bad and skipped. Errors: NOT_FOUND, INVALID_ARGUMENT (a JSON array that does
// not parse at all).
absl::StatusOr<std::vector<DataRecord>> ReadInstructionData(const std::string& path, std::vector<BadRecord>* bad);

struct CacheOptions {
  model::FeaturizerOptions featurizer;
  std::string data_path;
  std::string store_path;
  int threads = 1;
  int batch_size = 64;      // records per atomic store write
  int grad_batch = 1;       // records per forward/backward pass (1 was faster here: bench/results/cache.md)
  int64_t limit = 0;       // cache at most this many records of the file (0: all)
  // Caching at scale: this run caches range shard_index of shard_count contiguous, balanced ranges of the file's
  // records (after limit), for one shard server each. The stores share one projection state, so a router can
  // merge them.
  int shard_index = 0;
  int shard_count = 1;
  bool progress = true;    // progress lines on stderr
};

struct CacheSummary {
  int64_t total = 0, cached = 0, skipped_existing = 0, bad = 0, truncated = 0, failed = 0;
  double seconds = 0, grad_s = 0, normalize_s = 0, sketch_s = 0, write_s = 0;
  double mean_loss = 0;
  int64_t store_records = 0;
  int64_t range_begin = 0, range_end = 0;  // positions [begin, end) of the file this run covered
  std::string projection_state_id;
  std::string device;  // where the gradients ran
  std::string grad_path;  // how: "direct" (hand-written pass) or "autograd" (GradientEngine::grad_path)
  std::vector<BadRecord> bad_records;
};

absl::StatusOr<CacheSummary> RunCache(const CacheOptions& options);

}  // namespace rapidin::cache

#endif  // RAPIDIN_CACHE_CACHE_H_
