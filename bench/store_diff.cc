// Compares the vectors of two stores record by record (matched by id): how far a faster caching path's
// vectors are from the reference path's. Prints one JSON line: records compared, the smallest cosine, the
// largest |a - b| / max |b| of a vector, and ids present in one store only.
// Usage: store_diff REFERENCE_STORE OTHER_STORE
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <string>

#include "nlohmann/json.hpp"
#include "storage/store.h"

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: store_diff REFERENCE_STORE OTHER_STORE\n");
    return 2;
  }
  rapidin::storage::StoreOptions o;
  auto ref = rapidin::storage::Store::Open(argv[1], o);
  auto other = rapidin::storage::Store::Open(argv[2], o);
  if (!ref.ok() || !other.ok()) {
    std::fprintf(stderr, "store_diff: %s %s\n", ref.status().ToString().c_str(), other.status().ToString().c_str());
    return 1;
  }
  int64_t compared = 0, missing = 0;
  double min_cos = 1, max_rel = 0;
  for (uint64_t i = 0; i < (*ref)->size(); ++i) {
    auto rec = (*ref)->GetRecordByIndex(i);
    if (!rec.ok()) continue;  // a deleted row
    auto a = (*ref)->GetVector(i);
    auto twin = (*other)->GetRecordById(rec->record().id());
    if (!a.ok() || !twin.ok()) {
      ++missing;
      continue;
    }
    auto b = (*other)->GetVector(twin->index());
    if (!b.ok() || b->size() != a->size()) {
      ++missing;
      continue;
    }
    double ab = 0, aa = 0, bb = 0, diff = 0, big = 0;
    for (size_t j = 0; j < a->size(); ++j) {
      const double x = (*a)[j], y = (*b)[j];
      ab += x * y, aa += x * x, bb += y * y;
      diff = std::max(diff, std::fabs(x - y));
      big = std::max(big, std::fabs(x));
    }
    min_cos = std::min(min_cos, aa > 0 && bb > 0 ? ab / std::sqrt(aa * bb) : (aa == bb ? 1.0 : 0.0));
    max_rel = std::max(max_rel, big > 0 ? diff / big : diff);
    ++compared;
  }
  const int64_t extra = static_cast<int64_t>((*other)->live_records()) - (compared);
  nlohmann::json j = {{"compared", compared}, {"min_cosine", min_cos}, {"max_rel_diff", max_rel},
                      {"missing_in_other", missing}, {"extra_in_other", extra}};
  std::printf("%s\n", j.dump().c_str());
  return compared > 0 && missing == 0 ? 0 : 1;
}
