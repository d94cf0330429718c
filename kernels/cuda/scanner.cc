#include "kernels/cuda/scanner.h"

#include <cuda_runtime_api.h>

#include <algorithm>
#include <atomic>
#include <mutex>

#if RAPIDIN_HAVE_NCCL
#include <nccl.h>
#endif

#include "kernels/cuda/internal/check.h"
#include "kernels/placement.h"

namespace rapidin::gpu {
namespace {

#if RAPIDIN_HAVE_NCCL
Status FromNccl(ncclResult_t r, const char* what) {
  if (r == ncclSuccess) return Status::Ok();
  return Status(Code::kInternal, std::string(what) + ": " + ncclGetErrorString(r));
}
#define RAPIDIN_NCCL_RETURN_IF_ERROR(expr, what)                                  \
  do {                                                                            \
    const ncclResult_t rapidin_r_ = (expr);                                       \
    if (rapidin_r_ != ncclSuccess) return FromNccl(rapidin_r_, (what));           \
  } while (0)
#endif

// Grow-only device or pinned-host buffer.
struct Buffer {
  void* p = nullptr;
  size_t bytes = 0;
  bool host = false;
  void Free() {
    if (p != nullptr) host ? cudaFreeHost(p) : cudaFree(p);
    p = nullptr;
    bytes = 0;
  }
  Status Ensure(size_t need, const char* what) {
    if (need <= bytes) return Status::Ok();
    Free();
    need = std::max<size_t>(need, 256);
    RAPIDIN_CUDA_RETURN_IF_ERROR(host ? cudaMallocHost(&p, need) : cudaMalloc(&p, need), what);
    bytes = need;
    return Status::Ok();
  }
  template <typename T>
  T* as() const {
    return static_cast<T*>(p);
  }
};

}  // namespace

struct Scanner::Impl {
  struct Device {
    DeviceInfo info;
    std::mutex mu;
    cudaStream_t compute = nullptr, copy = nullptr;
    cudaEvent_t copied[2] = {nullptr, nullptr}, consumed[2] = {nullptr, nullptr};
    Buffer queries, scores, scratch, stage[2];
    Buffer res[4];        // helpful keys, helpful rows, harmful keys, harmful rows
    Buffer host_res[4];   // pinned copies of res
    uint64_t hot_budget = 0, hot_used = 0;
#if RAPIDIN_HAVE_NCCL
    ncclComm_t comm = nullptr;
#endif
  };
  struct Shard {
    int device = 0;
    std::atomic<bool> hot{false};
    uint16_t* d_rows = nullptr;
    int64_t cap_rows = 0;
    int64_t n = 0;
    uint64_t generation = 0;
    bool synced = false;
    std::atomic<uint64_t> bytes{0};  // store bytes of this shard in its tier, for Usage()
  };

  int64_t k = 0;
  kernels::GpuOptions opt;
  std::vector<std::unique_ptr<Device>> devices;
  std::vector<std::unique_ptr<Shard>> shards;
  int q = 0;
  bool nccl = false;

