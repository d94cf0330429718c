#!/usr/bin/env bash
# Installs every Debian package the build needs, then configures and builds (at most 2 jobs).
# Usage: scripts/setup.sh [--no-build] [extra cmake args...]
set -euo pipefail
cd "$(dirname "$0")/.."

# python3-grpcio/python3-protobuf: tests/python_client_test.py (the API from Python); python3-yaml:
# tests/deploy_test.py (the manifests against the binaries). Neither is part of the C++ build.
# OpenBLAS: the pthread build, not the serial one. The serial build is not safe to call from several threads at
# once (measured here: concurrent gradient passes returned wrong values); rapidin sets it to one BLAS thread and
# parallelises over records/tokens itself.
PKGS=(
  build-essential cmake ninja-build pkg-config git ca-certificates clang
  libgrpc++-dev libgrpc-dev protobuf-compiler-grpc libprotobuf-dev protobuf-compiler
  libtorch-dev libopenblas0-pthread
  librocksdb-dev libabsl-dev prometheus-cpp-dev zlib1g-dev
  libgtest-dev libgmock-dev libbenchmark-dev
  libcli11-dev libspdlog-dev libfmt-dev nlohmann-json3-dev libsentencepiece-dev libpcre2-dev libicu-dev
  libfaiss-dev libcpp-httplib-dev libtbb-dev
  python3-grpcio python3-protobuf python3-yaml
)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "[setup] installing ${#missing[@]} Debian packages: ${missing[*]}"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

[ "${1:-}" = "--no-build" ] && exit 0

BUILD_DIR="${BUILD_DIR:-build}"
BUILD_DIR="$BUILD_DIR" bash scripts/configure.sh "$@"
cmake --build "$BUILD_DIR" -j 2
