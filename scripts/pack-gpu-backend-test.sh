#!/usr/bin/env bash
# Packs tests/gpu/gpu_backend_test (the CUDA query-engine backend against the CPU one: tiers, ingest, cold rows)
# for a GPU machine that has none of the Debian libraries: the binary plus its shared-library closure, without
# glibc, libstdc++, libgcc and NCCL (the GPU machine has its own), in .gpu-deps/backend/. scripts/gpu-check.sh
# runs it there when present. Build first (scripts/setup.sh; CUDA is on when nvcc exists).
# Usage: scripts/pack-gpu-backend-test.sh [BUILD_DIR]   (carry .gpu-deps to the GPU machine)
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD_DIR=${1:-${BUILD_DIR:-build}}
BIN="$BUILD_DIR/tests/gpu/gpu_backend_test"
[[ -x "$BIN" ]] || { echo "pack: $BIN not built (is CUDA on in $BUILD_DIR?)" >&2; exit 1; }
OUT=.gpu-deps/backend
rm -rf "$OUT" && mkdir -p "$OUT/lib"
cp "$BIN" "$OUT/"
ldd "$BIN" | awk '$3 ~ /^\// {print $3}' | while read -r lib; do
  case "$(basename "$lib")" in
    libc.so.*|libm.so.*|libstdc++.so.*|libgcc_s.so.*|libpthread.so.*|libdl.so.*|librt.so.*|ld-linux*|libnccl.so.*) ;;
    *) cp -L "$lib" "$OUT/lib/" ;;
  esac
done
echo "packed $(ls "$OUT/lib" | wc -l) libraries, $(du -sh "$OUT" | cut -f1) in $OUT"
