#!/usr/bin/env bash
# Builds what needs the Debian libraries for the GPU machine, which has none of them, against a CUDA LibTorch
# (PyTorch's, the same version as the GPU machine's python3 torch: Debian's LibTorch is CPU-only), and packs it in
# .gpu-deps/pack/: tests/gpu/gpu_backend_test (CUDA query backend against the CPU one), tests/gpu/model_gpu_test
# (gradient engine on the GPU against the CPU), bench/grad_bench, rapidin-server and rapidin (for
# the e2e check); their Debian shared-library closure (without LibTorch, CUDA and NVIDIA libraries,
# which come from the GPU machine, nor glibc and libstdc++); and, when the shared data is here, stories260K, its
# tokenizer and alpaca_5000.json. scripts/gpu-check.sh runs them there when present. Run as `scripts/gpu-check.sh pack`.
#
# TORCH_PREFIX: a torch/ folder (include/, lib/, share/cmake/) to build against. Without it, the torch wheel of
# TORCH_VERSION (default 2.11.0, CUDA 13.0 on PyPI: the GPU machine's) is fetched with pip and unpacked under
# build-torchcuda/. Then carry .gpu-carry (the pack as .gpu-carry/gpudeps.tar.xz) to the GPU machine.
set -euo pipefail
cd "$(dirname "$0")/../.."
BUILD_DIR=${BUILD_DIR:-build-torchcuda}
TORCH_VERSION=${TORCH_VERSION:-2.11.0}
if [[ -z "${TORCH_PREFIX:-}" ]]; then
  TORCH_PREFIX=$PWD/$BUILD_DIR/torch-$TORCH_VERSION/torch
  if [[ ! -f "$TORCH_PREFIX/share/cmake/Torch/TorchConfig.cmake" ]]; then
    wheels=$PWD/$BUILD_DIR/wheels
    mkdir -p "$wheels"
    echo "pack: fetching the torch $TORCH_VERSION wheel (about 530 MB)"
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 -d "$wheels" "torch==$TORCH_VERSION"
    mkdir -p "$(dirname "$TORCH_PREFIX")"
    unzip -q -o "$wheels"/torch-"$TORCH_VERSION"-*.whl 'torch/include/*' 'torch/lib/*' 'torch/share/*' \
      'torch/version.py' -d "$(dirname "$TORCH_PREFIX")"
  fi
fi
[[ -f "$TORCH_PREFIX/lib/libtorch_cuda.so" ]] || { echo "pack: $TORCH_PREFIX has no libtorch_cuda.so" >&2; exit 1; }
built_version=$(sed -n "s/^__version__ = '\(.*\)'/\1/p" "$TORCH_PREFIX/version.py" 2>/dev/null || true)

echo "pack: building against LibTorch ${built_version:-?} in $TORCH_PREFIX"
mkdir -p "$BUILD_DIR"
# Test binaries here cannot run (no CUDA libraries): list their tests when ctest runs, not after the link.
BUILD_DIR=$BUILD_DIR TORCH_PREFIX=$TORCH_PREFIX bash scripts/configure.sh -DCMAKE_GTEST_DISCOVER_TESTS_DISCOVERY_MODE=PRE_TEST \
  >"$BUILD_DIR/rapidin-configure.log" 2>&1 \
  || { tail -30 "$BUILD_DIR/rapidin-configure.log"; exit 1; }
BINS=(tests/gpu/gpu_backend_test tests/gpu/model_gpu_test tests/token_grads_test bench/grad_bench server/rapidin-server
      client/rapidin)
cmake --build "$BUILD_DIR" -j 2 --target $(for b in "${BINS[@]}"; do basename "$b"; done)

OUT=.gpu-deps/pack
rm -rf "$OUT" && mkdir -p "$OUT/lib" "$OUT/data/models" "$OUT/data/instructions"
for b in "${BINS[@]}"; do cp "$BUILD_DIR/$b" "$OUT/"; done
echo "$built_version" >"$OUT/TORCH_VERSION"
for b in "${BINS[@]}"; do
  bin=$OUT/$(basename "$b")
  ldd "$bin" | awk '$3 ~ /^\// {print $3}'
done | sort -u | while read -r lib; do
  case "$(basename "$lib")" in
    libc.so.*|libm.so.*|libstdc++.so.*|libgcc_s.so.*|libpthread.so.*|libdl.so.*|librt.so.*|libutil.so.*|ld-linux*) ;;
    libtorch*|libc10*|libgomp*|libcaffe2*|libcu*|libnv*|libnccl*|libcudnn*|libcufile*) ;;  # the GPU machine's
    *) cp -L "$lib" "$OUT/lib/" ;;
  esac
done
strip --strip-unneeded "$OUT"/lib/*.so* 2>/dev/null || true
for b in "${BINS[@]}"; do strip --strip-unneeded "$OUT/$(basename "$b")"; done
DATA=${RAPIDIN_SHARED_DATA:-../shared/data}
if [[ -f "$DATA/models/stories260K.bin" ]]; then
  cp "$DATA/models/stories260K.bin" "$DATA/models/tok512.bin" "$OUT/data/models/"
  cp "$DATA/instructions/alpaca_5000.json" "$OUT/data/instructions/"
else
  echo "pack: no shared data at $DATA: the stories260K comparison and the server run will skip"
fi
# GoogleTest's sources, for gpu-check.sh's own build of the CUDA layer (the GPU machine has none).
if [[ ! -f .gpu-deps/googletest/CMakeLists.txt && -f /usr/src/googletest/CMakeLists.txt ]]; then
  cp -r /usr/src/googletest .gpu-deps/googletest
fi
# The device tool carries at most 64 MiB: the pack travels as one xz archive, which gpu-check.sh unpacks.
mkdir -p .gpu-carry
tar -cf - .gpu-deps | xz -T2 -6 >.gpu-carry/gpudeps.tar.xz
echo "pack: $(ls "$OUT/lib" | wc -l) libraries, $(du -sh "$OUT" | cut -f1) in $OUT (LibTorch ${built_version:-?});" \
  "carry .gpu-carry ($(du -sh .gpu-carry | cut -f1)) and run: bash scripts/gpu-check.sh"
