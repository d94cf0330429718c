#include "query/pca_index.h"

#include <algorithm>
#include <cmath>
#include <random>

#include <faiss/VectorTransform.h>
#include <faiss/utils/utils.h>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "absl/strings/str_cat.h"
#include "kernels/half.h"
#include "kernels/score.h"
#include "query/internal/index_util.h"

namespace rapidin::query {
namespace {

constexpr char kMagic[8] = {'R', 'P', 'D', 'N', 'P', 'C', 'A', '2'};  // 2: int8 codes
constexpr uint32_t kVersion = 1;
constexpr int64_t kBlock = 1024;  // rows per projection (one sgemm)

using internal::Get;
using internal::Put;
using internal::RowDeleted;

constexpr int8_t kDeletedCode = -128;  // code[0] of a deleted row; live codes are in [-127, 127]

// Approximate score of one int8 code against a scaled projected query (q_d * scale_d).
float CodeScore(const int8_t* code, int dim, const float* q) {
  float acc[8] = {};
  int d = 0;
  for (; d + 8 <= dim; d += 8) {
    for (int l = 0; l < 8; ++l) acc[l] += float(code[d + l]) * q[d + l];
  }
  float s = 0;
  for (float a : acc) s += a;
  for (; d < dim; ++d) s += float(code[d]) * q[d];
  return s;
}

#if defined(__x86_64__)
// The codes' scan for one scaled projected query: 8 rows at a time with one 8-lane accumulator each, reduced
// together (two rounds of hadd and a lane swap), so a short row costs no reduction of its own; each live row's
// score goes to both selectors. Codes are approximate by design: the summation order need not match the exact
// kernel's. Row i's code starts pitch bytes after row i-1's.
__attribute__((target("avx2,fma"))) void ScanCodesAvx2(const int8_t* codes, int64_t n, int dim, int64_t pitch,
                                                       const float* q, int64_t first, kernels::TopK* hp,
                                                       kernels::TopK* hm) {
  const int dim8 = dim & ~7;
  int64_t r = 0;
  alignas(32) float out[8];
  for (; r + 8 <= n; r += 8) {
    const int8_t* base = codes + r * pitch;
    if (r + 24 <= n) {  // the block after next, a line at a time
      const char* ahead = reinterpret_cast<const char*>(base + 16 * pitch);
      for (int64_t off = 0; off < 8 * pitch; off += 64) _mm_prefetch(ahead + off, _MM_HINT_T0);
    }
    __m256 acc[8];
    for (int i = 0; i < 8; ++i) acc[i] = _mm256_setzero_ps();
    for (int c = 0; c < dim8; c += 8) {
      const __m256 qv = _mm256_loadu_ps(q + c);
      for (int i = 0; i < 8; ++i) {
        const __m128i b8 = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(base + i * pitch + c));
        acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b8)), qv, acc[i]);
      }
    }
    const __m256 s01 = _mm256_hadd_ps(acc[0], acc[1]), s23 = _mm256_hadd_ps(acc[2], acc[3]);
    const __m256 s45 = _mm256_hadd_ps(acc[4], acc[5]), s67 = _mm256_hadd_ps(acc[6], acc[7]);
    const __m256 s0123 = _mm256_hadd_ps(s01, s23), s4567 = _mm256_hadd_ps(s45, s67);
    _mm256_store_ps(out, _mm256_add_ps(_mm256_permute2f128_ps(s0123, s4567, 0x20),
                                       _mm256_permute2f128_ps(s0123, s4567, 0x31)));
    for (int i = 0; i < 8; ++i) {
      const int8_t* row = base + i * pitch;
      if (row[0] == kDeletedCode) continue;
      float sc = out[i];
      for (int c = dim8; c < dim; ++c) sc += float(row[c]) * q[c];
      hp->Push(sc, first + r + i);
      hm->Push(sc, first + r + i);
    }
  }
  for (; r < n; ++r) {
    const int8_t* row = codes + r * pitch;
    if (row[0] == kDeletedCode) continue;
    const float sc = CodeScore(row, dim, q);
    hp->Push(sc, first + r);
    hm->Push(sc, first + r);
  }
}
#endif

