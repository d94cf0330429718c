#include "query/ivf_index.h"

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstring>

#include <faiss/Clustering.h>
#include <faiss/IndexFlat.h>

#include "absl/strings/str_cat.h"
#include "kernels/half.h"
#include "kernels/score.h"
#include "kernels/topk.h"
#include "query/internal/index_util.h"

namespace rapidin::query {
namespace {

constexpr char kMagic[8] = {'R', 'P', 'D', 'N', 'I', 'V', 'F', '1'};
constexpr uint32_t kVersion = 1;
constexpr int64_t kAssignBlock = 1024;  // rows per FAISS assignment call (one sgemm against the centroids)

using internal::Get;
using internal::Put;
using internal::RowDeleted;

}  // namespace

IvfIndex::IvfIndex(int64_t k, int nlist, std::vector<float> mean, std::vector<float> centroids,
                   std::string projection_id)
    : k_(k), nlist_(nlist), mean_(std::move(mean)), centroids_(std::move(centroids)),
      projection_id_(std::move(projection_id)) {
  nprobe_ = std::max(1, nlist_ / 16);
  centroids_f16_.resize(centroids_.size());
  for (size_t i = 0; i < centroids_.size(); ++i) centroids_f16_[i] = kernels::FloatToHalf(centroids_[i]);
  quantizer_ = std::make_unique<faiss::IndexFlatIP>(k_);
  quantizer_->add(nlist_, centroids_.data());
  lists_.resize(nlist_);
}

IvfIndex::~IvfIndex() = default;

std::string IvfIndex::DefaultPath(const std::string& store_path) { return store_path + "/rapidin-ivf.bin"; }

uint64_t IvfIndex::rows() const {
  ReaderMutexLock l(&mu_);
  uint64_t n = 0;
  for (const auto& list : lists_) n += list.size();
  return n;
}

uint64_t IvfIndex::sequence() const {
  ReaderMutexLock l(&mu_);
  return sequence_;
}

bool IvfIndex::stale() const {
  ReaderMutexLock l(&mu_);
  return stale_;
}

std::string IvfIndex::Describe() const { return absl::StrCat("ivf nlist=", nlist_, " nprobe=", nprobe_); }

void IvfIndex::AssignCentred(float* rows, int64_t n, int32_t* out) const {
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t c = 0; c < k_; ++c) rows[i * k_ + c] -= mean_[c];
  }
  std::vector<float> d(n);
  std::vector<faiss::Index::idx_t> ids(n);
  quantizer_->search(n, rows, 1, d.data(), ids.data());
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<int32_t>(ids[i]);
}

void IvfIndex::AssignF16(const uint16_t* rows, int64_t n, int32_t* out) const {
  std::vector<float> x(static_cast<size_t>(n) * k_);
  std::vector<int64_t> live;
  int64_t m = 0;
  for (int64_t i = 0; i < n; ++i) {
    float* dst = x.data() + m * k_;
    const uint16_t* src = rows + i * k_;
    for (int64_t c = 0; c < k_; ++c) dst[c] = kernels::HalfToFloat(src[c]);
    if (RowDeleted(dst)) {
      out[i] = -1;
    } else {
      live.push_back(i);
      ++m;
    }
  }
  std::vector<int32_t> a(m);
  if (m > 0) AssignCentred(x.data(), m, a.data());
  for (int64_t j = 0; j < m; ++j) out[live[j]] = a[j];
}

void IvfIndex::SetList(uint64_t row, int32_t list) {
  if (row >= assign_.size()) assign_.resize(row + 1, -1);
  const int32_t old = assign_[row];
  if (old == list) return;
  if (old >= 0) {
    auto& l = lists_[old];
    auto it = std::find(l.begin(), l.end(), static_cast<uint32_t>(row));
    if (it != l.end()) {
      *it = l.back();
      l.pop_back();
    }
  }
  if (list >= 0) lists_[list].push_back(static_cast<uint32_t>(row));
  assign_[row] = list;
}

