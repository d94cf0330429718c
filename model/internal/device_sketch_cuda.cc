#include "kernels/cuda/absl_status.h"
#include "kernels/cuda/sketch.h"
#include "model/internal/device_sketch.h"

namespace rapidin::model::internal {
namespace {

class CudaSketch : public DeviceSketch {
 public:
  explicit CudaSketch(std::unique_ptr<gpu::GpuSketch> s) : s_(std::move(s)) {}
  absl::Status Apply(const float* rows, int64_t n, float* out) const override {
    return gpu::ToAbsl(s_->ApplyDeviceToHost(rows, static_cast<int>(n), out));
  }

 private:
  std::unique_ptr<gpu::GpuSketch> s_;
};

}  // namespace

absl::StatusOr<std::unique_ptr<DeviceSketch>> MakeDeviceSketch(const kernels::RapidGrad& cpu, int device) {
  std::unique_ptr<gpu::GpuSketch> s;
  absl::Status st = gpu::ToAbsl(gpu::GpuSketch::Create(cpu, device, &s));
  if (!st.ok()) return st;
  return std::unique_ptr<DeviceSketch>(new CudaSketch(std::move(s)));
}

}  // namespace rapidin::model::internal
