#!/usr/bin/env bash
# The one GPU entry point.
#   scripts/gpu-check.sh pack       on the build machine: builds what needs the Debian libraries against a CUDA
#                                   LibTorch and packs it in .gpu-deps/ (scripts/internal/gpu-pack.sh)
#   scripts/gpu-check.sh [--quick]  on the GPU machine (carry .gpu-carry): every check below
#   scripts/gpu-check.sh e2e BIN DATA OUT
#                                   only the service on the GPU against the CPU (scripts/internal/gpu-server-e2e.sh;
#                                   GPU_DEVICE=cpu GPU_BACKEND=cpu runs it without a GPU, as a check of the script)
#
# All GPU checks in one call: builds the CUDA layer on its own (RAPIDIN_GPU_ONLY: no Debian libraries needed),
# runs the GPU tests (ctest label "gpu"), compute-sanitizer's memcheck on them when it is installed, and the GPU
# benchmark, then prints a short table. When .gpu-deps/pack holds what `pack` packs on the build machine, it also
# runs the CUDA query backend against the CPU one, and, when python3's torch is the version those were built
# against, the gradient engine on the GPU against the CPU, the gradient benchmark on each device, and the
# service end to end on the GPU against the CPU (`e2e`).
#
# Needs nvcc, cmake, a C++17 compiler and GoogleTest: installed, or its sources in GTEST_SOURCE_DIR (default:
# /usr/src/googletest, then .gpu-deps/googletest). NCCL is used when found (NCCL_HOME, the CUDA toolkit, or
# Python's nvidia-nccl package). Options: --quick (small benchmark), BUILD=<dir>, OUT=<dir for logs>.
set -euo pipefail
here=$(dirname "$0")
case "${1:-}" in
  pack) shift; exec bash "$here/internal/gpu-pack.sh" "$@" ;;
  e2e) shift; exec bash "$here/internal/gpu-server-e2e.sh" "$@" ;;
  ""|--quick) ;;
  *) echo "usage: scripts/gpu-check.sh [--quick] | pack | e2e BIN_DIR DATA_DIR OUT_DIR" >&2; exit 2 ;;
esac
cd "$here/.."
# The pack travels compressed (scripts/internal/gpu-pack.sh): unpack it once.
if [[ -f .gpu-carry/gpudeps.tar.xz && ! -d .gpu-deps/pack ]]; then tar -xJf .gpu-carry/gpudeps.tar.xz; fi
QUICK=""
[[ "${1:-}" == "--quick" ]] && QUICK="--quick"
BUILD=${BUILD:-build-gpu-check}
LOG=${OUT:-$BUILD}
mkdir -p "$BUILD" "$LOG"

NVCC=${NVCC:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}
[[ -x "$NVCC" ]] || { echo "gpu-check: nvcc not found (set NVCC)" >&2; exit 2; }
GTEST_SRC=${GTEST_SOURCE_DIR:-}
for d in /usr/src/googletest .gpu-deps/googletest; do
  [[ -z "$GTEST_SRC" && -f "$d/CMakeLists.txt" ]] && GTEST_SRC=$(realpath "$d")
done
if [[ -z "${NCCL_HOME:-}" ]]; then
  NCCL_HOME=$(python3 -c 'import nvidia.nccl as m; print(list(m.__path__)[0])' 2>/dev/null || true)
fi
export NCCL_HOME
ARCH=${CUDA_ARCH:-$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d '. ' || true)}
ARCH=${ARCH:-90}
GEN=()
command -v ninja >/dev/null && GEN=(-G Ninja)

echo "== configure (CUDA arch $ARCH, GoogleTest ${GTEST_SRC:-installed}, NCCL_HOME=${NCCL_HOME:-none})"
cmake -S . -B "$BUILD" "${GEN[@]}" -DRAPIDIN_GPU_ONLY=ON -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_CUDA_COMPILER="$NVCC" -DCMAKE_CUDA_ARCHITECTURES="$ARCH" ${GTEST_SRC:+-DGTEST_SOURCE_DIR="$GTEST_SRC"} \
  >"$LOG/configure.log" 2>&1 || { tail -30 "$LOG/configure.log"; exit 1; }
grep -E "NCCL" "$LOG/configure.log" || true
echo "== build"
cmake --build "$BUILD" -j "$(nproc)" >"$LOG/build.log" 2>&1 || { tail -40 "$LOG/build.log"; exit 1; }

echo "== GPU tests"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
test_rc=0
ctest --test-dir "$BUILD" -L gpu --output-on-failure -j 1 >"$LOG/tests.log" 2>&1 || test_rc=$?
grep -E "tests passed|Skipped|Failed|\*\*\*" "$LOG/tests.log" | tail -20

san_rc=skipped
if command -v compute-sanitizer >/dev/null; then
  echo "== compute-sanitizer memcheck"
  if compute-sanitizer --tool memcheck --report-api-errors no --error-exitcode 9 "$BUILD/tests/gpu/gpu_kernels_test" \
       >"$LOG/memcheck.log" 2>&1; then san_rc=0; else san_rc=$?; fi
  grep -E "ERROR SUMMARY|PASSED|FAILED" "$LOG/memcheck.log" | tail -5
fi

