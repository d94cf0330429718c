#!/usr/bin/env bash
# Configures the build directory (BUILD_DIR, default build). The CUDA layer is on whenever nvcc is installed
# (/usr/local/cuda/bin/nvcc or CUDA_HOME), so every build also compiles and links the GPU code; its tests skip
# without a device. RAPIDIN_ENABLE_CUDA=OFF turns it off. Extra arguments go to cmake.
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD_DIR="${BUILD_DIR:-build}"
NVCC="${CUDA_HOME:-/usr/local/cuda}/bin/nvcc"
CUDA_ARGS=()
if [ "${RAPIDIN_ENABLE_CUDA:-auto}" != "OFF" ] && [ -x "$NVCC" ]; then
  CUDA_ARGS=(-DRAPIDIN_ENABLE_CUDA=ON -DCMAKE_CUDA_COMPILER="$NVCC" -DCMAKE_CUDA_ARCHITECTURES="${CUDA_ARCHS:-90}")
elif [ "${RAPIDIN_ENABLE_CUDA:-auto}" = "ON" ]; then
  echo "configure: RAPIDIN_ENABLE_CUDA=ON but $NVCC is missing" >&2
  exit 2
fi
cmake -S . -B "$BUILD_DIR" -G Ninja -DCMAKE_BUILD_TYPE=Release -DRAPIDIN_BUILD_TESTS=ON "${CUDA_ARGS[@]}" "$@"