absl::StatusOr<std::unique_ptr<IvfIndex>> IvfIndex::Build(const storage::Store& store, const IvfOptions& o) {
  const uint64_t n = store.size();
  const int64_t k = store.k();
  if (n > UINT32_MAX) {
    return absl::FailedPreconditionError(absl::StrCat("the IVF index holds at most 2^32 rows; the store has ", n));
  }
  const uint64_t live = store.live_records();
  if (live == 0) return absl::FailedPreconditionError("the IVF index needs a store with records; this one is empty");
  int nlist = o.nlist > 0 ? o.nlist : std::max(1, static_cast<int>(std::lround(std::sqrt(double(live)))));
  nlist = static_cast<int>(std::min<uint64_t>(nlist, live));
  int64_t m = o.max_train_points > 0
                  ? o.max_train_points
                  : std::min<int64_t>(int64_t{64} * nlist, int64_t{1 << 30} / (k * int64_t{sizeof(float)}));
  m = std::clamp<int64_t>(m, nlist, static_cast<int64_t>(live));

  int64_t taken = 0;
  auto sample = internal::SampleRows(
      store, m, o.seed, [&](uint64_t d, uint64_t t) { if (o.progress) o.progress("sample", d, t); }, &taken);
  if (!sample.ok()) return sample.status();
  std::vector<float>& x = *sample;
  // Centred: gradients share a large common direction, which would dominate every centroid and leave the
  // harmful end (the most negative inner products) scattered over all lists. q.x = q.mean + q.(x - mean), and
  // q.mean is the same for every row, so ranking by q.(x - mean) is ranking by q.x.
  std::vector<float> mean(k, 0.0f);
  {
    std::vector<double> acc(k, 0.0);
    for (int64_t i = 0; i < taken; ++i) {
      for (int64_t c = 0; c < k; ++c) acc[c] += x[i * k + c];
    }
    for (int64_t c = 0; c < k; ++c) mean[c] = static_cast<float>(acc[c] / std::max<int64_t>(taken, 1));
    for (int64_t i = 0; i < taken; ++i) {
      for (int64_t c = 0; c < k; ++c) x[i * k + c] -= mean[c];
    }
  }
  faiss::ClusteringParameters cp;
  cp.niter = o.train_iterations;
  cp.seed = static_cast<int>(o.seed & INT_MAX);
  cp.spherical = true;
  cp.verbose = false;
  cp.min_points_per_centroid = 1;  // the sample size is chosen above; no FAISS warning or resampling
  cp.max_points_per_centroid = INT_MAX;
  std::vector<float> centroids;
  try {
    if (o.progress) o.progress("train", 0, 1);
    faiss::Clustering clus(static_cast<int>(k), nlist, cp);
    faiss::IndexFlatIP assigner(k);
    clus.train(taken, x.data(), assigner);
    centroids = std::move(clus.centroids);
    if (o.progress) o.progress("train", 1, 1);
  } catch (const std::exception& e) {
    return absl::InternalError(absl::StrCat("FAISS k-means: ", e.what()));
  }
  x = {};
  std::unique_ptr<IvfIndex> index(
      new IvfIndex(k, nlist, std::move(mean), std::move(centroids), store.manifest().projection_state_id()));
  if (o.nprobe > 0) index->nprobe_ = std::min(o.nprobe, nlist);
  absl::Status st = index->Reassign(store, o);
  if (!st.ok()) return st;
  return index;
}

