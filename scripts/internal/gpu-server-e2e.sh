#!/usr/bin/env bash
# The service end to end on a GPU, against the same service on the CPU: caches the first N Alpaca records with
# stories260K twice (gradients on the CPU, and on GPU_DEVICE), checks that both stores have the same projection
# state, starts one rapidin-server per store (CPU: --backend cpu --model-device cpu; GPU: --backend GPU_BACKEND
# --model-device GPU_DEVICE, and a host budget that leaves most rows in the cold tier), asks both the same question
# by text with token attributions, and compares: the same top records (a swap only between near-equal scores),
# scores within 1e-3, the GPU server's Stats showing its vectors in GPU memory. Prints a table. scripts/gpu-check.sh
# runs it from the packed binaries.
# Usage: scripts/gpu-check.sh e2e BIN_DIR DATA_DIR OUT_DIR   (env: N=300, GPU_DEVICE=cuda, GPU_BACKEND=cuda; on a
#        machine without a GPU, GPU_DEVICE=cpu GPU_BACKEND=cpu runs the same comparison as a check of this script)
set -euo pipefail
BIN=$1 DATA=$2 OUT=$3
N=${N:-300}
GPU_DEVICE=${GPU_DEVICE:-cuda}
GPU_BACKEND=${GPU_BACKEND:-cuda}
GPU_HOST_BUDGET_MB=${GPU_HOST_BUDGET_MB:-1}  # the GPU server leaves the rows beyond this on disk (the cold tier)
PY=${PYTHON:-python3}
mkdir -p "$OUT"
rm -rf "$OUT/store_cpu" "$OUT/store_gpu"
MODEL="$DATA/models/stories260K.bin"
TRAIN="$DATA/instructions/alpaca_5000.json"
for f in "$MODEL" "$TRAIN" "$BIN/rapidin" "$BIN/rapidin-server"; do
  [[ -e "$f" ]] || { echo "gpu-server-e2e: missing $f" >&2; exit 2; }
done
pids=()
trap 'for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done' EXIT

for side in cpu gpu; do
  dev=cpu
  [[ $side == gpu ]] && dev=$GPU_DEVICE
  "$BIN/rapidin" cache --model "$MODEL" --data "$TRAIN" --store "$OUT/store_$side" --limit "$N" --k 4096 \
    --model-device "$dev" --threads 2 --json >"$OUT/cache_$side.json" 2>"$OUT/cache_$side.err" \
    || { echo "cache on $dev failed: $(tail -3 "$OUT/cache_$side.err")" >&2; exit 1; }
done

port_cpu=$((52000 + RANDOM % 4000))
port_gpu=$((port_cpu + 1))
"$BIN/rapidin-server" --store "$OUT/store_cpu" --model "$MODEL" --backend cpu --model-device cpu \
  --listen "127.0.0.1:$port_cpu" --metrics-listen "" >"$OUT/server_cpu.log" 2>&1 &
pids+=($!)
"$BIN/rapidin-server" --store "$OUT/store_gpu" --model "$MODEL" --backend "$GPU_BACKEND" --model-device "$GPU_DEVICE" \
  --host-budget-mb "$GPU_HOST_BUDGET_MB" --listen "127.0.0.1:$port_gpu" --metrics-listen "" >"$OUT/server_gpu.log" 2>&1 &
pids+=($!)
for port in $port_cpu $port_gpu; do
  for _ in $(seq 300); do "$BIN/rapidin" stats --server "127.0.0.1:$port" >/dev/null 2>&1 && break; sleep 0.1; done
  "$BIN/rapidin" stats --server "127.0.0.1:$port" --json >"$OUT/stats_$port.json" \
    || { echo "server on $port did not start:" >&2; tail -5 "$OUT"/server_*.log >&2; exit 1; }
done
cp "$OUT/stats_$port_cpu.json" "$OUT/stats_cpu.json"
cp "$OUT/stats_$port_gpu.json" "$OUT/stats_gpu.json"

INSTRUCTION="Give three tips for staying healthy."
GENERATION="1. Eat a balanced diet and make sure to include plenty of fruits and vegetables. 2. Exercise regularly."
for side in cpu gpu; do
  port=$port_cpu
  [[ $side == gpu ]] && port=$port_gpu
  "$BIN/rapidin" query --server "127.0.0.1:$port" --instruction "$INSTRUCTION" --generation "$GENERATION" \
    --top-k 5 --harmful-k 3 --tokens --json >"$OUT/query_$side.json"
