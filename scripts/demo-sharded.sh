#!/usr/bin/env bash
# The scale plan on one machine: the demo's records cached in N ranges (as a Kubernetes Indexed Job would, one
# `rapidin cache --shard-count N --shard-index I` each), one rapidin-server per range, and a router
# (rapidin-server --shard-servers) with the model in front, asked the demo's question.
# Usage: scripts/demo-sharded.sh [N]   (RAPIDIN_DEMO_LIMIT, RAPIDIN_SHARED_DATA, RAPIDIN_DEMO_DIR as in demo.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
N="${1:-2}"
BUILD_DIR="${BUILD_DIR:-build}"
DATA="${RAPIDIN_SHARED_DATA:-$(cd .. && pwd)/shared/data}"
WORK="${RAPIDIN_DEMO_DIR:-demo}"
LIMIT="${RAPIDIN_DEMO_LIMIT:-0}"
PORT="${RAPIDIN_DEMO_PORT:-50061}"
CLI="$BUILD_DIR/client/rapidin"
SERVER="$BUILD_DIR/server/rapidin-server"
[ -x "$CLI" ] || { echo "build first: bash scripts/setup.sh" >&2; exit 1; }
MODEL="$DATA/models/stories260K.bin"
TRAIN="$DATA/instructions/alpaca_5000.json"
[ -f "$MODEL" ] && [ -f "$TRAIN" ] || { echo "missing $MODEL or $TRAIN (set RAPIDIN_SHARED_DATA)" >&2; exit 1; }
mkdir -p "$WORK"
pids=()
trap 'kill -TERM "${pids[@]}" 2>/dev/null || true' EXIT
servers=""
for i in $(seq 0 $((N - 1))); do
  echo "--- range $i of $N"
  "$CLI" cache --model "$MODEL" --data "$TRAIN" --store "$WORK/shard-$i" --k 4096 --threads 2 --limit "$LIMIT" \
    --shard-count "$N" --shard-index "$i"
  "$SERVER" --store "$WORK/shard-$i" --listen "127.0.0.1:$((PORT + 1 + i))" --metrics-listen "" \
    >"$WORK/shard-$i.log" 2>&1 &
  pids+=($!)
  servers="${servers:+$servers,}127.0.0.1:$((PORT + 1 + i))"
done
"$SERVER" --shard-servers "$servers" --model "$MODEL" --listen "127.0.0.1:$PORT" --metrics-listen "" \
  >"$WORK/router.log" 2>&1 &
pids+=($!)
for _ in $(seq 300); do "$CLI" stats --server "127.0.0.1:$PORT" >/dev/null 2>&1 && break; sleep 0.1; done
"$CLI" stats --server "127.0.0.1:$PORT"
echo "--- which training records explain this generation? (through the router)"
"$CLI" query --server "127.0.0.1:$PORT" --instruction "Give three tips for staying healthy." \
  --generation "1. Eat a balanced diet and make sure to include plenty of fruits and vegetables. 2. Exercise regularly to keep your body active and strong. 3. Get enough sleep and maintain a consistent sleep schedule." \
  --top-k 5 --harmful-k 3 "${@:2}"