absl::Status IvfIndex::Reassign(const storage::Store& store, const IvfOptions& o) {
  // The sequence first: writes that land while the rows are read make the saved index look older than the store,
  // so the next Open reassigns again rather than trusting lists that may miss them.
  const uint64_t seq = store.sequence();
  const uint64_t n = store.size();
  std::vector<int32_t> assign(n, -1);
  std::vector<int32_t> tmp(kAssignBlock);
  uint64_t done = 0;
  try {
    absl::Status st = internal::ForEachRowBlock(
        store, kAssignBlock, [&](const uint16_t* rows, int64_t nb, uint64_t first, int64_t stride) {
          AssignF16(rows, nb, tmp.data());
          for (int64_t i = 0; i < nb; ++i) {
            const uint64_t g = first + static_cast<uint64_t>(i * stride);
            if (g < n) assign[g] = tmp[i];
          }
          done += nb;
          if (o.progress) o.progress("assign", done, n);
          return absl::OkStatus();
        });
    if (!st.ok()) return st;
  } catch (const std::exception& e) {
    return absl::InternalError(absl::StrCat("FAISS assignment: ", e.what()));
  }
  WriterMutexLock l(&mu_);
  assign_ = std::move(assign);
  lists_.assign(nlist_, {});
  for (uint64_t g = 0; g < assign_.size(); ++g) {
    if (assign_[g] >= 0) lists_[assign_[g]].push_back(static_cast<uint32_t>(g));
  }
  sequence_ = seq;
  stale_ = false;
  return absl::OkStatus();
}

void IvfIndex::ApplyIngest(const storage::IngestResult& result, const std::vector<storage::IngestItem>& items) {
  const size_t n = std::min(items.size(), result.rows.size());
  std::vector<float> x(n * k_);
  // Rounded to fp16 as the store holds them, so the lists equal what Reassign would make of the same rows.
  for (size_t i = 0; i < n; ++i) {
    for (int64_t c = 0; c < k_; ++c) x[i * k_ + c] = kernels::HalfToFloat(kernels::FloatToHalf(items[i].vector[c]));
  }
  std::vector<int32_t> lists(n);
  if (n > 0) AssignCentred(x.data(), static_cast<int64_t>(n), lists.data());
  WriterMutexLock l(&mu_);
  for (size_t i = 0; i < n; ++i) SetList(result.rows[i], lists[i]);  // in batch order: the last write of a row wins
  sequence_ = result.sequence;
}

void IvfIndex::ApplyDelete(const storage::DeleteResult& result) {
  WriterMutexLock l(&mu_);
  for (uint64_t g : result.rows) SetList(g, -1);
  sequence_ = result.sequence;
}

std::vector<uint64_t> IvfIndex::Candidates(const float* query, int nprobe) const {
  nprobe = std::clamp(nprobe > 0 ? nprobe : nprobe_, 1, nlist_);
  std::vector<kernels::TopK> hi{kernels::TopK(nprobe, true)}, lo{kernels::TopK(nprobe, false)};
  // Cannot fail: sizes are valid and kAuto never asks for what the CPU lacks.
  (void)kernels::ScanTopK(centroids_f16_.data(), nlist_, k_, query, 1, 0, 1, &hi, &lo);
  std::vector<int64_t> probe;
  for (const auto& c : hi[0].Sorted()) probe.push_back(c.index);
  for (const auto& c : lo[0].Sorted()) probe.push_back(c.index);
  std::sort(probe.begin(), probe.end());
  probe.erase(std::unique(probe.begin(), probe.end()), probe.end());
  std::vector<uint64_t> rows;
  {
    ReaderMutexLock l(&mu_);
    size_t total = 0;
    for (int64_t p : probe) total += lists_[p].size();
    rows.reserve(total);
    for (int64_t p : probe) rows.insert(rows.end(), lists_[p].begin(), lists_[p].end());
  }
  std::sort(rows.begin(), rows.end());  // lists are disjoint: no duplicates
  return rows;
}

absl::Status IvfIndex::Save(const std::string& path) const {
  std::string out;
  Put(&out, kVersion);
  Put(&out, static_cast<uint32_t>(nlist_));
  Put(&out, static_cast<uint32_t>(nprobe_));
  Put(&out, uint32_t{0});
  Put(&out, static_cast<uint64_t>(k_));
  ReaderMutexLock l(&mu_);
  Put(&out, sequence_);
  Put(&out, static_cast<uint64_t>(assign_.size()));
  Put(&out, static_cast<uint64_t>(projection_id_.size()));
  out.append(projection_id_);
  out.append(reinterpret_cast<const char*>(mean_.data()), mean_.size() * sizeof(float));
  out.append(reinterpret_cast<const char*>(centroids_.data()), centroids_.size() * sizeof(float));
  out.append(reinterpret_cast<const char*>(assign_.data()), assign_.size() * sizeof(int32_t));
  return internal::WriteIndexFile(path, kMagic, out);
}

