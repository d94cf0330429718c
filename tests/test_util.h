// Shared helpers for the test binaries.
#ifndef RAPIDIN_TESTS_TEST_UTIL_H_
#define RAPIDIN_TESTS_TEST_UTIL_H_

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <random>
#include <string>
#include <vector>

#include "kernels/half.h"
#include "storage/store.h"

namespace rapidin::testing {

// A fresh directory under the system temp dir, removed at destruction.
class TempDir {
 public:
  TempDir() {
    std::random_device rd;
    path_ = std::filesystem::temp_directory_path() / ("rapidin_test_" + std::to_string(rd()) + std::to_string(rd()));
    std::filesystem::create_directories(path_);
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  std::string path(const std::string& sub = "") const { return (path_ / sub).string(); }

 private:
  std::filesystem::path path_;
};

// Largest |v_i| (0 for an empty vector): the scale of a reference, and a guard against comparing zeros.
inline double MaxAbs(const std::vector<double>& v) {
  double m = 0;
  for (double x : v) m = std::max(m, std::fabs(x));
  return m;
}

// max_i |got_i - want_i| / max_i |want_i|: the error relative to the reference's largest value.
inline double RelErr(const std::vector<double>& got, const std::vector<double>& want) {
  double num = 0;
  for (size_t i = 0; i < want.size(); ++i) num = std::max(num, std::fabs(got[i] - want[i]));
  return num / std::max(MaxAbs(want), 1e-30);
}

// The shared data folder: $RAPIDIN_SHARED_DATA or ../shared/data beside the checkout.
inline std::string SharedData() {
  const char* env = std::getenv("RAPIDIN_SHARED_DATA");
#ifdef RAPIDIN_SOURCE_DIR
  return env ? env : RAPIDIN_SOURCE_DIR "/../shared/data";
#else
  return env ? env : "../shared/data";
#endif
}

// Deterministic vector for (seed, row): used by the crash test's child and parent alike.
inline std::vector<float> SeededVector(uint64_t seed, int k) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> g(0.0f, 1.0f);
  std::vector<float> v(k);
  for (auto& x : v) x = g(rng);
  return v;
}

inline storage::IngestItem Item(const std::string& id, std::vector<float> v, const std::string& text = "") {
  storage::IngestItem it;
  it.record.set_id(id);
  it.record.set_text(text.empty() ? "text of " + id : text);
  it.vector = std::move(v);
  return it;
}

// The seed of the mutation tests: fresh each run (print it with failures), or $RAPIDIN_FUZZ_SEED to replay.
inline uint64_t FuzzSeed() {
  static const uint64_t seed = [] {
    const char* env = std::getenv("RAPIDIN_FUZZ_SEED");
    return env ? std::strtoull(env, nullptr, 10) : (uint64_t{std::random_device{}()} << 32) | std::random_device{}();
  }();
  return seed;
}

// For SCOPED_TRACE in a mutation test: how to replay this run.
inline std::string FuzzReplay() { return "replay with RAPIDIN_FUZZ_SEED=" + std::to_string(FuzzSeed()); }

// v rounded to fp16 and back, as a store holds it.
inline std::vector<float> Fp16Rounded(std::vector<float> v) {
  for (auto& x : v) x = kernels::HalfToFloat(kernels::FloatToHalf(x));
  return v;
}

// One random edit of `s`. `hot` bytes at the front (a header) get half of the point edits.
inline std::string Mutate(std::string s, size_t hot, std::mt19937_64& rng) {
  auto pos = [&](size_t n) -> size_t {
    if (n == 0) return 0;
    if (hot > 0 && rng() % 2) return rng() % std::min(hot, n);
    return rng() % n;
  };
  switch (rng() % 6) {
    case 0:  // a few random bytes
      for (int i = 0, m = 1 + rng() % 4; i < m && !s.empty(); ++i) s[pos(s.size())] = static_cast<char>(rng());
      break;
    case 1:  // cut short
      s.resize(s.empty() ? 0 : rng() % s.size());
      break;
    case 2: {  // an extreme 32-bit integer (sizes, counts, lengths)
      static const int64_t kInts[] = {0, -1, 1, 0x7fffffff, int64_t{0x80000000}, 65536, 1 << 24, 3};
      const uint32_t v = static_cast<uint32_t>(kInts[rng() % 8]);
      if (s.size() >= 4) std::memcpy(&s[pos(s.size() - 3) & ~size_t{3}], &v, 4);
      break;
    }
    case 3: {  // an extreme 64-bit integer (safetensors' header length)
      const uint64_t v = rng() % 2 ? ~uint64_t{0} : uint64_t{1} << (rng() % 64);
      if (s.size() >= 8) std::memcpy(&s[pos(s.size() - 7)], &v, 8);
      break;
    }
    case 4:  // a random run inserted
      s.insert(pos(s.size() + 1), std::string(1 + rng() % 16, static_cast<char>(rng())));
      break;
    default:  // a run removed
      if (!s.empty()) {
        const size_t p = pos(s.size());
        s.erase(p, 1 + rng() % 16);
      }
  }
  return s;
}

}  // namespace rapidin::testing

#endif  // RAPIDIN_TESTS_TEST_UTIL_H_
