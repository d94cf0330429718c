#include "query/internal/index_util.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <fstream>
#include <numeric>
#include <random>

#include "absl/strings/str_cat.h"
#include "kernels/hash.h"

namespace rapidin::query::internal {
namespace {

absl::Status Errno(const std::string& what) { return absl::InternalError(absl::StrCat(what, ": ", strerror(errno))); }

}  // namespace

absl::Status WriteIndexFile(const std::string& path, const char (&magic)[8], const std::string& body) {
  std::string out(magic, sizeof(magic));
  out += body;
  Put(&out, kernels::Fnv1a(kernels::kFnv1aOffset, out.data(), out.size()));
  const std::string tmp = path + ".tmp";
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) return Errno(absl::StrCat("writing ", tmp));
  auto fail = [&](const std::string& what) {
    absl::Status st = Errno(what);
    ::close(fd);
    ::unlink(tmp.c_str());
    return st;
  };
  for (size_t off = 0; off < out.size();) {
    const ssize_t w = ::write(fd, out.data() + off, out.size() - off);
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) return fail(absl::StrCat("writing ", tmp));
    off += static_cast<size_t>(w);
  }
  if (::fsync(fd) != 0) return fail(absl::StrCat("fsync ", tmp));
  ::close(fd);
  if (::rename(tmp.c_str(), path.c_str()) != 0) {
    absl::Status st = Errno(absl::StrCat("renaming ", tmp, " to ", path));
    ::unlink(tmp.c_str());
    return st;
  }
  const size_t slash = path.find_last_of('/');
  const std::string dir = slash == std::string::npos ? "." : (slash == 0 ? "/" : path.substr(0, slash));
  if (const int dfd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC); dfd >= 0) {
    ::fsync(dfd);  // the rename itself survives a crash
    ::close(dfd);
  }
  return absl::OkStatus();
}

absl::StatusOr<std::string> ReadIndexFile(const std::string& path, const char (&magic)[8], const std::string& what) {
  std::ifstream f(path, std::ios::binary | std::ios::ate);
  if (!f) return absl::NotFoundError(absl::StrCat("no ", what, " at ", path));
  // Read once into the string that is returned (a PCA index at 1M rows is 256 MB: no stream buffer, no copies).
  std::string in(static_cast<size_t>(f.tellg()), '\0');
  f.seekg(0);
  if (!f.read(in.data(), static_cast<std::streamsize>(in.size()))) {
    return absl::DataLossError(absl::StrCat(what, " ", path, " could not be read whole"));
  }
  auto damaged = [&](const std::string& why) {
    return absl::DataLossError(absl::StrCat(what, " ", path, " is damaged: ", why));
  };
  if (in.size() < sizeof(magic) + sizeof(uint64_t) || std::memcmp(in.data(), magic, sizeof(magic)) != 0) {
    return damaged(absl::StrCat("not a ", what, " file (bad magic)"));
  }
  uint64_t sum = 0;
  std::memcpy(&sum, in.data() + in.size() - sizeof(sum), sizeof(sum));
  if (sum != kernels::Fnv1a(kernels::kFnv1aOffset, in.data(), in.size() - sizeof(sum))) {
    return damaged("checksum mismatch (truncated or overwritten)");
  }
  in.resize(in.size() - sizeof(sum));
  in.erase(0, sizeof(magic));
  return in;
}

absl::StatusOr<std::vector<float>> SampleRows(const storage::Store& store, int64_t m, uint64_t seed,
                                              const std::function<void(uint64_t, uint64_t)>& progress,
                                              int64_t* taken) {
  const uint64_t n = store.size();
  const int64_t k = store.k();
  std::vector<uint64_t> order(n);
  std::iota(order.begin(), order.end(), 0);
  std::mt19937_64 rng(seed);
  std::shuffle(order.begin(), order.end(), rng);
  // Enough of the shuffled rows to find m live ones (deleted rows are skipped), then read in row order.
  std::vector<uint64_t> pick;
  int64_t got = 0;
  std::vector<float> x;
  x.reserve(static_cast<size_t>(std::max<int64_t>(m, 0)) * k);
  for (size_t start = 0; start < n && got < m;) {
    const size_t end = std::min<size_t>(n, start + static_cast<size_t>(m - got) + 16);
    pick.assign(order.begin() + start, order.begin() + end);
    std::sort(pick.begin(), pick.end());
    start = end;
    for (uint64_t g : pick) {
      if (got >= m) break;
      auto v = store.GetVector(g);
      if (!v.ok()) return v.status();
      if (RowDeleted(v->data())) continue;
      x.insert(x.end(), v->begin(), v->end());
      ++got;
      if (progress && (got % 4096 == 0 || got == m)) progress(got, m);
    }
  }
  *taken = got;
  return x;
}

absl::Status ForEachRowBlock(
    const storage::Store& store, int64_t block,
    const std::function<absl::Status(const uint16_t* rows, int64_t n, uint64_t first, int64_t stride)>& fn) {
  for (int s = 0; s < store.num_shards(); ++s) {
    absl::Status st = store.WithShard(s, [&](const storage::ShardView& v) {
      for (int64_t r0 = 0; r0 < v.n; r0 += block) {
        const int64_t nb = std::min(block, v.n - r0);
        absl::Status st = fn(v.rows + r0 * v.k, nb, static_cast<uint64_t>(v.first_index + r0 * v.index_stride),
                             v.index_stride);
        if (!st.ok()) return st;
      }
      return absl::OkStatus();
    });
    if (!st.ok()) return st;
  }
  const auto [cold_begin, cold_end] = store.ColdRange();
  storage::internal::AlignedRows buf(store.k());
  for (uint64_t b = cold_begin; b < cold_end; b += static_cast<uint64_t>(block)) {
    const int64_t nb = static_cast<int64_t>(std::min<uint64_t>(block, cold_end - b));
    absl::Status st = store.ReadRows(b, nb, &buf);
    if (!st.ok()) return st;
    st = fn(buf.data(), nb, b, 1);
    if (!st.ok()) return st;
  }
  return absl::OkStatus();
}

}  // namespace rapidin::query::internal