  Status SyncLocked(Device& dev, Shard& sh, const kernels::ShardRows& rows);
  void FreeShard(Device& dev, Shard& sh) {
    if (sh.d_rows != nullptr) {
      cudaFree(sh.d_rows);
      dev.hot_used -= static_cast<uint64_t>(sh.cap_rows) * k * 2;
    }
    sh.d_rows = nullptr;
    sh.cap_rows = 0;
  }
};

Status ListDevices(std::vector<DeviceInfo>* out) {
  out->clear();
  int count = 0;
  RAPIDIN_CUDA_RETURN_IF_ERROR(cudaGetDeviceCount(&count), "cudaGetDeviceCount");
  if (count == 0) return Status(Code::kUnavailable, "no CUDA device is visible");
  for (int i = 0; i < count; ++i) {
    cudaDeviceProp prop;
    RAPIDIN_CUDA_RETURN_IF_ERROR(cudaGetDeviceProperties(&prop, i), "cudaGetDeviceProperties");
    RAPIDIN_CUDA_RETURN_IF_ERROR(cudaSetDevice(i), "cudaSetDevice");
    size_t free_b = 0, total_b = 0;
    RAPIDIN_CUDA_RETURN_IF_ERROR(cudaMemGetInfo(&free_b, &total_b), "cudaMemGetInfo");
    DeviceInfo d;
    d.ordinal = i;
    d.name = prop.name;
    d.free_bytes = free_b;
    d.total_bytes = total_b;
    d.sm_count = prop.multiProcessorCount;
    out->push_back(d);
  }
  return Status::Ok();
}

void* PinnedAlloc(size_t bytes) {
  void* p = nullptr;
  if (cudaHostAlloc(&p, bytes == 0 ? 64 : bytes, cudaHostAllocPortable) != cudaSuccess) {
    cudaGetLastError();
    return nullptr;
  }
  return p;
}

void PinnedFree(void* p) {
  if (p != nullptr) cudaFreeHost(p);
}

bool HaveNccl() { return RAPIDIN_HAVE_NCCL != 0; }

Scanner::Scanner(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

Scanner::~Scanner() {
  for (auto& d : impl_->devices) {
    if (cudaSetDevice(d->info.ordinal) != cudaSuccess) continue;
    if (d->compute != nullptr) cudaStreamSynchronize(d->compute);
    if (d->copy != nullptr) cudaStreamSynchronize(d->copy);
    for (auto& s : impl_->shards) {
      if (impl_->devices[s->device].get() == d.get()) impl_->FreeShard(*d, *s);
    }
    for (Buffer* b : {&d->queries, &d->scores, &d->scratch, &d->stage[0], &d->stage[1]}) b->Free();
    for (auto& b : d->res) b.Free();
    for (auto& b : d->host_res) b.Free();
    for (int i = 0; i < 2; ++i) {
      if (d->copied[i] != nullptr) cudaEventDestroy(d->copied[i]);
      if (d->consumed[i] != nullptr) cudaEventDestroy(d->consumed[i]);
    }
    if (d->compute != nullptr) cudaStreamDestroy(d->compute);
    if (d->copy != nullptr) cudaStreamDestroy(d->copy);
#if RAPIDIN_HAVE_NCCL
    if (d->comm != nullptr) ncclCommDestroy(d->comm);
#endif
  }
}

Status Scanner::Create(int64_t k, const kernels::GpuOptions& options, std::unique_ptr<Scanner>* out) {
  if (k < 1) return Status(Code::kInvalidArgument, "Scanner: k must be >= 1");
  if (options.chunk_bytes < static_cast<uint64_t>(k) * 2 || options.max_chunk_scores < 1 ||
      !(options.memory_fraction > 0 && options.memory_fraction <= 1)) {
    return Status(Code::kInvalidArgument, "Scanner: chunk_bytes below one row, or bad max_chunk_scores / "
                                          "memory_fraction");
  }
  std::vector<DeviceInfo> all;
  Status st = ListDevices(&all);
  if (!st.ok()) return st;
  auto impl = std::make_unique<Impl>();
  impl->k = k;
  impl->opt = options;
  std::vector<int> ordinals = options.devices;
  if (ordinals.empty()) {
    for (const auto& d : all) ordinals.push_back(d.ordinal);
  }
  for (int o : ordinals) {
    if (o < 0 || o >= static_cast<int>(all.size())) {
      return Status(Code::kInvalidArgument, "Scanner: no CUDA device " + std::to_string(o) + " (" +
                                                std::to_string(all.size()) + " visible)");
    }
    auto d = std::make_unique<Impl::Device>();
    d->info = all[o];
    RAPIDIN_CUDA_RETURN_IF_ERROR(cudaSetDevice(o), "cudaSetDevice");
    RAPIDIN_CUDA_RETURN_IF_ERROR(cudaStreamCreateWithFlags(&d->compute, cudaStreamNonBlocking), "stream");
    RAPIDIN_CUDA_RETURN_IF_ERROR(cudaStreamCreateWithFlags(&d->copy, cudaStreamNonBlocking), "stream");
    for (int i = 0; i < 2; ++i) {
      RAPIDIN_CUDA_RETURN_IF_ERROR(cudaEventCreateWithFlags(&d->copied[i], cudaEventDisableTiming), "event");
      RAPIDIN_CUDA_RETURN_IF_ERROR(cudaEventCreateWithFlags(&d->consumed[i], cudaEventDisableTiming), "event");
    }
    for (auto& b : d->host_res) b.host = true;
    // Hot-tier budget: a share of free memory, less what the scan buffers need.
    const uint64_t scan_bytes = 2 * options.chunk_bytes + static_cast<uint64_t>(options.max_chunk_scores) * 24 +
                                (uint64_t{64} << 20);
    const double share = options.memory_fraction * static_cast<double>(d->info.free_bytes);
    d->hot_budget = share > scan_bytes ? static_cast<uint64_t>(share) - scan_bytes : 0;
    d->hot_budget = std::min(d->hot_budget, options.hot_limit_bytes);
    impl->devices.push_back(std::move(d));
  }
  if (impl->devices.size() > 1 || options.force_nccl) {
#if RAPIDIN_HAVE_NCCL
    std::vector<ncclComm_t> comms(impl->devices.size());
    RAPIDIN_NCCL_RETURN_IF_ERROR(ncclCommInitAll(comms.data(), static_cast<int>(comms.size()), ordinals.data()),
                                 "ncclCommInitAll");
    for (size_t i = 0; i < comms.size(); ++i) impl->devices[i]->comm = comms[i];
    impl->nccl = true;
#endif
  }
  out->reset(new Scanner(std::move(impl)));
  return Status::Ok();
}

Status Scanner::Place(const std::vector<uint64_t>& shard_bytes) {
  Impl& m = *impl_;
  for (auto& s : m.shards) m.FreeShard(*m.devices[s->device], *s);
  m.shards.clear();
  std::vector<uint64_t> left;
  for (auto& d : m.devices) left.push_back(d->hot_budget - d->hot_used);
  const std::vector<kernels::ShardPlace> places = kernels::PlaceShards(shard_bytes, left);
  m.shards.resize(shard_bytes.size());
  for (size_t s = 0; s < places.size(); ++s) {
    auto sh = std::make_unique<Impl::Shard>();
    sh->device = places[s].device;
    sh->hot = places[s].hot;
    m.shards[s] = std::move(sh);
  }
  return Status::Ok();
}

Status Scanner::Impl::SyncLocked(Device& dev, Shard& sh, const kernels::ShardRows& rows) {
  if (rows.k != k) {
    return Status(Code::kInvalidArgument, "Scanner: shard rows have k=" + std::to_string(rows.k) +
                                              ", the scanner was made for k=" + std::to_string(k));
  }
  const uint64_t row_bytes = static_cast<uint64_t>(k) * 2;
  if (!sh.hot) {
    sh.bytes = static_cast<uint64_t>(rows.n) * row_bytes;
    return Status::Ok();
  }
  if (sh.synced && sh.generation == rows.generation) return Status::Ok();
  bool full = !sh.synced || rows.rewrite_generation > sh.generation || rows.n < sh.n;
  if (rows.n > sh.cap_rows) {
    const int64_t cap = std::max<int64_t>(rows.n + rows.n / 4, 256);
    const uint64_t grow = static_cast<uint64_t>(cap) * row_bytes;
    const uint64_t old = static_cast<uint64_t>(sh.cap_rows) * row_bytes;
    void* p = nullptr;
    if (dev.hot_used - old + grow > dev.hot_budget || cudaMalloc(&p, grow) != cudaSuccess) {
      cudaGetLastError();  // an allocation failure is not sticky; clear it and stream this shard instead
      FreeShard(dev, sh);
      sh.hot = false;
      sh.synced = false;
      sh.bytes = static_cast<uint64_t>(rows.n) * row_bytes;
      return Status::Ok();
    }
    FreeShard(dev, sh);
    sh.d_rows = static_cast<uint16_t*>(p);
    sh.cap_rows = cap;
    dev.hot_used += grow;
    full = true;
  }
  const int64_t from = full ? 0 : sh.n;
  if (rows.n > from) {
    RAPIDIN_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(sh.d_rows + from * k, rows.rows + from * k,
                                                 static_cast<size_t>(rows.n - from) * row_bytes,
                                                 cudaMemcpyHostToDevice, dev.copy),
                                 "upload of a hot shard");
    RAPIDIN_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(dev.copy), "upload of a hot shard");
  }
  sh.n = rows.n;
  sh.generation = rows.generation;
  sh.synced = true;
  sh.bytes = static_cast<uint64_t>(rows.n) * row_bytes;
  return Status::Ok();
}