absl::StatusOr<std::unique_ptr<IvfIndex>> IvfIndex::Load(const std::string& path, const storage::Store& store) {
  auto file = internal::ReadIndexFile(path, kMagic, "IVF index");
  if (!file.ok()) return file.status();
  const std::string& body = *file;
  auto damaged = [&](const std::string& what) {
    return absl::DataLossError(absl::StrCat("IVF index ", path, " is damaged: ", what));
  };
  size_t pos = 0;
  uint32_t version = 0, nlist = 0, nprobe = 0, pad = 0;
  uint64_t k = 0, seq = 0, rows = 0, id_len = 0;
  if (!Get(body, &pos, &version) || !Get(body, &pos, &nlist) || !Get(body, &pos, &nprobe) || !Get(body, &pos, &pad) ||
      !Get(body, &pos, &k) || !Get(body, &pos, &seq) || !Get(body, &pos, &rows) || !Get(body, &pos, &id_len)) {
    return damaged("header truncated");
  }
  if (version != kVersion) return damaged(absl::StrCat("format version ", version, ", this build reads ", kVersion));
  if (k != store.k()) {
    return absl::FailedPreconditionError(
        absl::StrCat("IVF index ", path, " was built for K=", k, ", the store has K=", store.k()));
  }
  if (nlist == 0 || rows > UINT32_MAX || id_len > 4096) return damaged("implausible header");
  const uint64_t need = id_len + (uint64_t{nlist} + 1) * k * sizeof(float) + rows * sizeof(int32_t);
  if (body.size() - pos != need) {
    return damaged(absl::StrCat(body.size() - pos, " bytes after the header, expected ", need));
  }
  std::string pid = body.substr(pos, id_len);
  pos += id_len;
  if (pid != store.manifest().projection_state_id()) {
    return absl::FailedPreconditionError(absl::StrCat("IVF index ", path, " was built for projection state ", pid,
                                                      ", the store has ",
                                                      store.manifest().projection_state_id()));
  }
  std::vector<float> mean(k), centroids(uint64_t{nlist} * k);
  std::memcpy(mean.data(), body.data() + pos, mean.size() * sizeof(float));
  pos += mean.size() * sizeof(float);
  std::memcpy(centroids.data(), body.data() + pos, centroids.size() * sizeof(float));
  pos += centroids.size() * sizeof(float);
  for (float c : centroids) {
    if (!std::isfinite(c)) return damaged("a centroid value is not finite");
  }
  for (float c : mean) {
    if (!std::isfinite(c)) return damaged("a mean value is not finite");
  }
  std::vector<int32_t> assign(rows);
  std::memcpy(assign.data(), body.data() + pos, rows * sizeof(int32_t));
  for (int32_t a : assign) {
    if (a < -1 || a >= static_cast<int32_t>(nlist)) return damaged(absl::StrCat("a row's list ", a, " is out of range"));
  }
  std::unique_ptr<IvfIndex> index(new IvfIndex(static_cast<int64_t>(k), static_cast<int>(nlist), std::move(mean),
                                               std::move(centroids), std::move(pid)));
  index->nprobe_ = std::clamp<int>(static_cast<int>(nprobe), 1, static_cast<int>(nlist));
  WriterMutexLock l(&index->mu_);
  index->assign_ = std::move(assign);
  for (uint64_t g = 0; g < index->assign_.size(); ++g) {
    if (index->assign_[g] >= 0) index->lists_[index->assign_[g]].push_back(static_cast<uint32_t>(g));
  }
  index->sequence_ = seq;
  index->stale_ = seq != store.sequence() || rows != store.size();
  return index;
}

