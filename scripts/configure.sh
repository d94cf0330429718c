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
# TORCH_PREFIX: another LibTorch (a PyTorch install's torch/ folder, for a CUDA build) instead of Debian's. Its
# CMake files search the system paths first, so each of its pieces is named; the NVIDIA libraries it loads are
# found at run time through its own RPATH (pip's nvidia-* packages), so the link does not look for them. PyTorch's
# libtorch.so also exports a private copy of std::filesystem that crashes when called from outside: the system
# libstdc++ goes first in the link, so that rapidin's calls bind to it.
TORCH_ARGS=()
if [ -n "${TORCH_PREFIX:-}" ]; then
  TORCH_ARGS=(-DTorch_DIR="$TORCH_PREFIX/share/cmake/Torch" -DCaffe2_DIR="$TORCH_PREFIX/share/cmake/Caffe2"
              -Dc10_LIBRARY="$TORCH_PREFIX/lib/libc10.so" -DTORCH_LIBRARY="$TORCH_PREFIX/lib/libtorch.so"
              "-DCMAKE_EXE_LINKER_FLAGS=-Wl,--allow-shlib-undefined -Wl,--no-as-needed -lstdc++ -Wl,--as-needed"
              # its CMake files replace CMAKE_CUDA_ARCHITECTURES for every CUDA file by this list (H100/H200: 9.0)
              "-DTORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}")
fi
cmake -S . -B "$BUILD_DIR" -G Ninja -DCMAKE_BUILD_TYPE=Release -DRAPIDIN_BUILD_TESTS=ON "${CUDA_ARGS[@]}" \
  "${TORCH_ARGS[@]}" "$@"
