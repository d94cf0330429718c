#include "cache/cache.h"

#include <zlib.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <nlohmann/json.hpp>
#include <thread>
#include <unordered_set>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "base/mutex.h"
#include "storage/store.h"

namespace rapidin::cache {
namespace {

using nlohmann::json;

// Fills rec from one JSON value; returns the reason when it is not a usable record.
std::string ToRecord(const json& j, const std::string& default_id, DataRecord* rec) {
  if (!j.is_object()) return "not a JSON object";
  auto str = [&](const char* key, bool required, std::string* dst) -> std::string {
    auto it = j.find(key);
    if (it == j.end() || it->is_null()) return required ? absl::StrCat("missing \"", key, "\"") : "";
    if (!it->is_string()) return absl::StrCat("\"", key, "\" is not a string");
    *dst = it->get<std::string>();
    return "";
  };
  std::string why;
  auto& ex = rec->example;
  if (j.contains("messages")) {  // a chat: [{"role": ..., "content": ...}, ...]
    const auto& m = j["messages"];
    if (!m.is_array() || m.empty()) return "\"messages\" must be a non-empty array";
    ex.format = model::RecordFormat::kChat;
    bool assistant = false;
    for (size_t i = 0; i < m.size(); ++i) {
      const auto& msg = m[i];
      if (!msg.is_object() || !msg.contains("role") || !msg["role"].is_string() || !msg.contains("content") ||
          !msg["content"].is_string()) {
        return absl::StrCat("messages[", i, "] needs string \"role\" and \"content\"");
      }
      ex.messages.push_back({msg["role"].get<std::string>(), msg["content"].get<std::string>()});
      assistant = assistant || ex.messages.back().role == "assistant";
    }
    if (!assistant) return "a chat record needs an assistant turn (the loss is on assistant turns)";
  } else if (j.contains("text") && !j.contains("instruction")) {  // plain text: the loss on every token
    ex.format = model::RecordFormat::kText;
    if (!(why = str("text", true, &ex.text)).empty()) return why;
    if (ex.text.empty()) return "empty text";
  } else {
    if (!(why = str("instruction", true, &ex.instruction)).empty()) return why;
    if (!(why = str("input", false, &ex.input)).empty()) return why;
    if (!(why = str("output", true, &ex.output)).empty()) return why;
    if (ex.output.empty()) return "empty output";
    if (ex.instruction.empty()) return "empty instruction";
  }
  auto id = j.find("id");
  if (id == j.end() || id->is_null()) {
    rec->id = default_id;
  } else if (id->is_string() && !id->get<std::string>().empty()) {
    rec->id = id->get<std::string>();
  } else if (id->is_number_integer()) {
    rec->id = std::to_string(id->get<int64_t>());
  } else {
    return "\"id\" must be a non-empty string or an integer";
  }
  if (rec->id.size() > storage::kMaxIdBytes) return "id too long";
  return "";
}

std::string Eta(double s) {
  if (s < 60) return absl::StrCat(static_cast<int>(s), " s");
  return absl::StrCat(static_cast<int>(s / 60), " min ", static_cast<int>(s) % 60, " s");
}

}  // namespace

// The whole of a gzip file (path ends in .gz), or the error that names why not: a truncated or damaged file is
// refused whole (DATA_LOSS), never read in part.
absl::StatusOr<std::string> ReadGzip(const std::string& path) {
  gzFile f = gzopen(path.c_str(), "rb");
  if (f == nullptr) return absl::NotFoundError(absl::StrCat("data file not found: ", path));
  std::string out;
  char buf[1 << 16];
  int n = 0;
  while ((n = gzread(f, buf, sizeof buf)) > 0) out.append(buf, static_cast<size_t>(n));
  int err = Z_OK;
  const char* msg = gzerror(f, &err);
  const std::string why = msg ? msg : "";
  gzclose(f);
  if (n < 0 || (err != Z_OK && err != Z_STREAM_END)) {
    return absl::DataLossError(absl::StrCat(path, ": not a whole gzip file (", why, ")"));
  }
  return out;
}

absl::StatusOr<std::vector<DataRecord>> ReadInstructionData(const std::string& path, std::vector<BadRecord>* bad) {
  const bool gz = absl::EndsWith(path, ".gz");
  std::ifstream file;
  std::istringstream text;
  if (gz) {
    auto whole = ReadGzip(path);
    if (!whole.ok()) return whole.status();
    text.str(std::move(*whole));
  } else {
    file.open(path);
    if (!file) return absl::NotFoundError(absl::StrCat("data file not found: ", path));
  }
  std::istream& in = gz ? static_cast<std::istream&>(text) : file;
  // Ids default to STEM-POSITION, with STEM the name without .json/.jsonl (and .gz): train.jsonl.gz = train.jsonl.
  std::filesystem::path name(path);
  if (gz) name = name.stem();
  const std::string stem = name.stem().string();
  std::vector<DataRecord> out;
  std::unordered_set<std::string> seen;
  auto add = [&](const json& j, int64_t pos, const std::string& where) {
    DataRecord rec;
    rec.where = where;
    rec.position = pos;
    std::string why = ToRecord(j, absl::StrCat(stem, "-", pos), &rec);
    if (why.empty() && !seen.insert(rec.id).second) why = absl::StrCat("duplicate id \"", rec.id, "\"");
    if (!why.empty()) {
      bad->push_back({where, why, pos});
      return;
    }
    out.push_back(std::move(rec));
  };
  // A JSON array, or JSON lines.
  char first = 0;
  while (in.get(first) && std::isspace(static_cast<unsigned char>(first))) {
  }
  in.seekg(0);
  if (first == '[') {
    json arr = json::parse(in, nullptr, false);
    if (arr.is_discarded() || !arr.is_array()) {
      return absl::InvalidArgumentError(absl::StrCat(path, ": malformed JSON array"));
    }
    for (size_t i = 0; i < arr.size(); ++i) add(arr[i], static_cast<int64_t>(i), absl::StrCat(path, " record ", i + 1));
    return out;
  }
  std::string line;
  int64_t no = 0, pos = 0;
  while (std::getline(in, line)) {
    ++no;
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    json j = json::parse(line, nullptr, false);
    const std::string where = absl::StrCat(path, ":", no);
    if (j.is_discarded()) {
      bad->push_back({where, "malformed JSON", pos});
      ++pos;
      continue;
    }
    add(j, pos++, where);
  }
  return out;
}

absl::StatusOr<CacheSummary> RunCache(const CacheOptions& o) {
  using Clock = std::chrono::steady_clock;
  const auto t_start = Clock::now();
  CacheSummary sum;
  auto data = ReadInstructionData(o.data_path, &sum.bad_records);
  if (!data.ok()) return data.status();
  if (o.limit > 0) {  // the first `limit` records of the file, good or bad
    auto beyond = [&](const auto& r) { return r.position >= o.limit; };
    data->erase(std::remove_if(data->begin(), data->end(), beyond), data->end());
    sum.bad_records.erase(std::remove_if(sum.bad_records.begin(), sum.bad_records.end(), beyond),
                          sum.bad_records.end());
  }
  int64_t positions = 0;
  for (const auto& r : *data) positions = std::max(positions, r.position + 1);
  for (const auto& r : sum.bad_records) positions = std::max(positions, r.position + 1);
  sum.range_end = positions;
  if (o.shard_count != 1 || o.shard_index != 0) {
    if (o.shard_count < 1 || o.shard_index < 0 || o.shard_index >= o.shard_count) {
      return absl::InvalidArgumentError(absl::StrCat("shard index ", o.shard_index, " of ", o.shard_count,
                                                     ": need 0 <= index < count"));
    }
    // Position p goes to range floor(p * count / positions): contiguous, sizes differing by at most one.
    const int64_t n = o.shard_count, i = o.shard_index;
    sum.range_begin = (i * positions + n - 1) / n;
    sum.range_end = ((i + 1) * positions + n - 1) / n;
    auto outside = [&](const auto& r) { return r.position < sum.range_begin || r.position >= sum.range_end; };
    data->erase(std::remove_if(data->begin(), data->end(), outside), data->end());
    sum.bad_records.erase(std::remove_if(sum.bad_records.begin(), sum.bad_records.end(), outside),
                          sum.bad_records.end());
    if (o.progress) {
      std::fprintf(stderr, "shard %d of %d: records %lld..%lld of %lld\n", o.shard_index, o.shard_count,
                   static_cast<long long>(sum.range_begin), static_cast<long long>(sum.range_end - 1),
                   static_cast<long long>(positions));
    }
  }
  sum.total = static_cast<int64_t>(data->size() + sum.bad_records.size());  // every record considered
  sum.bad = static_cast<int64_t>(sum.bad_records.size());
  for (const auto& b : sum.bad_records) std::fprintf(stderr, "skipping %s: %s\n", b.where.c_str(), b.reason.c_str());

  model::SetComputeThreads(1);  // parallelism comes from records, one per thread
  auto feat = model::Featurizer::Create(o.featurizer);
  if (!feat.ok()) return feat.status();
  const std::string state = (*feat)->projection_state();

  // Open the store; an existing one must have been built with the same projection state.
  storage::StoreOptions so;
  auto store = storage::Store::Open(o.store_path, so);
  if (absl::IsNotFound(store.status())) {
    so.create_if_missing = true;
    so.k = static_cast<uint32_t>((*feat)->dim());
    so.projection_state = state;
    store = storage::Store::Open(o.store_path, so);
  } else if (store.ok()) {
    const std::string diff = model::DescribeStateDifference((*store)->manifest().projection_state(), state);
    if (!diff.empty()) {
      return absl::FailedPreconditionError(
          absl::StrCat(o.store_path, " was built with another projection state (", diff,
                       "); use a new --store or the original model and sketch options"));
    }
  }
  if (!store.ok()) return store.status();
  sum.projection_state_id = (*store)->manifest().projection_state_id();
  sum.device = (*feat)->engine().device();
  sum.grad_path = (*feat)->engine().grad_path();

  // Resume: drop records already in the store.
  std::vector<const DataRecord*> todo;
  for (const auto& r : *data) {
    if ((*store)->GetRecordById(r.id).ok()) {
      ++sum.skipped_existing;
    } else {
      todo.push_back(&r);
    }
  }
  if (o.progress && sum.skipped_existing > 0) {
    std::fprintf(stderr, "resuming: %lld records already cached\n", static_cast<long long>(sum.skipped_existing));
  }

  // Records of similar length share a forward/backward pass, so padding (and the T^2 attention cost of the
  // longest record) stays small. Stable, so the order is deterministic.
  if (o.grad_batch > 1) {
    auto len = [](const DataRecord* r) {
      size_t n = r->example.instruction.size() + r->example.input.size() + r->example.output.size() +
                 r->example.text.size();
      for (const auto& m : r->example.messages) n += m.content.size();
      return n;
    };
    std::stable_sort(todo.begin(), todo.end(), [&](const DataRecord* a, const DataRecord* b) { return len(a) < len(b); });
  }
  const int threads = std::max(1, o.threads);
  const size_t bs = static_cast<size_t>(std::max(1, o.batch_size));
  const size_t gb = static_cast<size_t>(std::max(1, o.grad_batch));  // records per forward/backward pass
  const size_t batches = (todo.size() + bs - 1) / bs;
  // The workers live for the whole run and go on into the next batch while the writer stores the last one (at
  // most kAhead batches ahead of it, which bounds memory): no batch ends with a thread idle behind the slowest
  // record, and each thread's scratch buffers stay faulted in. Batches are still written in order, one at a time.
  constexpr size_t kAhead = 2;
  struct Batch {
    std::vector<storage::IngestItem> items;
    std::vector<absl::Status> status;
    std::vector<model::GradInfo> infos;
    size_t left = 0;  // records of the batch not yet computed
  };
  std::vector<Batch> work(batches);
  auto prepare = [&](size_t b) {
    const size_t n = std::min(bs, todo.size() - b * bs);
    work[b].items.resize(n);
    work[b].status.resize(n);
    work[b].infos.resize(n);
    work[b].left = n;
  };
  Mutex mu;
  CondVar cv{&mu};
  size_t next = 0;     // under mu: the next record a worker takes
  size_t written = 0;  // under mu: batches the writer is done with
  bool stop = false;   // under mu
  for (size_t b = 0; b < std::min(kAhead, batches); ++b) prepare(b);
  std::vector<model::Featurizer::Timing> timing(threads);
  auto worker = [&](int t) {
    for (;;) {
      size_t s0, s1, b;
      {
        MutexLock l(&mu);
        while (!stop && next < todo.size() && next / bs >= written + kAhead) cv.Wait();
        if (stop || next >= todo.size()) return;
        s0 = next;
        b = s0 / bs;
        s1 = std::min({todo.size(), s0 + gb, (b + 1) * bs});
        next = s1;
      }
      std::vector<model::Example> exs;
      for (size_t i = s0; i < s1; ++i) exs.push_back(todo[i]->example);
      std::vector<std::vector<float>> vecs;
      std::vector<absl::StatusOr<model::GradInfo>> res;
      (*feat)->CompressBatch(exs, &vecs, &res, &timing[t]);
      Batch& w = work[b];  // these records' slots are this thread's alone until `left` says they are done
      for (size_t i = s0; i < s1; ++i) {
        const DataRecord& r = *todo[i];
        const size_t j = i - b * bs;
        if (!res[i - s0].ok()) {
          w.status[j] = res[i - s0].status();
          continue;
        }
        w.infos[j] = *res[i - s0];
        w.items[j].vector = std::move(vecs[i - s0]);
        auto& rec = w.items[j].record;
        rec.set_id(r.id);
        rec.set_instruction(r.example.instruction);
        rec.set_input(r.example.input);
        rec.set_output(r.example.output);
        rec.set_text(r.example.text);
        for (const auto& m : r.example.messages) {
          auto* pm = rec.add_messages();
          pm->set_role(m.role);
          pm->set_content(m.content);
        }
      }
      MutexLock l(&mu);
      work[b].left -= s1 - s0;
      if (work[b].left == 0) cv.SignalAll();
    }
  };
  std::vector<std::thread> pool;
  for (int t = 0; t < threads; ++t) pool.emplace_back(worker, t);
  auto finish = [&] {  // stops the workers (after their current records) and joins them
    {
      MutexLock l(&mu);
      stop = true;
      cv.SignalAll();
    }
    for (auto& th : pool) th.join();
    pool.clear();
  };
  double loss_sum = 0;
  auto last_print = Clock::now();
  const auto t_compute = Clock::now();
  for (size_t b = 0; b < batches; ++b) {
    {
      MutexLock l(&mu);
      while (work[b].left > 0) cv.Wait();
    }
    const size_t b0 = b * bs, b1 = b0 + work[b].items.size();
    std::vector<storage::IngestItem> good;
    for (size_t i = 0; i < work[b].items.size(); ++i) {
      const absl::Status& st = work[b].status[i];
      if (!st.ok()) {
        ++sum.failed;
        std::fprintf(stderr, "skipping %s: %s\n", todo[b0 + i]->where.c_str(), std::string(st.message()).c_str());
        sum.bad_records.push_back({todo[b0 + i]->where, std::string(st.message()), todo[b0 + i]->position});
        continue;
      }
      loss_sum += work[b].infos[i].loss;
      sum.truncated += work[b].infos[i].truncated ? 1 : 0;
      good.push_back(std::move(work[b].items[i]));
    }
    const auto tw = Clock::now();
    auto res = (*store)->Ingest(good);
    sum.write_s += std::chrono::duration<double>(Clock::now() - tw).count();
    if (!res.ok()) {
      finish();
      return res.status();
    }
    sum.cached += static_cast<int64_t>(good.size());
    work[b] = Batch();
    {
      MutexLock l(&mu);
      if (b + kAhead < batches) prepare(b + kAhead);
      ++written;
      cv.SignalAll();
    }
    const auto now = Clock::now();
    if (o.progress && (now - last_print > std::chrono::seconds(1) || b1 == todo.size())) {
      const double el = std::chrono::duration<double>(now - t_compute).count();
      const double rate = b1 / el;
      std::fprintf(stderr, "cached %zu/%zu records (%.1f records/s, ETA %s)\n", b1, todo.size(), rate,
                   Eta((todo.size() - b1) / std::max(rate, 1e-9)).c_str());
      last_print = now;
    }
  }
  finish();
  for (const auto& tm : timing) {
    sum.grad_s += tm.grad / threads;  // wall-clock share
    sum.normalize_s += tm.normalize / threads;
    sum.sketch_s += tm.sketch / threads;
  }
  sum.mean_loss = sum.cached > 0 ? loss_sum / sum.cached : 0;
  sum.bad = static_cast<int64_t>(sum.bad_records.size());
  sum.store_records = static_cast<int64_t>((*store)->size());
  sum.seconds = std::chrono::duration<double>(Clock::now() - t_start).count();
  return sum;
}

}  // namespace rapidin::cache
