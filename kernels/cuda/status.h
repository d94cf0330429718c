// Errors of the GPU layer. Every CUDA, CUB and NCCL failure is returned as a Status (never an abort or exit).
//
// This layer has no Abseil dependency so it builds on a GPU machine that has only the CUDA toolkit
// (scripts/gpu-check.sh); kernels/cuda/absl_status.h maps a gpu::Status to an absl::Status with the same meaning,
// for query/ and model/. A Status is a value: thread-compatible.
#ifndef RAPIDIN_KERNELS_CUDA_STATUS_H_
#define RAPIDIN_KERNELS_CUDA_STATUS_H_

#include <string>
#include <utility>

namespace rapidin::gpu {

enum class Code {
  kOk = 0,
  kInvalidArgument,     // bad sizes or pointers from the caller
  kResourceExhausted,   // device or pinned memory could not be allocated
  kUnavailable,         // no driver, no device, or the device is unusable
  kInternal,            // any other CUDA / NCCL failure (the message names the call)
};

class Status {
 public:
  Status() = default;
  Status(Code code, std::string message) : code_(code), message_(std::move(message)) {}
  static Status Ok() { return Status(); }

  bool ok() const { return code_ == Code::kOk; }
  Code code() const { return code_; }
  const std::string& message() const { return message_; }
  std::string ToString() const;

 private:
  Code code_ = Code::kOk;
  std::string message_;
};

}  // namespace rapidin::gpu

#endif  // RAPIDIN_KERNELS_CUDA_STATUS_H_
