#!/usr/bin/env bash
# The main job on its embedded default: caches RapidGrad-compressed gradients of the Stanford Alpaca records
# (alpaca_5000.json, all of them; RAPIDIN_DEMO_LIMIT=N for the first N) with the stories260K model, starts
# rapidin-server with the same model, and asks in plain text which training records explain a generation.
# Data: ../shared/data or $RAPIDIN_SHARED_DATA. A rerun resumes the cache (records already cached are skipped).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/demo-env.sh
PORT="${RAPIDIN_DEMO_PORT:-50051}"
MPORT="${RAPIDIN_DEMO_METRICS_PORT:-9464}"
echo "--- caching gradients of $TRAIN (stories260K, K=4096, 2 threads)"
"$CLI" cache --model "$MODEL" --data "$TRAIN" --store "$WORK/store" --k 4096 --threads 2 --limit "$LIMIT"
"$SERVER" --store "$WORK/store" --model "$MODEL" --listen "127.0.0.1:$PORT" \
  --metrics-listen "127.0.0.1:$MPORT" >"$WORK/server.log" 2>&1 &
SPID=$!
trap 'kill -TERM $SPID 2>/dev/null || true' EXIT
for _ in $(seq 100); do "$CLI" stats --server "127.0.0.1:$PORT" >/dev/null 2>&1 && break; sleep 0.1; done
"$CLI" stats --server "127.0.0.1:$PORT"
echo "--- which training records explain this generation?"
echo "instruction: $INSTRUCTION"
echo "generation:  $GENERATION"
"$CLI" query --server "127.0.0.1:$PORT" --instruction "$INSTRUCTION" --generation "$GENERATION" --top-k 5 --harmful-k 3
kill -TERM $SPID && wait $SPID
trap - EXIT
echo "--- server log"
cat "$WORK/server.log"
