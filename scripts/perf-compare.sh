#!/usr/bin/env bash
# Performance of two builds side by side in one run (refactors, issue 15): caching records/s, and the latency of a
# text query and of a query by vector through the CLI (gRPC), on the demo's data. The builds alternate
# (before, after, before, after) so that drift on a shared machine hits both.
#   bash scripts/perf-compare.sh BEFORE_DIR AFTER_DIR     (each DIR holds rapidin and rapidin-server)
# Prints a table; N records (default 400), Q queries per kind and round (default 20).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/two-builds.sh
N=${N:-400}; Q=${Q:-20}; PORT=${PORT:-50933}
random_vector 3 "$WORK/vector.jsonl"

round() {  # label dir
  local label=$1 bin=$2
  rm -rf "$WORK/store"
  "$bin/rapidin" cache --model "$MODEL" --data "$TRAIN" --store "$WORK/store" --k 4096 --threads 2 --limit "$N" \
    --json 2> /dev/null | python3 -c "import json,sys; print('$label cache', json.load(sys.stdin)['records_per_second'])"
  serve "$bin" "$WORK/store" "$PORT"
  python3 - "$label" "$bin/rapidin" "127.0.0.1:$PORT" "$Q" "$WORK/vector.jsonl" <<'PY'
import subprocess, sys, time
label, cli, server, q, vec = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
kinds = {
    "text": [cli, "query", "--server", server, "--json", "--ids-only", "--top-k", "10", "--instruction",
             "Give three tips for staying healthy.", "--generation",
             "1. Eat a balanced diet. 2. Exercise regularly. 3. Get enough sleep."],
    "vector": [cli, "query", "--server", server, "--json", "--ids-only", "--top-k", "10", "--vector-file", vec],
}
for kind, cmd in kinds.items():
    for _ in range(q):
        t = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        print(label, kind, (time.perf_counter() - t) * 1000)
PY
  kill "$SRV"; wait "$SRV" 2> /dev/null || true
}

for r in 1 2; do
  round before "$1"
  round after "$2"
done > "$WORK/samples.txt"
python3 - "$WORK/samples.txt" "$N" <<'PY'
import statistics, sys
rows = [l.split() for l in open(sys.argv[1])]
def vals(label, kind):
    return [float(r[2]) for r in rows if r[0] == label and r[1] == kind]
print(f"| measure (N={sys.argv[2]} records) | before | after | after/before |")
print("|---|---|---|---|")
for kind, name, f in (("cache", "caching, records/s (mean of 2)", statistics.mean),
                      ("text", "text query, CLI wall ms (median)", statistics.median),
                      ("vector", "query by vector, CLI wall ms (median)", statistics.median)):
    b, a = f(vals("before", kind)), f(vals("after", kind))
    print(f"| {name} | {b:.1f} | {a:.1f} | {a / b:.3f} |")
PY
