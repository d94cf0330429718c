// RapidGrad on a GPU, bitwise equal to kernels::RapidGrad::Apply.
//
// The CPU sketch adds each input into its bin in input order; here each bin's inputs are listed in that same
// order (an inverse table built once from the CPU sketch) and one thread sums one bin, so the fp32 additions
// happen in the same order and round the same way. Thread-safety: Apply calls are serialised internally.
#ifndef RAPIDIN_KERNELS_CUDA_SKETCH_H_
#define RAPIDIN_KERNELS_CUDA_SKETCH_H_

#include <cstdint>
#include <memory>
#include <mutex>

#include "kernels/cuda/status.h"
#include "kernels/rapidgrad.h"

namespace rapidin::gpu {

class GpuSketch {
 public:
  // Uploads the inverse table of `sketch` to `device`.
  // Errors: kInvalidArgument (d >= 2^31), kResourceExhausted, kUnavailable (no usable device).
  static Status Create(const kernels::RapidGrad& sketch, int device, std::unique_ptr<GpuSketch>* out);
  ~GpuSketch();
  GpuSketch(const GpuSketch&) = delete;
  GpuSketch& operator=(const GpuSketch&) = delete;

  // out[b * k + i] = C(x_b)[i] for `batch` host vectors x (batch x d floats). Blocks until done.
  Status Apply(const float* x, int batch, float* out);
  // The same on device buffers, asynchronous on `stream` (a cudaStream_t).
  Status ApplyDevice(const float* device_x, int batch, float* device_out, void* stream);
  // Device input, host output; runs on the legacy default stream, so the input must be complete there (the
  // gradient engine waits for its device before handing rows over). Blocks until done.
  Status ApplyDeviceToHost(const float* device_x, int batch, float* out);

  int64_t d() const { return d_; }
  int64_t k() const { return k_; }

 private:
  GpuSketch() = default;
  Status Reserve(int batch, bool input);  // x_buf_ (when input) and out_buf_ for `batch` vectors; mu_ held
  Status SketchToHost(const float* device_x, int batch, float* out);  // through out_buf_; mu_ held
  int device_ = 0;
  int64_t d_ = 0, k_ = 0, bin_size_ = 0;
  uint32_t* entries_ = nullptr;  // bin_size x k
  std::mutex mu_;
  float* x_buf_ = nullptr;
  float* out_buf_ = nullptr;
  int batch_capacity_ = 0, input_capacity_ = 0;
};

}  // namespace rapidin::gpu

#endif  // RAPIDIN_KERNELS_CUDA_SKETCH_H_