// out (n x r) = x (n x k) a^T, with a r x k: FAISS's linear transform, one sgemm.
void Gemm(const std::vector<float>& a, int64_t r, const float* x, int64_t n, int64_t k, std::vector<float>* out) {
  faiss::LinearTransform t(static_cast<int>(k), static_cast<int>(r), /*have_bias=*/false);
  t.A = a;
  t.is_trained = true;
  out->resize(static_cast<size_t>(n) * r);
  t.apply_noalloc(n, x, out->data());
}

// Rows of the result: an orthonormal basis of the columns of m (rows x cols, row-major, rows >= cols).
std::vector<float> OrthonormalColumns(const std::vector<float>& m, int64_t rows, int64_t cols) {
  std::vector<float> t(m.size());  // column-major rows x cols, as LAPACK (faiss::matrix_qr) wants it
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t j = 0; j < cols; ++j) t[j * rows + i] = m[i * cols + j];
  }
  faiss::matrix_qr(static_cast<int>(rows), static_cast<int>(cols), t.data());
  return t;  // cols x rows, row-major
}

// The top `dim` principal directions (dim x k, row-major) of the n sample rows x, and b = -A mean. A full PCA
// needs the eigenvectors of the k x k covariance (about 90 s at K = 4096 here); this finds the dominant subspace
// first by randomised subspace iteration (Halko, Martinsson and Tropp 2011: 2 power iterations, 16 extra
// directions), each step one sgemm and one QR, then runs FAISS's PCA inside that subspace only.
std::vector<float> TopDirections(float* x, int64_t n, int64_t k, int dim, uint64_t seed, std::vector<float>* b) {
  std::vector<double> mean(k, 0.0);
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t c = 0; c < k; ++c) mean[c] += x[i * k + c];
  }
  for (auto& m : mean) m /= std::max<int64_t>(n, 1);
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t c = 0; c < k; ++c) x[i * k + c] -= static_cast<float>(mean[c]);
  }
  const int64_t r = std::min<int64_t>({k, n, int64_t{dim} + 16});
  std::vector<float> v(static_cast<size_t>(r) * k);  // r x k: the subspace's basis, as rows
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> g;
  for (auto& e : v) e = g(rng);
  std::vector<float> xt(static_cast<size_t>(k) * n);  // x^T, for x^T y
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t c = 0; c < k; ++c) xt[c * n + i] = x[i * k + c];
  }
  std::vector<float> y, z;
  for (int it = 0; it < 3; ++it) {
    Gemm(v, r, x, n, k, &y);                       // y = x v^T (n x r)
    if (n > r) y = [&] {                           // rows: orthonormal n-vectors (r x n) -> back to n x r
      std::vector<float> q = OrthonormalColumns(y, n, r), back(q.size());
      for (int64_t j = 0; j < r; ++j) {
        for (int64_t i = 0; i < n; ++i) back[i * r + j] = q[j * n + i];
      }
      return back;
    }();
    std::vector<float> yt(static_cast<size_t>(r) * n);
    for (int64_t i = 0; i < n; ++i) {
      for (int64_t j = 0; j < r; ++j) yt[j * n + i] = y[i * r + j];
    }
    Gemm(yt, r, xt.data(), k, n, &z);              // z = x^T y (k x r)
    v = OrthonormalColumns(z, k, r);               // r x k
  }
  Gemm(v, r, x, n, k, &y);                         // the sample in the subspace (n x r)
  faiss::PCAMatrix pca(static_cast<int>(r), dim, /*eigen_power=*/0, /*random_rotation=*/false);
  pca.max_points_per_d = static_cast<size_t>(n / r + 1);
  pca.train(n, y.data());
  std::vector<float> a(static_cast<size_t>(dim) * k, 0.0f);  // a = A_small v
  for (int d = 0; d < dim; ++d) {
    for (int64_t j = 0; j < r; ++j) {
      const float w = pca.A[d * r + j];
      const float* vj = v.data() + j * k;
      float* ad = a.data() + static_cast<int64_t>(d) * k;
      for (int64_t c = 0; c < k; ++c) ad[c] += w * vj[c];
    }
  }
  b->assign(dim, 0.0f);
  for (int d = 0; d < dim; ++d) {
    double acc = 0;
    for (int64_t c = 0; c < k; ++c) acc += double(a[d * k + c]) * mean[c];
    (*b)[d] = static_cast<float>(-acc);
  }
  return a;
}

}  // namespace

