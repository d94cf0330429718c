#!/usr/bin/env bash
# The main job on its embedded default: caches RapidGrad-compressed gradients of the Stanford Alpaca records
# (alpaca_5000.json, all of them; RAPIDIN_DEMO_LIMIT=N for the first N) with the stories260K model, starts
# rapidin-server with the same model, and asks in plain text which training records explain a generation.
# Data: ../shared/data or $RAPIDIN_SHARED_DATA. A rerun resumes the cache (records already cached are skipped).
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD_DIR="${BUILD_DIR:-build}"
DATA="${RAPIDIN_SHARED_DATA:-$(cd .. && pwd)/shared/data}"
WORK="${RAPIDIN_DEMO_DIR:-demo}"
LIMIT="${RAPIDIN_DEMO_LIMIT:-0}"
PORT="${RAPIDIN_DEMO_PORT:-50051}"
MPORT="${RAPIDIN_DEMO_METRICS_PORT:-9464}"
CLI="$BUILD_DIR/client/rapidin"
[ -x "$CLI" ] || { echo "build first: bash scripts/setup.sh" >&2; exit 1; }
MODEL="$DATA/models/stories260K.bin"
TRAIN="$DATA/instructions/alpaca_5000.json"
for f in "$MODEL" "$DATA/models/tok512.bin" "$TRAIN"; do
  [ -f "$f" ] || { echo "missing $f (set RAPIDIN_SHARED_DATA to the shared data folder)" >&2; exit 1; }
done
mkdir -p "$WORK"
echo "--- caching gradients of $TRAIN (stories260K, K=4096, 2 threads)"
"$CLI" cache --model "$MODEL" --data "$TRAIN" --store "$WORK/store" --k 4096 --threads 2 --limit "$LIMIT"
"$BUILD_DIR/server/rapidin-server" --store "$WORK/store" --model "$MODEL" --listen "127.0.0.1:$PORT" \
  --metrics-listen "127.0.0.1:$MPORT" >"$WORK/server.log" 2>&1 &
SPID=$!
trap 'kill -TERM $SPID 2>/dev/null || true' EXIT
for _ in $(seq 100); do "$CLI" stats --server "127.0.0.1:$PORT" >/dev/null 2>&1 && break; sleep 0.1; done
"$CLI" stats --server "127.0.0.1:$PORT"
echo "--- which training records explain this generation?"
INSTRUCTION="Give three tips for staying healthy."
GENERATION="1. Eat a balanced diet and make sure to include plenty of fruits and vegetables. 2. Exercise regularly to keep your body active and strong. 3. Get enough sleep and maintain a consistent sleep schedule."
echo "instruction: $INSTRUCTION"
echo "generation:  $GENERATION"
"$CLI" query --server "127.0.0.1:$PORT" --instruction "$INSTRUCTION" --generation "$GENERATION" --top-k 5 --harmful-k 3
kill -TERM $SPID && wait $SPID
trap - EXIT
echo "--- server log"
cat "$WORK/server.log"
