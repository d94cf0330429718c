// Helper for the crash-safety tests: ingests batches of `batch` records with ids "b<batch>-<i>" and vectors
// SeededVector(batch * 1000 + i) into the store at argv[1] until killed, printing each committed batch number.
// With a fourth argument "delete", after ingesting batch b it also deletes the even ids of batch b - 1 (one
// request) before printing b.
#include <cstdio>
#include <cstdlib>
#include <string>

#include "tests/test_util.h"

int main(int argc, char** argv) {
  if (argc != 4 && argc != 5) {
    std::fprintf(stderr, "usage: crash_writer STORE K BATCH [delete]\n");
    return 2;
  }
  const bool deletes = argc == 5 && std::string(argv[4]) == "delete";
  const int k = std::atoi(argv[2]);
  const int batch = std::atoi(argv[3]);
  rapidin::storage::StoreOptions o;
  o.create_if_missing = true;
  o.k = k;
  o.num_shards = 3;
  auto store = rapidin::storage::Store::Open(argv[1], o);
  if (!store.ok()) {
    std::fprintf(stderr, "%s\n", store.status().ToString().c_str());
    return 1;
  }
  for (int b = 0;; ++b) {
    std::vector<rapidin::storage::IngestItem> items;
    for (int i = 0; i < batch; ++i) {
      items.push_back(rapidin::testing::Item("b" + std::to_string(b) + "-" + std::to_string(i),
                                             rapidin::testing::SeededVector(b * 1000 + i, k)));
    }
    auto r = (*store)->Ingest(items);
    if (!r.ok()) {
      std::fprintf(stderr, "%s\n", r.status().ToString().c_str());
      return 1;
    }
    if (deletes && b > 0) {
      std::vector<std::string> ids;
      for (int i = 0; i < batch; i += 2) ids.push_back("b" + std::to_string(b - 1) + "-" + std::to_string(i));
      auto d = (*store)->Delete(ids);
      if (!d.ok()) {
        std::fprintf(stderr, "%s\n", d.status().ToString().c_str());
        return 1;
      }
    }
    std::printf("%d\n", b);
    std::fflush(stdout);
  }
}
