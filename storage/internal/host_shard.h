// One shard of the host tier: a growable, 64-byte aligned, row-major fp16 array.
#ifndef RAPIDIN_STORAGE_INTERNAL_HOST_SHARD_H_
#define RAPIDIN_STORAGE_INTERNAL_HOST_SHARD_H_

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <new>

#include <sys/mman.h>

namespace rapidin::storage::internal {

// Where the rows live: aligned_alloc by default; the CUDA backend passes page-locked memory so that the warm
// tier can be streamed to GPUs without a staging copy.
struct HostAllocator {
  void* (*alloc)(size_t bytes) = nullptr;  // nullptr: std::aligned_alloc(64, bytes)
  void (*free)(void* p) = nullptr;
};

class AlignedRows {
 public:
  static constexpr size_t kAlign = 64;
  static constexpr size_t kHuge = size_t{2} << 20;
  static constexpr size_t kHugeMin = size_t{8} << 20;

  explicit AlignedRows(int64_t k, HostAllocator allocator = {}) : k_(k), allocator_(allocator) {}
  ~AlignedRows() { Free(data_); }
  AlignedRows(const AlignedRows&) = delete;
  AlignedRows& operator=(const AlignedRows&) = delete;

  // Ensures room for `rows` rows; false when memory cannot be had (existing rows untouched).
  bool Reserve(int64_t rows) {
    if (rows <= capacity_) return true;
    // A row count whose bytes do not fit in size_t (a damaged manifest's record count, say) cannot be had: the
    // size would wrap to a small allocation that the rows then overrun.
    const size_t row_bytes = static_cast<size_t>(k_) * sizeof(uint16_t);
    const int64_t max_rows =
        row_bytes == 0 ? INT64_MAX / 2
                       : static_cast<int64_t>(std::min<size_t>(INT64_MAX / 2, (SIZE_MAX - kAlign) / row_bytes));
    if (rows > max_rows) return false;
    int64_t cap = capacity_ == 0 ? 1024 : capacity_;
    while (cap < rows) cap = cap > max_rows / 2 ? max_rows : cap * 2;
    size_t bytes = static_cast<size_t>(cap) * k_ * sizeof(uint16_t);
    bytes = (bytes + kAlign - 1) / kAlign * kAlign;
    void* p = nullptr;
    if (allocator_.alloc != nullptr) {
      p = allocator_.alloc(bytes == 0 ? kAlign : bytes);
    } else if (bytes >= kHugeMin) {
      // Large tiers on 2 MiB pages where the kernel allows it (THP "madvise" mode is common): a scan crosses a
      // 4 KiB page every two K=4096 rows, and an index's scattered row reads pay a page walk each.
      bytes = (bytes + kHuge - 1) / kHuge * kHuge;
      p = std::aligned_alloc(kHuge, bytes);
      if (p != nullptr) ::madvise(p, bytes, MADV_HUGEPAGE);  // advice only: failure leaves 4 KiB pages
    } else {
      p = std::aligned_alloc(kAlign, bytes == 0 ? kAlign : bytes);
    }
    if (p == nullptr) return false;
    if (n_ > 0) std::memcpy(p, data_, static_cast<size_t>(n_) * k_ * sizeof(uint16_t));
    Free(data_);
    data_ = static_cast<uint16_t*>(p);
    capacity_ = cap;
    return true;
  }

  // Requires Reserve(n()+1) first.
  void Append(const uint16_t* row) {
    std::memcpy(data_ + static_cast<size_t>(n_) * k_, row, k_ * sizeof(uint16_t));
    ++n_;
  }
  void Overwrite(int64_t r, const uint16_t* row) {
    std::memcpy(data_ + static_cast<size_t>(r) * k_, row, k_ * sizeof(uint16_t));
  }

  void Clear() { n_ = 0; }  // keeps the allocation

  const uint16_t* data() const { return data_; }
  const uint16_t* row(int64_t r) const { return data_ + static_cast<size_t>(r) * k_; }
  int64_t n() const { return n_; }
  uint64_t bytes() const { return static_cast<uint64_t>(n_) * k_ * sizeof(uint16_t); }

 private:
  void Free(void* p) {
    if (p == nullptr) return;
    allocator_.free != nullptr ? allocator_.free(p) : std::free(p);
  }

  int64_t k_;
  HostAllocator allocator_;
  int64_t n_ = 0;
  int64_t capacity_ = 0;
  uint16_t* data_ = nullptr;
};

}  // namespace rapidin::storage::internal

#endif  // RAPIDIN_STORAGE_INTERNAL_HOST_SHARD_H_
