// gpu::Status as absl::Status, for the layers above kernels/cuda/ (the GPU layer itself has no Abseil, so that
// scripts/gpu-check.sh builds it with the CUDA toolkit alone). The one conversion, used by query/internal/
// cuda_backend.cc and model/internal/device_sketch_cuda.cc. Thread-safe.
#ifndef RAPIDIN_KERNELS_CUDA_ABSL_STATUS_H_
#define RAPIDIN_KERNELS_CUDA_ABSL_STATUS_H_

#include "absl/status/status.h"
#include "kernels/cuda/status.h"

namespace rapidin::gpu {

inline absl::Status ToAbsl(const Status& st) {
  switch (st.code()) {
    case Code::kOk:
      return absl::OkStatus();
    case Code::kInvalidArgument:
      return absl::InvalidArgumentError(st.message());
    case Code::kResourceExhausted:
      return absl::ResourceExhaustedError(st.message());
    case Code::kUnavailable:
      return absl::UnavailableError(st.message());
    default:
      return absl::InternalError(st.message());
  }
}

}  // namespace rapidin::gpu

#endif  // RAPIDIN_KERNELS_CUDA_ABSL_STATUS_H_