Status Scanner::Sync(int shard, const kernels::ShardRows& rows) {
  if (shard < 0 || shard >= static_cast<int>(impl_->shards.size())) {
    return Status(Code::kInvalidArgument, "Scanner::Sync: shard " + std::to_string(shard) + " was not placed");
  }
  Impl::Shard& sh = *impl_->shards[shard];
  Impl::Device& dev = *impl_->devices[sh.device];
  std::lock_guard<std::mutex> l(dev.mu);
  RAPIDIN_CUDA_RETURN_IF_ERROR(cudaSetDevice(dev.info.ordinal), "cudaSetDevice");
  return impl_->SyncLocked(dev, sh, rows);
}

Status Scanner::SetQueries(const float* queries, int q) {
  Impl& m = *impl_;
  if (q < 1 || queries == nullptr) return Status(Code::kInvalidArgument, "SetQueries: need q >= 1 vectors");
  const size_t bytes = static_cast<size_t>(q) * m.k * sizeof(float);
  std::vector<std::unique_lock<std::mutex>> locks;
  for (auto& d : m.devices) locks.emplace_back(d->mu);
  for (auto& d : m.devices) {
    RAPIDIN_CUDA_RETURN_IF_ERROR(cudaSetDevice(d->info.ordinal), "cudaSetDevice");
    Status st = d->queries.Ensure(bytes, "query buffer");
    if (!st.ok()) return st;
  }
  if (m.nccl) {
#if RAPIDIN_HAVE_NCCL
    Impl::Device& root = *m.devices[0];
    RAPIDIN_CUDA_RETURN_IF_ERROR(cudaSetDevice(root.info.ordinal), "cudaSetDevice");
    RAPIDIN_CUDA_RETURN_IF_ERROR(
        cudaMemcpyAsync(root.queries.p, queries, bytes, cudaMemcpyHostToDevice, root.compute), "query upload");
    RAPIDIN_NCCL_RETURN_IF_ERROR(ncclGroupStart(), "ncclGroupStart");
    for (auto& d : m.devices) {
      RAPIDIN_NCCL_RETURN_IF_ERROR(ncclBroadcast(root.queries.p, d->queries.p, static_cast<size_t>(q) * m.k,
                                                 ncclFloat, 0, d->comm, d->compute),
                                   "ncclBroadcast of the query vectors");
    }
    RAPIDIN_NCCL_RETURN_IF_ERROR(ncclGroupEnd(), "ncclGroupEnd");
#endif
  } else {
    for (auto& d : m.devices) {
      RAPIDIN_CUDA_RETURN_IF_ERROR(cudaSetDevice(d->info.ordinal), "cudaSetDevice");
      RAPIDIN_CUDA_RETURN_IF_ERROR(
          cudaMemcpyAsync(d->queries.p, queries, bytes, cudaMemcpyHostToDevice, d->compute), "query upload");
    }
  }
  // The caller's buffer may go away when we return.
  for (auto& d : m.devices) {
    RAPIDIN_CUDA_RETURN_IF_ERROR(cudaSetDevice(d->info.ordinal), "cudaSetDevice");
    RAPIDIN_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(d->compute), "query broadcast");
  }
  m.q = q;
  return Status::Ok();
}

