// The device sketch behind a CUDA-free interface: RapidGrad applied to gradient rows that live in a GPU's memory,
// so the featurizer never sees the CUDA layer. CMake links one of two implementations: device_sketch_cuda.cc
// (RAPIDIN_ENABLE_CUDA) or device_sketch_none.cc. No #if.
#ifndef RAPIDIN_MODEL_INTERNAL_DEVICE_SKETCH_H_
#define RAPIDIN_MODEL_INTERNAL_DEVICE_SKETCH_H_

#include <cstdint>
#include <memory>

#include "absl/status/statusor.h"
#include "kernels/rapidgrad.h"

namespace rapidin::model::internal {

class DeviceSketch {
 public:
  virtual ~DeviceSketch() = default;
  // out[i * k ...] = C(rows[i]) for n rows of device memory; out is host memory.
  virtual absl::Status Apply(const float* rows, int64_t n, float* out) const = 0;
};

// The sketch on CUDA device `device`, equal to `cpu`. Null (and OK) in a build without the CUDA layer: the
// gradients then come to the host and the CPU sketch runs.
absl::StatusOr<std::unique_ptr<DeviceSketch>> MakeDeviceSketch(const kernels::RapidGrad& cpu, int device);

}  // namespace rapidin::model::internal

#endif  // RAPIDIN_MODEL_INTERNAL_DEVICE_SKETCH_H_
