#!/usr/bin/env bash
# The scale plan on one machine: the demo's records cached in N ranges (as a Kubernetes Indexed Job would, one
# `rapidin cache --shard-count N --shard-index I` each), one rapidin-server per range, and a router
# (rapidin-server --shard-servers) with the model in front, asked the demo's question.
# Usage: scripts/demo-sharded.sh [N]   (RAPIDIN_DEMO_LIMIT, RAPIDIN_SHARED_DATA, RAPIDIN_DEMO_DIR as in demo.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
N="${1:-2}"
source scripts/demo-env.sh
PORT="${RAPIDIN_DEMO_PORT:-50061}"
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
"$CLI" query --server "127.0.0.1:$PORT" --instruction "$INSTRUCTION" --generation "$GENERATION" --top-k 5 \
  --harmful-k 3 "${@:2}"
