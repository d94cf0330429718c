#!/usr/bin/env bash
# The main job on its embedded default: starts rapidin-server on a demo store, ingests records and answers a
# query. Records are real Stanford Alpaca records (../shared/data or $RAPIDIN_SHARED_DATA); their vectors are
# random stand-ins until the gradient engine lands, and each demo query is a stored record's vector plus noise,
# so the expected top hit is known.
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD_DIR="${BUILD_DIR:-build}"
DATA="${RAPIDIN_SHARED_DATA:-$(cd .. && pwd)/shared/data}"
WORK="${RAPIDIN_DEMO_DIR:-demo}"
N="${RAPIDIN_DEMO_N:-5000}"
K="${RAPIDIN_DEMO_K:-4096}"
PORT="${RAPIDIN_DEMO_PORT:-50051}"
MPORT="${RAPIDIN_DEMO_METRICS_PORT:-9464}"
[ -x "$BUILD_DIR/client/rapidin" ] || { echo "build first: bash scripts/setup.sh" >&2; exit 1; }
rm -rf "$WORK" && mkdir -p "$WORK"
ALPACA=()
if [ -f "$DATA/instructions/alpaca_5000.json" ]; then
  ALPACA=(--alpaca "$DATA/instructions/alpaca_5000.json")
else
  echo "note: $DATA/instructions/alpaca_5000.json not found; using synthetic record text" >&2
fi
"$BUILD_DIR/client/rapidin" make-demo "${ALPACA[@]}" --n "$N" --k "$K" --queries 2 \
  --out "$WORK/records.jsonl" --out-queries "$WORK/queries.jsonl"
"$BUILD_DIR/server/rapidin-server" --store "$WORK/store" --k "$K" --listen "127.0.0.1:$PORT" \
  --metrics-listen "127.0.0.1:$MPORT" >"$WORK/server.log" 2>&1 &
SPID=$!
trap 'kill -TERM $SPID 2>/dev/null || true' EXIT
for _ in $(seq 100); do "$BUILD_DIR/client/rapidin" stats --server "127.0.0.1:$PORT" >/dev/null 2>&1 && break; sleep 0.1; done
"$BUILD_DIR/client/rapidin" ingest --server "127.0.0.1:$PORT" --file "$WORK/records.jsonl"
"$BUILD_DIR/client/rapidin" stats --server "127.0.0.1:$PORT"
echo "--- query (each query vector is record alpaca-0 / alpaca-$((N / 2)) plus noise)"
"$BUILD_DIR/client/rapidin" query --server "127.0.0.1:$PORT" --vector-file "$WORK/queries.jsonl" --top-k 5 --harmful-k 3
kill -TERM $SPID && wait $SPID
trap - EXIT
echo "--- server log"
cat "$WORK/server.log"