done
for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
pids=()

# The packed Debian libraries are for rapidin's binaries, not for Python.
env -u LD_LIBRARY_PATH "$PY" - "$OUT" "$GPU_DEVICE" "$GPU_BACKEND" <<'PY'
import json, sys
out, device, backend = sys.argv[1:4]
load = lambda name: json.load(open(f"{out}/{name}.json"))
cache = {s: load(f"cache_{s}") for s in ("cpu", "gpu")}
query = {s: load(f"query_{s}")["result"] for s in ("cpu", "gpu")}
stats = {s: load(f"stats_{s}") for s in ("cpu", "gpu")}
problems = []
if cache["cpu"]["projection_state_id"] != cache["gpu"]["projection_state_id"]:
    problems.append("the two stores have different projection states")
if cache["gpu"]["device"] != (device if device != "cuda" else "cuda:0"):
    problems.append(f"gradients ran on {cache['gpu']['device']}, not {device}")
worst = 0.0
for side in ("helpful", "harmful"):
    a, b = query["cpu"].get(side, []), query["gpu"].get(side, [])
    if len(a) != len(b) or not a:
        problems.append(f"{side}: {len(a)} records on the CPU, {len(b)} on the GPU")
        continue
    for i, (x, y) in enumerate(zip(a, b)):
        tol = 1e-3 * max(1.0, abs(x["score"]))
        worst = max(worst, abs(x["score"] - y["score"]) / max(1.0, abs(x["score"])))
        if abs(x["score"] - y["score"]) > tol:
            problems.append(f"{side} rank {i}: score {x['score']} on the CPU, {y['score']} on the GPU")
        if x["id"] != y["id"] and abs(x["score"] - a[min(i + 1, len(a) - 1)]["score"]) > tol \
                and abs(x["score"] - a[max(i - 1, 0)]["score"]) > tol:
            problems.append(f"{side} rank {i}: {x['id']} on the CPU, {y['id']} on the GPU (not a near-tie)")
tiers = lambda st: ", ".join(f"{t['tier']} {int(t['bytes']) / 1e6:.1f} MB" for t in st.get("tiers", []))
import re
log = open(f"{out}/server_gpu.log").read()
m = re.search(r"model \S+ on (\S+) \(", log)  # "model PATH on cuda:0 (autograd gradients): ..."
server_device = m.group(1) if m else "?"
if server_device != cache["gpu"]["device"]:
    problems.append(f"the GPU server's model runs on {server_device}")
if not any(t["tier"] == "cold" and int(t["records"]) > 0 for t in stats["gpu"].get("tiers", [])):
    problems.append("the GPU server has no cold rows: raise N or lower GPU_HOST_BUDGET_MB")
if backend == "cuda" and not any(t["tier"] in ("gpu", "streamed") and int(t["bytes"]) > 0
                                 for t in stats["gpu"].get("tiers", [])):
    problems.append("the GPU server's Stats show no vectors in GPU memory")
q = {s: load(f"query_{s}") for s in ("cpu", "gpu")}
print("| | CPU | GPU |")
print("|---|---|---|")
print(f"| cache ({cache['cpu']['cached']} records), records/s | {cache['cpu']['records_per_second']:.1f} "
      f"| {cache['gpu']['records_per_second']:.1f} (gradients on {cache['gpu']['device']}) |")
print(f"| server | {stats['cpu']['backend']}, model on cpu | {stats['gpu']['backend']}, model on {server_device} |")
print(f"| tiers | {tiers(stats['cpu'])} | {tiers(stats['gpu'])} |")
print(f"| query by text with tokens: total / gradient / attributions, ms | {q['cpu']['total_ms']:.0f} / "
      f"{q['cpu']['gradient_ms']:.0f} / {q['cpu']['attribution_ms']:.0f} | {q['gpu']['total_ms']:.0f} / "
      f"{q['gpu']['gradient_ms']:.0f} / {q['gpu']['attribution_ms']:.0f} |")
print(f"| top helpful record | {query['cpu']['helpful'][0]['id']} | {query['gpu']['helpful'][0]['id']} |")
print(f"| largest relative score difference, top 5 + 3 | | {worst:.2e} |")
for p in problems:
    print("PROBLEM:", p)
sys.exit(1 if problems else 0)
PY
