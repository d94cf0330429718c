#include "kernels/cuda/sketch.h"

#include <cuda_runtime_api.h>

#include <vector>

#include "kernels/cuda/internal/check.h"
#include "kernels/cuda/launch.h"

namespace rapidin::gpu {

Status GpuSketch::Create(const kernels::RapidGrad& sketch, int device, std::unique_ptr<GpuSketch>* out) {
  const int64_t d = sketch.params().d, k = sketch.params().k, bs = sketch.bin_size();
  if (d >= (int64_t{1} << 31)) {
    return Status(Code::kInvalidArgument, "GpuSketch: d must be below 2^31, got " + std::to_string(d));
  }
  RAPIDIN_CUDA_RETURN_IF_ERROR(cudaSetDevice(device), "cudaSetDevice");
  // Counting sort by bin, visiting inputs in increasing order: each bin lists its inputs in the CPU's order.
  std::vector<uint32_t> entries(static_cast<size_t>(bs) * k, 0xffffffffu);
  std::vector<int64_t> fill(k, 0);
  for (int64_t i = 0; i < d; ++i) {
    const int64_t j = sketch.Permute(i);
    const int64_t bin = j / bs;
    const uint32_t neg = sketch.Sign(j) < 0 ? 1u : 0u;
    entries[static_cast<size_t>(fill[bin]++) * k + bin] = static_cast<uint32_t>(i) << 1 | neg;
  }
  std::unique_ptr<GpuSketch> g(new GpuSketch());
  g->device_ = device;
  g->d_ = d;
  g->k_ = k;
  g->bin_size_ = bs;
  RAPIDIN_CUDA_RETURN_IF_ERROR(cudaMalloc(reinterpret_cast<void**>(&g->entries_), entries.size() * sizeof(uint32_t)), "GpuSketch table");
  RAPIDIN_CUDA_RETURN_IF_ERROR(
      cudaMemcpy(g->entries_, entries.data(), entries.size() * sizeof(uint32_t), cudaMemcpyHostToDevice),
      "GpuSketch table upload");
  *out = std::move(g);
  return Status::Ok();
}

GpuSketch::~GpuSketch() {
  if (cudaSetDevice(device_) != cudaSuccess) return;
  cudaFree(entries_);
  cudaFree(x_buf_);
  cudaFree(out_buf_);
}

Status GpuSketch::ApplyDevice(const float* device_x, int batch, float* device_out, void* stream) {
  RAPIDIN_CUDA_RETURN_IF_ERROR(cudaSetDevice(device_), "cudaSetDevice");
  RAPIDIN_CUDA_RETURN_IF_ERROR(LaunchSketch(entries_, bin_size_, k_, device_x, d_, batch, device_out,
                                            static_cast<cudaStream_t>(stream)),
                               "LaunchSketch");
  return Status::Ok();
}

namespace {

// Makes *buf hold at least `batch` vectors of `width` floats (reallocated, contents dropped, when it grows).
Status Grow(float** buf, int* capacity, int batch, int64_t width, const char* what) {
  if (batch <= *capacity) return Status::Ok();
  cudaFree(*buf);
  *buf = nullptr;
  *capacity = 0;
  RAPIDIN_CUDA_RETURN_IF_ERROR(
      cudaMalloc(reinterpret_cast<void**>(buf), static_cast<size_t>(batch) * width * sizeof(float)), what);
  *capacity = batch;
  return Status::Ok();
}

}  // namespace

Status GpuSketch::Reserve(int batch, bool input) {
  if (input) {
    if (Status st = Grow(&x_buf_, &input_capacity_, batch, d_, "GpuSketch input buffer"); !st.ok()) return st;
  }
  return Grow(&out_buf_, &batch_capacity_, batch, k_, "GpuSketch output buffer");
}

Status GpuSketch::SketchToHost(const float* device_x, int batch, float* out) {
  // On the legacy default stream: ordered after the producer's work there; cudaMemcpy waits for the kernel.
  RAPIDIN_CUDA_RETURN_IF_ERROR(LaunchSketch(entries_, bin_size_, k_, device_x, d_, batch, out_buf_, nullptr),
                               "LaunchSketch");
  RAPIDIN_CUDA_RETURN_IF_ERROR(
      cudaMemcpy(out, out_buf_, static_cast<size_t>(batch) * k_ * sizeof(float), cudaMemcpyDeviceToHost),
      "download");
  return Status::Ok();
}

Status GpuSketch::Apply(const float* x, int batch, float* out) {
  if (batch < 1) return Status(Code::kInvalidArgument, "GpuSketch::Apply: batch must be >= 1");
  std::lock_guard<std::mutex> l(mu_);
  RAPIDIN_CUDA_RETURN_IF_ERROR(cudaSetDevice(device_), "cudaSetDevice");
  if (Status st = Reserve(batch, /*input=*/true); !st.ok()) return st;
  RAPIDIN_CUDA_RETURN_IF_ERROR(
      cudaMemcpy(x_buf_, x, static_cast<size_t>(batch) * d_ * sizeof(float), cudaMemcpyHostToDevice), "upload");
  return SketchToHost(x_buf_, batch, out);
}

Status GpuSketch::ApplyDeviceToHost(const float* device_x, int batch, float* out) {
  if (batch < 1) return Status(Code::kInvalidArgument, "GpuSketch::ApplyDeviceToHost: batch must be >= 1");
  std::lock_guard<std::mutex> l(mu_);
  RAPIDIN_CUDA_RETURN_IF_ERROR(cudaSetDevice(device_), "cudaSetDevice");
  if (Status st = Reserve(batch, /*input=*/false); !st.ok()) return st;
  return SketchToHost(device_x, batch, out);
}

}  // namespace rapidin::gpu
