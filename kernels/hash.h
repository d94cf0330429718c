// FNV-1a 64: the one hash of the project (projection-state ids, model and preconditioner hashes). Stable across
// builds and machines, so ids written into a store stay valid. Not for adversarial inputs. Header-only; pure
// functions, thread-safe.
#ifndef RAPIDIN_KERNELS_HASH_H_
#define RAPIDIN_KERNELS_HASH_H_

#include <cstddef>
#include <cstdint>

namespace rapidin::kernels {

inline constexpr uint64_t kFnv1aOffset = 1469598103934665603ull;

// Continues hash h over n bytes (start from kFnv1aOffset).
inline uint64_t Fnv1a(uint64_t h, const void* data, size_t n) {
  const unsigned char* p = static_cast<const unsigned char*>(data);
  for (size_t i = 0; i < n; ++i) {
    h ^= p[i];
    h *= 1099511628211ull;
  }
  return h;
}

}  // namespace rapidin::kernels

#endif  // RAPIDIN_KERNELS_HASH_H_
