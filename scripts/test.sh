#!/usr/bin/env bash
# Configures and builds (at most 2 jobs) if needed, then runs every test with ctest.
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD_DIR="${BUILD_DIR:-build}"
if [ ! -f "$BUILD_DIR/CMakeCache.txt" ]; then
  BUILD_DIR="$BUILD_DIR" bash scripts/configure.sh
fi
cmake --build "$BUILD_DIR" -j 2
cd "$BUILD_DIR"
ctest --output-on-failure -j 2 "$@"
