// Shared helpers for the test binaries.
#ifndef RAPIDIN_TESTS_TEST_UTIL_H_
#define RAPIDIN_TESTS_TEST_UTIL_H_

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <random>
#include <string>
#include <vector>

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

// The shared data folder: $RAPIDIN_SHARED_DATA or ../shared/data beside the checkout.
// Largest |v_i| (0 for an empty vector): the scale of a reference, and a guard against comparing zeros.
inline double MaxAbs(const std::vector<double>& v) {
  double m = 0;
  for (double x : v) m = std::max(m, std::fabs(x));
  return m;
}

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

}  // namespace rapidin::testing

#endif  // RAPIDIN_TESTS_TEST_UTIL_H_