PcaIndex::PcaIndex(int64_t k, int dim, std::vector<float> a, std::vector<float> b, std::vector<float> scale,
                   std::string projection_id)
    : k_(k), dim_(dim), pitch16_((dim + 1) / 2), a_(std::move(a)), b_(std::move(b)), scale_(std::move(scale)),
      projection_id_(std::move(projection_id)), codes_(pitch16_) {
  transform_ = std::make_unique<faiss::LinearTransform>(static_cast<int>(k_), dim_, /*have_bias=*/true);
  transform_->A = a_;
  transform_->b = b_;
  transform_->is_trained = true;
}

PcaIndex::~PcaIndex() = default;

std::string PcaIndex::DefaultPath(const std::string& store_path) { return store_path + "/rapidin-pca.bin"; }

uint64_t PcaIndex::code_rows() const {
  ReaderMutexLock l(&mu_);
  return static_cast<uint64_t>(codes_.n());
}

uint64_t PcaIndex::rows() const {
  ReaderMutexLock l(&mu_);
  return live_;
}

uint64_t PcaIndex::sequence() const {
  ReaderMutexLock l(&mu_);
  return sequence_;
}

bool PcaIndex::stale() const {
  ReaderMutexLock l(&mu_);
  return stale_;
}

std::string PcaIndex::Describe() const { return absl::StrCat("pca dim=", dim_); }

void PcaIndex::Project(const float* q, float* out) const {
  // 16 independent float sums (the compiler vectorises them), then added up in double: dim x K multiply-adds
  // sit on every query's path, and a double loop cost ~1 ms at 256 x 4096.
  constexpr int kLanes = 16;
  for (int d = 0; d < dim_; ++d) {
    const float* a = a_.data() + static_cast<int64_t>(d) * k_;
    float acc[kLanes] = {};
    int64_t c = 0;
    for (; c + kLanes <= k_; c += kLanes) {
      for (int l = 0; l < kLanes; ++l) acc[l] += a[c + l] * q[c + l];
    }
    double sum = 0;
    for (int l = 0; l < kLanes; ++l) sum += acc[l];
    for (; c < k_; ++c) sum += double(a[c]) * q[c];
    out[d] = static_cast<float>(sum);
  }
}

void PcaIndex::Encode(const float* rows, int64_t n, uint16_t* codes) const {
  std::vector<float> out(static_cast<size_t>(n) * dim_);
  transform_->apply_noalloc(n, rows, out.data());
  for (int64_t i = 0; i < n; ++i) {
    int8_t* code = reinterpret_cast<int8_t*>(codes + i * pitch16_);
    std::fill(code, code + 2 * pitch16_, int8_t{0});
    if (RowDeleted(rows + i * k_)) {
      code[0] = kDeletedCode;
      continue;
    }
    for (int d = 0; d < dim_; ++d) {
      const float v = std::nearbyint(out[i * dim_ + d] / scale_[d]);
      code[d] = static_cast<int8_t>(std::clamp(v, -127.0f, 127.0f));
    }
  }
}

bool PcaIndex::Live(int64_t r) const { return CodeRow(r)[0] != kDeletedCode; }

void PcaIndex::SetCode(uint64_t row, const uint16_t* code) {
  const bool was_live = static_cast<int64_t>(row) < codes_.n() && Live(static_cast<int64_t>(row));
  if (static_cast<int64_t>(row) >= codes_.n()) {
    if (!codes_.Reserve(static_cast<int64_t>(row) + 1)) return;  // out of memory: the row stays unindexed
    std::vector<uint16_t> gap(pitch16_, 0);
    reinterpret_cast<int8_t*>(gap.data())[0] = kDeletedCode;
    while (codes_.n() <= static_cast<int64_t>(row)) codes_.Append(gap.data());
  }
  codes_.Overwrite(static_cast<int64_t>(row), code);
  const bool is_live = reinterpret_cast<const int8_t*>(code)[0] != kDeletedCode;
  live_ += static_cast<uint64_t>(is_live) - static_cast<uint64_t>(was_live);
}

