#!/usr/bin/env bash
# Clang's thread-safety analysis over the sources whose state is guarded by absl::Mutex (ABSL_GUARDED_BY,
# ABSL_EXCLUSIVE_LOCKS_REQUIRED): each file is compiled with clang++ -fsyntax-only -Wthread-safety
# -Werror=thread-safety, using the flags of the build's compile_commands.json. GCC ignores the annotations, so this
# is what checks them. Exit 0 when every file is clean, 1 on a finding, 77 (skip) without clang++ or a configured
# build. Usage: scripts/thread-safety.sh [BUILD_DIR] (default build/).
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD=${1:-build}
CLANG=${CLANG:-$(command -v clang++ || true)}
[[ -n "$CLANG" ]] || { echo "thread-safety: no clang++ here (apt install clang): skipped"; exit 77; }
[[ -f "$BUILD/compile_commands.json" ]] || { echo "thread-safety: no $BUILD/compile_commands.json: skipped"; exit 77; }
# Every translation unit that declares or takes an absl::Mutex outside kernels/cuda/ (which has no Abseil; its
# std::mutex sections are short and local). The LibTorch ones (model/engine.cc, training.cc) take ~20 s each.
FILES=(storage/store.cc query/query_engine.cc query/backend.cc query/internal/cuda_backend.cc server/server.cc
       server/internal/router.cc server/internal/service.cc server/metrics.cc model/featurizer.cc model/engine.cc
       model/training.cc tests/base_test.cc)
python3 - "$BUILD/compile_commands.json" "$CLANG" "${FILES[@]}" <<'PY'
import json, os, shlex, subprocess, sys
db, clang, files = sys.argv[1], sys.argv[2], sys.argv[3:]
cmds = {os.path.realpath(e["file"]): e for e in json.load(open(db))}
bad = 0
for f in files:
    e = cmds.get(os.path.realpath(f))
    if e is None:
        print(f"thread-safety: {f} is not in the build (skipped)")
        continue
    args = shlex.split(e["command"]) if "command" in e else e["arguments"]
    keep, skip = [], False
    for a in args[1:]:
        if skip:
            skip = False
            continue
        if a in ("-o", "-c"):
            skip = a == "-o"
            continue
        if a.startswith("-O") or a == os.path.realpath(f) or a == e["file"]:
            continue
        keep.append(a)
    cmd = [clang, "-fsyntax-only", "-Wthread-safety", "-Werror=thread-safety", "-Wno-unknown-warning-option"] + keep \
          + [os.path.realpath(f)]
    r = subprocess.run(cmd, cwd=e["directory"], capture_output=True, text=True)
    findings = [l for l in r.stderr.splitlines() if "thread-safety" in l or "error:" in l]
    print(f"thread-safety: {f}: {'clean' if r.returncode == 0 else 'FAILED'}")
    if r.returncode != 0:
        bad += 1
        print("\n".join(findings[:40]) or r.stderr[-3000:])
sys.exit(1 if bad else 0)
PY