absl::StatusOr<std::unique_ptr<IvfIndex>> IvfIndex::Open(const storage::Store& store, const IvfOptions& o,
                                                         bool rebuild, std::string* how) {
  auto index = internal::OpenIndexFile<IvfIndex>(
      store, o, rebuild, DefaultPath(store.path()),
      [&](const IvfIndex& loaded) {
        return o.nlist <= 0 || o.nlist == loaded.nlist()
                   ? std::string()
                   : absl::StrCat("the saved index has nlist=", loaded.nlist(), ", ", o.nlist, " asked for");
      },
      [&](IvfIndex& loaded) { return loaded.Reassign(store, o); }, "reassigned", how);
  if (index.ok() && o.nprobe > 0) (*index)->nprobe_ = std::min(o.nprobe, (*index)->nlist_);
  return index;
}

namespace {

// Worker w scores exactly the candidate rows that live in shard w (global row g is in shard g % S).
class IvfBackend : public ScanBackend {
 public:
  IvfBackend(const storage::Store* store, const IvfIndex* index, int nprobe, kernels::ScoreImpl impl)
      : store_(store), index_(index), nprobe_(nprobe > 0 ? nprobe : index->default_nprobe()), impl_(impl) {}

  int num_workers() const override { return store_->num_shards(); }
  std::string Describe() const override {
    return absl::StrCat("ivf nlist=", index_->nlist(), " nprobe=", nprobe_, " + ", kernels::ImplName(impl_));
  }
  bool is_gpu() const override { return false; }

  absl::Status SetQueries(const ScanBatch& b) override {
    const int S = num_workers();
    cand_.assign(S, std::vector<std::vector<uint64_t>>(b.q));
    for (int j = 0; j < b.q; ++j) {
      for (uint64_t g : index_->Candidates(b.queries + static_cast<int64_t>(j) * store_->k(), nprobe_)) {
        cand_[g % S][j].push_back(g);
      }
    }
    return absl::OkStatus();
  }

  absl::Status Scan(int w, const ScanBatch& b, WorkerScan* o) override {
    o->timing.backend = Describe();
    return store_->WithShard(w, [&](const storage::ShardView& v) {
      for (int j = 0; j < b.q; ++j) {
        std::vector<kernels::TopK> hp{kernels::TopK(b.top_k[j], true)}, hm{kernels::TopK(b.harmful_k[j], false)};
        const float* q = b.queries + static_cast<int64_t>(j) * v.k;
        for (uint64_t g : cand_[w][j]) {
          const int64_t r = (static_cast<int64_t>(g) - v.first_index) / v.index_stride;
          if (r < 0 || r >= v.n) continue;  // not resident: the engine's cold scan reads every cold row
          absl::Status st = kernels::ScanTopK(v.rows + r * v.k, 1, v.k, q, 1, static_cast<int64_t>(g), 1, &hp, &hm,
                                              impl_);
          if (!st.ok()) return st;
          ++o->timing.rows;
        }
        o->helpful[j].push_back(hp[0].Sorted());
        o->harmful[j].push_back(hm[0].Sorted());
      }
      o->timing.bytes_scanned = static_cast<uint64_t>(o->timing.rows) * v.k * sizeof(uint16_t);
      return absl::OkStatus();
    });
  }

 private:
  const storage::Store* store_;
  const IvfIndex* index_;
  const int nprobe_;
  const kernels::ScoreImpl impl_;
  std::vector<std::vector<std::vector<uint64_t>>> cand_;  // [worker][query vector] -> global rows, increasing
};

}  // namespace

std::unique_ptr<ScanBackend> MakeIvfBackend(const storage::Store* store, const IvfIndex* index, int nprobe,
                                            kernels::ScoreImpl impl) {
  return std::make_unique<IvfBackend>(store, index, nprobe, kernels::ResolveImpl(impl));
}

}  // namespace rapidin::query