absl::StatusOr<std::unique_ptr<PcaIndex>> PcaIndex::Build(const storage::Store& store, const PcaOptions& o) {
  const int64_t k = store.k();
  if (o.dim < 1 || o.dim > k) {
    return absl::FailedPreconditionError(absl::StrCat("PCA dim ", o.dim, " is outside [1, K=", k, "]"));
  }
  const uint64_t live = store.live_records();
  if (live == 0) return absl::FailedPreconditionError("the PCA index needs a store with records; this one is empty");
  const int64_t m = std::min<int64_t>(
      static_cast<int64_t>(live),
      o.max_train_points > 0 ? o.max_train_points : std::max<int64_t>(16384, int64_t{4} * o.dim));
  int64_t taken = 0;
  auto x = internal::SampleRows(
      store, m, o.seed, [&](uint64_t d, uint64_t t) { if (o.progress) o.progress("sample", d, t); }, &taken);
  if (!x.ok()) return x.status();
  std::vector<float> a, b;
  try {
    if (o.progress) o.progress("train", 0, 1);
    a = TopDirections(x->data(), taken, k, o.dim, o.seed, &b);
    if (o.progress) o.progress("train", 1, 1);
  } catch (const std::exception& e) {
    return absl::InternalError(absl::StrCat("FAISS PCA: ", e.what()));
  }
  if (a.size() != static_cast<size_t>(o.dim) * k || b.size() != static_cast<size_t>(o.dim)) {
    return absl::InternalError(absl::StrCat("FAISS PCA returned ", a.size(), " + ", b.size(), " values"));
  }
  // int8 codes: per direction, a quarter more than the sample's largest |projection| maps to 127 (rows beyond
  // it are clamped; their exact scores come from the re-scoring anyway).
  std::vector<float> scale(o.dim, 1.0f);
  {
    std::vector<float> y;
    Gemm(a, o.dim, x->data(), taken, k, &y);  // x is centred by TopDirections: y = A (x - mean)
    for (int d = 0; d < o.dim; ++d) {
      float m = 0;
      for (int64_t i = 0; i < taken; ++i) m = std::max(m, std::fabs(y[i * o.dim + d]));
      scale[d] = m > 0 ? 1.25f * m / 127.0f : 1.0f;
    }
  }
  std::unique_ptr<PcaIndex> index(new PcaIndex(k, o.dim, std::move(a), std::move(b), std::move(scale),
                                               store.manifest().projection_state_id()));
  absl::Status st = index->Reproject(store, o);
  if (!st.ok()) return st;
  return index;
}

absl::Status PcaIndex::Reproject(const storage::Store& store, const PcaOptions& o) {
  const uint64_t seq = store.sequence();  // first: writes during the pass make the result look older, not newer
  const uint64_t n = store.size();
  std::vector<uint16_t> all(static_cast<size_t>(n) * pitch16_);
  std::vector<float> x(static_cast<size_t>(kBlock) * k_);
  std::vector<uint16_t> c(static_cast<size_t>(kBlock) * pitch16_);
  uint64_t done = 0, live = 0;
  try {
    absl::Status st = internal::ForEachRowBlock(
        store, kBlock, [&](const uint16_t* rows, int64_t nb, uint64_t first, int64_t stride) {
          for (int64_t i = 0; i < nb * k_; ++i) x[i] = kernels::HalfToFloat(rows[i]);
          Encode(x.data(), nb, c.data());
          for (int64_t i = 0; i < nb; ++i) {
            const uint64_t g = first + static_cast<uint64_t>(i * stride);
            if (g >= n) continue;
            std::copy(c.begin() + i * pitch16_, c.begin() + (i + 1) * pitch16_, all.begin() + g * pitch16_);
            live += !RowDeleted(x.data() + i * k_);
          }
          done += nb;
          if (o.progress) o.progress("project", done, n);
          return absl::OkStatus();
        });
    if (!st.ok()) return st;
  } catch (const std::exception& e) {
    return absl::InternalError(absl::StrCat("FAISS projection: ", e.what()));
  }
  WriterMutexLock l(&mu_);
  codes_.Clear();
  if (!codes_.Reserve(static_cast<int64_t>(n))) return absl::ResourceExhaustedError("PCA codes: out of memory");
  for (uint64_t g = 0; g < n; ++g) codes_.Append(all.data() + g * pitch16_);
  live_ = live;
  sequence_ = seq;
  stale_ = false;
  return absl::OkStatus();
}