Status Scanner::ScanShard(int shard, const kernels::ShardRows& rows, int top_k, int harmful_k,
                          std::vector<std::vector<kernels::Candidate>>* helpful,
                          std::vector<std::vector<kernels::Candidate>>* harmful) {
  Impl& m = *impl_;
  if (shard < 0 || shard >= static_cast<int>(m.shards.size())) {
    return Status(Code::kInvalidArgument, "ScanShard: shard " + std::to_string(shard) + " was not placed");
  }
  if (m.q < 1) return Status(Code::kInvalidArgument, "ScanShard: SetQueries was not called");
  if (top_k < 0 || harmful_k < 0) return Status(Code::kInvalidArgument, "ScanShard: negative k");
  Impl::Shard& sh = *m.shards[shard];
  Impl::Device& dev = *m.devices[sh.device];
  std::lock_guard<std::mutex> l(dev.mu);
  RAPIDIN_CUDA_RETURN_IF_ERROR(cudaSetDevice(dev.info.ordinal), "cudaSetDevice");
  Status st = m.SyncLocked(dev, sh, rows);
  if (!st.ok()) return st;
  const int q = m.q;
  const int64_t k = m.k;
  helpful->assign(q, {});
  harmful->assign(q, {});
  if (rows.n == 0 || (top_k == 0 && harmful_k == 0)) return Status::Ok();

  int64_t chunk = std::max<int64_t>(1, m.opt.max_chunk_scores / q);
  if (!sh.hot) chunk = std::min<int64_t>(chunk, static_cast<int64_t>(m.opt.chunk_bytes / (k * 2)));
  chunk = std::min(chunk, rows.n);
  const int64_t nchunks = (rows.n + chunk - 1) / chunk;
  size_t scratch_bytes = 0;
  // Scratch depends on k: size it for the larger side.
  RAPIDIN_CUDA_RETURN_IF_ERROR(LaunchTopK(nullptr, &scratch_bytes, nullptr, chunk, q, std::max(top_k, harmful_k),
                                          true, nullptr, nullptr, dev.compute),
                               "top-k sizing");
  const int ks[2] = {top_k, harmful_k};
  if (!(st = dev.scores.Ensure(static_cast<size_t>(chunk) * q * sizeof(float), "score buffer")).ok()) return st;
  if (!(st = dev.scratch.Ensure(scratch_bytes, "top-k scratch")).ok()) return st;
  for (int side = 0; side < 2; ++side) {
    const size_t bytes = static_cast<size_t>(nchunks) * q * ks[side] * sizeof(uint32_t);
    for (int a = 0; a < 2; ++a) {
      if (!(st = dev.res[2 * side + a].Ensure(bytes, "result buffer")).ok()) return st;
      if (!(st = dev.host_res[2 * side + a].Ensure(bytes, "pinned result buffer")).ok()) return st;
    }
  }
  if (!sh.hot) {
    for (auto& b : dev.stage) {
      if (!(st = b.Ensure(static_cast<size_t>(chunk) * k * 2, "staging buffer")).ok()) return st;
    }
  }
  for (int64_t c = 0; c < nchunks; ++c) {
    const int64_t r0 = c * chunk;
    const int64_t rc = std::min(chunk, rows.n - r0);
    const uint16_t* src;
    const int b = static_cast<int>(c % 2);
    if (sh.hot) {
      src = sh.d_rows + r0 * k;
    } else {
      // Double buffering: the copy of this chunk waits only for the scan of the chunk that used the buffer
      // two steps ago, so it overlaps the scan of the previous chunk.
      if (c >= 2) RAPIDIN_CUDA_RETURN_IF_ERROR(cudaStreamWaitEvent(dev.copy, dev.consumed[b], 0), "wait");
      RAPIDIN_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(dev.stage[b].p, rows.rows + r0 * k,
                                                   static_cast<size_t>(rc) * k * 2, cudaMemcpyHostToDevice,
                                                   dev.copy),
                                   "streaming a warm chunk");
      RAPIDIN_CUDA_RETURN_IF_ERROR(cudaEventRecord(dev.copied[b], dev.copy), "event");
      RAPIDIN_CUDA_RETURN_IF_ERROR(cudaStreamWaitEvent(dev.compute, dev.copied[b], 0), "wait");
      src = dev.stage[b].as<uint16_t>();
    }
    const StoreType type = m.opt.bf16_rows ? StoreType::kBF16 : StoreType::kF16;
    RAPIDIN_CUDA_RETURN_IF_ERROR(
        LaunchScore(type, src, rc, k, dev.queries.as<float>(), q, dev.scores.as<float>(), dev.compute), "LaunchScore");
    for (int side = 0; side < 2; ++side) {
      if (ks[side] == 0) continue;
      const size_t off = static_cast<size_t>(c) * q * ks[side];
      RAPIDIN_CUDA_RETURN_IF_ERROR(
          LaunchTopK(dev.scratch.p, &scratch_bytes, dev.scores.as<float>(), rc, q, ks[side], side == 0,
                     dev.res[2 * side].as<uint32_t>() + off, dev.res[2 * side + 1].as<uint32_t>() + off,
                     dev.compute),
          "LaunchTopK");
    }
    if (!sh.hot) RAPIDIN_CUDA_RETURN_IF_ERROR(cudaEventRecord(dev.consumed[b], dev.compute), "event");
  }
  for (int side = 0; side < 2; ++side) {
    const size_t bytes = static_cast<size_t>(nchunks) * q * ks[side] * sizeof(uint32_t);
    for (int a = 0; a < 2 && bytes > 0; ++a) {
      RAPIDIN_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(dev.host_res[2 * side + a].p, dev.res[2 * side + a].p, bytes,
                                                   cudaMemcpyDeviceToHost, dev.compute),
                                   "result download");
    }
  }
  RAPIDIN_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(dev.compute), "shard scan");
  // Merge the chunks' lists with the CPU merge code.
  for (int side = 0; side < 2; ++side) {
    const int kk = ks[side];
    if (kk == 0) continue;
    const uint32_t* keys = dev.host_res[2 * side].as<uint32_t>();
    const uint32_t* rws = dev.host_res[2 * side + 1].as<uint32_t>();
    auto* outs = side == 0 ? helpful : harmful;
    for (int j = 0; j < q; ++j) {
      std::vector<std::vector<kernels::Candidate>> parts(nchunks);
      for (int64_t c = 0; c < nchunks; ++c) {
        const int64_t r0 = c * chunk;
        const size_t base = (static_cast<size_t>(c) * q + j) * kk;
        for (int t = 0; t < kk; ++t) {
          const uint32_t key = keys[base + t];
          if (KeyIsNaN(key)) break;
          const int64_t local = r0 + rws[base + t];
          parts[c].push_back({KeyToScore(key), rows.first_index + local * rows.index_stride});
        }
      }
      (*outs)[j] = kernels::MergeTopK(parts, kk, side == 0);
    }
  }
  return Status::Ok();
}

int Scanner::num_devices() const { return static_cast<int>(impl_->devices.size()); }
const DeviceInfo& Scanner::device(int i) const { return impl_->devices[i]->info; }
int Scanner::shard_device(int shard) const { return impl_->shards[shard]->device; }
bool Scanner::shard_hot(int shard) const { return impl_->shards[shard]->hot.load(); }
bool Scanner::uses_nccl() const { return impl_->nccl; }

kernels::TierBytes Scanner::Usage() const {
  kernels::TierBytes t;
  for (int s = 0; s < static_cast<int>(impl_->shards.size()); ++s) {
    (shard_hot(s) ? t.hot : t.warm) += impl_->shards[s]->bytes.load();
  }
  return t;
}

std::string Scanner::Describe() const {
  std::string s = "cuda x" + std::to_string(impl_->devices.size()) + " [";
  for (size_t i = 0; i < impl_->devices.size(); ++i) {
    if (i > 0) s += ", ";
    s += std::to_string(impl_->devices[i]->info.ordinal) + ": " + impl_->devices[i]->info.name;
  }
  s += "]";
  if (impl_->nccl) s += " nccl";
  return s;
}

}  // namespace rapidin::gpu
