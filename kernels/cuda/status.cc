#include "kernels/cuda/status.h"

namespace rapidin::gpu {

std::string Status::ToString() const {
  static const char* const kNames[] = {"OK", "INVALID_ARGUMENT", "RESOURCE_EXHAUSTED", "UNAVAILABLE", "INTERNAL"};
  if (ok()) return "OK";
  return std::string(kNames[static_cast<int>(code_)]) + ": " + message_;
}

}  // namespace rapidin::gpu