void PcaIndex::ApplyIngest(const storage::IngestResult& result, const std::vector<storage::IngestItem>& items) {
  const size_t n = std::min(items.size(), result.rows.size());
  std::vector<float> x(n * k_);
  for (size_t i = 0; i < n; ++i) {  // rounded to fp16 as the store holds them: codes equal Reproject's
    for (int64_t c = 0; c < k_; ++c) x[i * k_ + c] = kernels::HalfToFloat(kernels::FloatToHalf(items[i].vector[c]));
  }
  std::vector<uint16_t> codes(n * pitch16_);
  if (n > 0) Encode(x.data(), static_cast<int64_t>(n), codes.data());
  WriterMutexLock l(&mu_);
  for (size_t i = 0; i < n; ++i) SetCode(result.rows[i], codes.data() + i * pitch16_);  // the last write wins
  sequence_ = result.sequence;
}

void PcaIndex::ApplyDelete(const storage::DeleteResult& result) {
  std::vector<uint16_t> gone(pitch16_, 0);
  reinterpret_cast<int8_t*>(gone.data())[0] = kDeletedCode;
  WriterMutexLock l(&mu_);
  for (uint64_t g : result.rows) {
    if (static_cast<int64_t>(g) < codes_.n()) SetCode(g, gone.data());
  }
  sequence_ = result.sequence;
}

absl::Status PcaIndex::ScanCodes(uint64_t begin, uint64_t end, const float* projected, int q,
                                 std::vector<kernels::TopK>* helpful, std::vector<kernels::TopK>* harmful) const {
  if (static_cast<int>(helpful->size()) != q || static_cast<int>(harmful->size()) != q) {
    return absl::InvalidArgumentError(absl::StrCat("ScanCodes: need ", q, " selectors per side"));
  }
  std::vector<float> scaled(dim_);
  ReaderMutexLock l(&mu_);
  end = std::min<uint64_t>(end, static_cast<uint64_t>(codes_.n()));
  for (int j = 0; j < q && begin < end; ++j) {
    for (int d = 0; d < dim_; ++d) scaled[d] = projected[static_cast<int64_t>(j) * dim_ + d] * scale_[d];
    kernels::TopK& hp = (*helpful)[j];
    kernels::TopK& hm = (*harmful)[j];
#if defined(__x86_64__)
    if (kernels::Avx2Available()) {
      ScanCodesAvx2(CodeRow(static_cast<int64_t>(begin)), static_cast<int64_t>(end - begin), dim_, 2 * pitch16_,
                    scaled.data(), static_cast<int64_t>(begin), &hp, &hm);
      continue;
    }
#endif
    for (uint64_t r = begin; r < end; ++r) {
      if (!Live(static_cast<int64_t>(r))) continue;
      const float sc = CodeScore(CodeRow(static_cast<int64_t>(r)), dim_, scaled.data());
      hp.Push(sc, static_cast<int64_t>(r));
      hm.Push(sc, static_cast<int64_t>(r));
    }
  }
  return absl::OkStatus();
}

absl::Status PcaIndex::Save(const std::string& path) const {
  std::string out;
  Put(&out, kVersion);
  Put(&out, static_cast<uint32_t>(dim_));
  Put(&out, static_cast<uint64_t>(k_));
  ReaderMutexLock l(&mu_);
  Put(&out, sequence_);
  Put(&out, static_cast<uint64_t>(codes_.n()));
  Put(&out, static_cast<uint64_t>(projection_id_.size()));
  out.append(projection_id_);
  out.append(reinterpret_cast<const char*>(a_.data()), a_.size() * sizeof(float));
  out.append(reinterpret_cast<const char*>(b_.data()), b_.size() * sizeof(float));
  out.append(reinterpret_cast<const char*>(scale_.data()), scale_.size() * sizeof(float));
  for (int64_t r = 0; r < codes_.n(); ++r) out.append(reinterpret_cast<const char*>(CodeRow(r)), dim_);
  return internal::WriteIndexFile(path, kMagic, out);
}

