#include "model/internal/device_sketch.h"

namespace rapidin::model::internal {

absl::StatusOr<std::unique_ptr<DeviceSketch>> MakeDeviceSketch(const kernels::RapidGrad&, int) {
  return std::unique_ptr<DeviceSketch>();  // no CUDA layer in this build
}

}  // namespace rapidin::model::internal
