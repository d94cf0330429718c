// Mapping of CUDA errors to gpu::Status, for the .cu files of this directory.
#ifndef RAPIDIN_KERNELS_CUDA_INTERNAL_CHECK_H_
#define RAPIDIN_KERNELS_CUDA_INTERNAL_CHECK_H_

#include <cuda_runtime_api.h>

#include <string>

#include "kernels/cuda/status.h"

namespace rapidin::gpu::internal {

inline Status FromCuda(cudaError_t e, const char* what) {
  if (e == cudaSuccess) return Status::Ok();
  Code code = Code::kInternal;
  switch (e) {
    case cudaErrorMemoryAllocation:
      code = Code::kResourceExhausted;
      break;
    case cudaErrorNoDevice:
    case cudaErrorInsufficientDriver:
    case cudaErrorInvalidDevice:
    case cudaErrorDevicesUnavailable:
    case cudaErrorInitializationError:
    case cudaErrorSystemDriverMismatch:
    case cudaErrorCompatNotSupportedOnDevice:
    case cudaErrorNoKernelImageForDevice:
      code = Code::kUnavailable;
      break;
    case cudaErrorInvalidValue:
      code = Code::kInvalidArgument;
      break;
    default:
      break;
  }
  return Status(code, std::string(what) + ": " + cudaGetErrorName(e) + " (" + cudaGetErrorString(e) + ")");
}

}  // namespace rapidin::gpu::internal

#define RAPIDIN_CUDA_RETURN_IF_ERROR(expr, what)                         \
  do {                                                                   \
    const cudaError_t rapidin_e_ = (expr);                               \
    if (rapidin_e_ != cudaSuccess) {                                     \
      return ::rapidin::gpu::internal::FromCuda(rapidin_e_, (what));     \
    }                                                                    \
  } while (0)

#endif  // RAPIDIN_KERNELS_CUDA_INTERNAL_CHECK_H_