absl::StatusOr<std::unique_ptr<PcaIndex>> PcaIndex::Load(const std::string& path, const storage::Store& store) {
  auto file = internal::ReadIndexFile(path, kMagic, "PCA index");
  if (!file.ok()) return file.status();
  const std::string& body = *file;
  auto damaged = [&](const std::string& what) {
    return absl::DataLossError(absl::StrCat("PCA index ", path, " is damaged: ", what));
  };
  size_t pos = 0;
  uint32_t version = 0, dim = 0;
  uint64_t k = 0, seq = 0, rows = 0, id_len = 0;
  if (!Get(body, &pos, &version) || !Get(body, &pos, &dim) || !Get(body, &pos, &k) || !Get(body, &pos, &seq) ||
      !Get(body, &pos, &rows) || !Get(body, &pos, &id_len)) {
    return damaged("header truncated");
  }
  if (version != kVersion) return damaged(absl::StrCat("format version ", version, ", this build reads ", kVersion));
  if (k != store.k()) {
    return absl::FailedPreconditionError(
        absl::StrCat("PCA index ", path, " was built for K=", k, ", the store has K=", store.k()));
  }
  if (dim == 0 || dim > k || rows > (uint64_t{1} << 40) || id_len > 4096) return damaged("implausible header");
  const uint64_t need = id_len + (uint64_t{dim} * k + 2 * uint64_t{dim}) * sizeof(float) + rows * dim;
  if (body.size() - pos != need) {
    return damaged(absl::StrCat(body.size() - pos, " bytes after the header, expected ", need));
  }
  std::string pid = body.substr(pos, id_len);
  pos += id_len;
  if (pid != store.manifest().projection_state_id()) {
    return absl::FailedPreconditionError(absl::StrCat("PCA index ", path, " was built for projection state ", pid,
                                                      ", the store has ", store.manifest().projection_state_id()));
  }
  std::vector<float> a(uint64_t{dim} * k), b(dim), scale(dim);
  for (auto* v : {&a, &b, &scale}) {
    std::memcpy(v->data(), body.data() + pos, v->size() * sizeof(float));
    pos += v->size() * sizeof(float);
    for (float x : *v) {
      if (!std::isfinite(x)) return damaged("a projection value is not finite");
    }
  }
  for (float x : scale) {
    if (!(x > 0)) return damaged("a code scale is not positive");
  }
  std::unique_ptr<PcaIndex> index(new PcaIndex(static_cast<int64_t>(k), static_cast<int>(dim), std::move(a),
                                               std::move(b), std::move(scale), std::move(pid)));
  WriterMutexLock l(&index->mu_);
  if (!index->codes_.Reserve(static_cast<int64_t>(rows))) return absl::ResourceExhaustedError("PCA codes: out of memory");
  std::vector<uint16_t> row(index->pitch16_);
  for (uint64_t g = 0; g < rows; ++g) {
    std::fill(row.begin(), row.end(), 0);
    std::memcpy(row.data(), body.data() + pos + g * dim, dim);
    index->codes_.Append(row.data());
    index->live_ += reinterpret_cast<const int8_t*>(row.data())[0] != kDeletedCode;
  }
  index->sequence_ = seq;
  index->stale_ = seq != store.sequence() || rows != store.size();
  return index;
}

absl::StatusOr<std::unique_ptr<PcaIndex>> PcaIndex::Open(const storage::Store& store, const PcaOptions& o,
                                                         bool rebuild, std::string* how) {
  return internal::OpenIndexFile<PcaIndex>(
      store, o, rebuild, DefaultPath(store.path()),
      [&](const PcaIndex& loaded) {
        return loaded.dim() == o.dim ? std::string()
                                     : absl::StrCat("the saved index has dim=", loaded.dim(), ", ", o.dim, " asked for");
      },
      [&](PcaIndex& loaded) { return loaded.Reproject(store, o); }, "reprojected", how);
}

namespace {

class PcaBackend : public ScanBackend {
 public:
  PcaBackend(const storage::Store* store, const PcaIndex* index, const PcaOptions& o, kernels::ScoreImpl impl)
      : store_(store), index_(index), per_k_(o.candidates_per_k), min_(o.min_candidates), impl_(impl) {}

  int num_workers() const override { return store_->num_shards(); }
  std::string Describe() const override {
    return absl::StrCat(index_->Describe(), " candidates=max(", min_, ",", per_k_, "k) + ", kernels::ImplName(impl_));
  }
  bool is_gpu() const override { return false; }

  absl::Status SetQueries(const ScanBatch& b) override {
    projected_.resize(static_cast<size_t>(b.q) * index_->dim());
    for (int j = 0; j < b.q; ++j) {
      index_->Project(b.queries + static_cast<int64_t>(j) * store_->k(), projected_.data() + j * index_->dim());
    }
    return absl::OkStatus();
  }

