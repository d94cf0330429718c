// The CUDA ScanBackend (gpu::Scanner behind the seam). Built only with RAPIDIN_ENABLE_CUDA; reached through
// query/backend.h's factory, never included elsewhere.
#ifndef RAPIDIN_QUERY_INTERNAL_CUDA_BACKEND_H_
#define RAPIDIN_QUERY_INTERNAL_CUDA_BACKEND_H_

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "query/backend.h"

namespace rapidin::query::internal {

absl::StatusOr<std::unique_ptr<ScanBackend>> MakeCudaBackend(const storage::Store* store, const BackendOptions& o);
absl::Status CudaDevices(std::string* description);
storage::internal::HostAllocator PinnedHostAllocator();

}  // namespace rapidin::query::internal

#endif  // RAPIDIN_QUERY_INTERNAL_CUDA_BACKEND_H_