# Packed by `scripts/gpu-check.sh pack` on the build machine: binaries that need the Debian libraries (in
# .gpu-deps/pack/lib) and, for the gradient engine, python3's torch of the version they were built against.
PACK=$PWD/.gpu-deps/pack
backend_rc=skipped
model_rc=skipped
host_rc=skipped
gradbench_rc=skipped
e2e_rc=skipped
if [[ -x $PACK/gpu_backend_test ]]; then
  cuda_lib=$(dirname "$(dirname "$(realpath "$NVCC")")")/lib64
  libs=$PACK/lib:$cuda_lib${NCCL_HOME:+:$NCCL_HOME/lib}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
  echo "== CUDA backend against the CPU backend (gpu_backend_test)"
  if LD_LIBRARY_PATH=$libs "$PACK/gpu_backend_test" >"$LOG/backend.log" 2>&1; then backend_rc=0; else backend_rc=$?; fi
  grep -E "^\[  (PASSED|FAILED|SKIPPED) " "$LOG/backend.log" | tail -5

  packed=$(cat "$PACK/TORCH_VERSION")
  torch_info=$(python3 -c 'import os, torch; print(torch.__version__, os.path.dirname(torch.__file__))' 2>/dev/null \
               || true)
  torch_version=${torch_info%% *}
  torch_dir=${torch_info#* }
  if [[ -z "$torch_info" ]]; then
    echo "python3 has no torch here: the gradient engine's checks are skipped"
    model_rc="skipped (no torch)"
  elif [[ "$torch_version" != "$packed" ]]; then
    echo "packed against LibTorch $packed, but python3's torch is $torch_version: skipped (repack with TORCH_VERSION)"
    model_rc="skipped (torch $torch_version)"
  else
    libs=$PACK/lib:$torch_dir/lib:$libs  # torch/lib finds its NVIDIA libraries through its own RPATH
    echo "== gradient engine on the GPU against the CPU (model_gpu_test)"
    if LD_LIBRARY_PATH=$libs RAPIDIN_SHARED_DATA=$PACK/data RAPIDIN_FIXTURES=$PWD/tests/fixtures \
       "$PACK/model_gpu_test" >"$LOG/model_gpu.log" 2>&1; then
      model_rc=0
    else
      model_rc=$?
    fi
    grep -E "^\[  (PASSED|FAILED|SKIPPED) |^\[       OK \]" "$LOG/model_gpu.log" | tail -8
    # The hand-written CPU passes on this host's CPU (its own SIMD level) with this LibTorch and its BLAS.
    echo "== CPU token gradients on this host ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)," \
      "$(grep -o -m1 -w avx512f /proc/cpuinfo || echo 'no avx512f'))"
    if LD_LIBRARY_PATH=$libs "$PACK/token_grads_test" >"$LOG/token_grads.log" 2>&1; then host_rc=0; else host_rc=$?; fi
    grep -E "^\[  (PASSED|FAILED|SKIPPED) |Failure" "$LOG/token_grads.log" | tail -6
    echo "== gradients on each device (grad_bench)"
    gradbench_rc=0
    sizes=(--records 16 --token-positions 32)
    [[ -n "$QUICK" ]] && sizes=(--records 4 --token-positions 8)
    for lora in 0 16; do
      # float64 on the CPU first: both float32 devices are then compared with it (what rounding alone gives)
      LD_LIBRARY_PATH=$libs "$PACK/grad_bench" --devices cpu64,cpu,cuda "${sizes[@]}" --lora $lora \
        | tee -a "$LOG/grad_bench.md" || gradbench_rc=$?
      echo | tee -a "$LOG/grad_bench.md"
    done
    if [[ -f $PACK/data/instructions/alpaca_5000.json ]]; then
      echo "== the service on the GPU against the service on the CPU (e2e)"
      n_e2e=$([[ -n "$QUICK" ]] && echo 200 || echo 500)
      if LD_LIBRARY_PATH=$libs N=$n_e2e bash scripts/internal/gpu-server-e2e.sh "$PACK" \
           "$PACK/data" "$LOG/e2e" | tee "$LOG/e2e.md"; then e2e_rc=0; else e2e_rc=$?; fi
    fi
  fi
fi

echo "== GPU benchmark"
bench_rc=0
"$BUILD/bench/gpu/gpu_bench" $QUICK | tee "$LOG/gpu_bench.md" || bench_rc=$?

echo
echo "| check | result |"
echo "|---|---|"
echo "| GPU tests (ctest -L gpu) | $( [[ $test_rc == 0 ]] && echo pass || echo "FAIL ($test_rc)") $(grep -Eo '[0-9]+% tests passed.*' "$LOG/tests.log" | tail -1) |"
echo "| memcheck | $san_rc |"
echo "| CUDA backend vs CPU backend (gpu_backend_test) | $backend_rc |"
echo "| gradient engine, GPU vs CPU (model_gpu_test) | $model_rc |"
echo "| CPU token gradients on the host (token_grads_test) | $host_rc |"
echo "| gradients per device (grad_bench) | $gradbench_rc |"
echo "| service on the GPU vs on the CPU (gpu-server-e2e) | $e2e_rc |"
echo "| benchmark | $( [[ $bench_rc == 0 ]] && echo done || echo "FAIL ($bench_rc)") |"
[[ $test_rc == 0 && $bench_rc == 0 && ( $san_rc == 0 || $san_rc == skipped ) && \
   ( $backend_rc == 0 || $backend_rc == skipped ) && ( $model_rc == 0 || $model_rc == skipped* ) && \
   ( $host_rc == 0 || $host_rc == skipped ) && ( $gradbench_rc == 0 || $gradbench_rc == skipped ) && ( $e2e_rc == 0 || $e2e_rc == skipped ) ]]