  absl::Status Scan(int w, const ScanBatch& b, WorkerScan* o) override {
    o->timing.backend = Describe();
    const int W = num_workers();
    const uint64_t n = index_->code_rows();
    // 1. This worker's share of the codes: the best candidates at each end.
    std::vector<kernels::TopK> ch, cm;
    for (int j = 0; j < b.q; ++j) {
      ch.emplace_back(Candidates(b.top_k[j]), true);
      cm.emplace_back(Candidates(b.harmful_k[j]), false);
    }
    absl::Status st = index_->ScanCodes(n * w / W, n * (w + 1) / W, projected_.data(), b.q, &ch, &cm);
    if (!st.ok()) return st;
    // 2. The candidates (both ends, once each) scored exactly from their shards, into the final top-k.
    std::vector<std::vector<kernels::TopK>> hp(b.q), hm(b.q);
    std::vector<std::vector<std::vector<int64_t>>> by_shard(W, std::vector<std::vector<int64_t>>(b.q));
    for (int j = 0; j < b.q; ++j) {
      hp[j].emplace_back(b.top_k[j], true);
      hm[j].emplace_back(b.harmful_k[j], false);
      std::vector<int64_t> rows;
      for (const auto& c : ch[j].Sorted()) rows.push_back(c.index);
      for (const auto& c : cm[j].Sorted()) rows.push_back(c.index);
      std::sort(rows.begin(), rows.end());
      rows.erase(std::unique(rows.begin(), rows.end()), rows.end());
      for (int64_t g : rows) by_shard[g % W][j].push_back(g);
    }
    // Scattered 8 KB rows are read at memory latency one by one; copied a few dozen at a time into a buffer that
    // stays in L2 (memcpy keeps many reads in flight) and scored there, they are read at close to bandwidth. The
    // kernel's sums do not depend on how rows are grouped, so the scores are the exact scan's, bit for bit.
    constexpr int64_t kGather = 32;
    const int64_t k = store_->k();
    storage::internal::AlignedRows buf(k);
    if (!buf.Reserve(kGather)) return absl::ResourceExhaustedError("PCA re-rank buffer");
    std::vector<float> scores(kGather);
    std::vector<int64_t> ids;
    for (int s = 0; s < W; ++s) {
      st = store_->WithShard(s, [&](const storage::ShardView& v) {
        for (int j = 0; j < b.q; ++j) {
          const float* q = b.queries + static_cast<int64_t>(j) * v.k;
          const auto& rows = by_shard[s][j];
          for (size_t i = 0; i < rows.size();) {
            buf.Clear();
            ids.clear();
            for (; i < rows.size() && buf.n() < kGather; ++i) {
              const int64_t r = (rows[i] - v.first_index) / v.index_stride;
              if (r < 0 || r >= v.n) continue;  // not resident: the engine's cold scan reads every cold row
              buf.Append(v.rows + r * v.k);
              ids.push_back(rows[i]);
            }
            absl::Status st = kernels::ScoreF16(buf.data(), buf.n(), v.k, q, 1, scores.data(), impl_);
            if (!st.ok()) return st;
            for (int64_t m = 0; m < buf.n(); ++m) {
              hp[j][0].Push(scores[m], ids[m]);
              hm[j][0].Push(scores[m], ids[m]);
            }
            o->timing.rows += buf.n();
          }
        }
        return absl::OkStatus();
      });
      if (!st.ok()) return st;
    }
    for (int j = 0; j < b.q; ++j) {
      o->helpful[j].push_back(hp[j][0].Sorted());
      o->harmful[j].push_back(hm[j][0].Sorted());
    }
    o->timing.bytes_scanned = static_cast<uint64_t>(o->timing.rows) * store_->k() * sizeof(uint16_t) +
                              (n * (w + 1) / W - n * w / W) * index_->dim() * sizeof(uint16_t);
    return absl::OkStatus();
  }

 private:
  int Candidates(int k) const { return k == 0 ? 0 : std::max(min_, per_k_ * k); }

  const storage::Store* store_;
  const PcaIndex* index_;
  const int per_k_, min_;
  const kernels::ScoreImpl impl_;
  std::vector<float> projected_;  // q x dim
};

}  // namespace

std::unique_ptr<ScanBackend> MakePcaBackend(const storage::Store* store, const PcaIndex* index, const PcaOptions& o,
                                            kernels::ScoreImpl impl) {
  return std::make_unique<PcaBackend>(store, index, o, kernels::ResolveImpl(impl));
}

}  // namespace rapidin::query
