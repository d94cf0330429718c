#!/usr/bin/env bash
# The soak of bench/results/reliability.md: caches the first N Alpaca records with stories260K (one store, and the
# same records as two ranges for two shard servers), then holds each setting at saturation for SECONDS with
# bench/soak (mixed QueryByVector, text Query, GetRecord, Ingest, DeleteRecords, and deadline-bound calls):
#   1. one rapidin-server with the model;
#   2. a router with the model over two shard servers (ingests go to shard server 0; deletes through the router).
# Prints the soak tables. Usage: bench/soak/run.sh [SECONDS=600] [N=1000] [THREADS=6]   (from the repository root;
# ONLY_SERVER=1 runs setting 1 alone)
set -euo pipefail
SECONDS_RUN=${1:-600}
N=${2:-1000}
THREADS=${3:-6}
BUILD=${BUILD_DIR:-build}
DATA=${RAPIDIN_SHARED_DATA:-$(cd .. && pwd)/shared/data}
CLI=$BUILD/client/rapidin
SERVER=$BUILD/server/rapidin-server
SOAK=$BUILD/bench/soak
MODEL=$DATA/models/stories260K.bin
TRAIN=$DATA/instructions/alpaca_5000.json
for f in "$CLI" "$SERVER" "$SOAK" "$MODEL" "$TRAIN"; do [[ -e $f ]] || { echo "soak: missing $f" >&2; exit 2; }; done
work=$(mktemp -d /tmp/rapidin-soak.XXXXXX)
pids=()
trap 'for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done; rm -rf "$work"' EXIT
port=$((30000 + RANDOM % 20000))

echo "== caching $N records (one store, and two ranges)"
"$CLI" cache --model "$MODEL" --data "$TRAIN" --limit "$N" --store "$work/whole" --threads 2 >/dev/null 2>&1
for i in 0 1; do
  "$CLI" cache --model "$MODEL" --data "$TRAIN" --limit "$N" --store "$work/range$i" --shard-count 2 --shard-index $i \
    --threads 2 >/dev/null 2>&1
done

wait_up() { for _ in $(seq 200); do "$CLI" stats --server "$1" >/dev/null 2>&1 && return 0; sleep 0.1; done; return 1; }

echo "== 1. one server, $SECONDS_RUN s, $THREADS client threads"
"$SERVER" --store "$work/whole" --model "$MODEL" --listen 127.0.0.1:$port --metrics-listen "" --shards 2 \
  >"$work/server.log" 2>&1 &
pids+=($!)
spid=$!
wait_up 127.0.0.1:$port
"$SOAK" --server 127.0.0.1:$port --pid $spid --id-prefix alpaca_5000- --id-count "$N" --text \
  --seconds "$SECONDS_RUN" --threads "$THREADS" --json "$work/soak1.json" --store "$work/whole" || echo "soak 1: errors (see the table)"
kill -TERM $spid; wait $spid || true

[[ -n "${ONLY_SERVER:-}" ]] && exit 0
echo "== 2. router over two shard servers, $SECONDS_RUN s, $THREADS client threads"
shard_pids=()
for i in 0 1; do
  "$SERVER" --store "$work/range$i" --listen 127.0.0.1:$((port + 1 + i)) --metrics-listen "" --shards 1 \
    >"$work/shard$i.log" 2>&1 &
  pids+=($!)
  shard_pids+=($!)
done
"$SERVER" --shard-servers 127.0.0.1:$((port + 1)),127.0.0.1:$((port + 2)) --model "$MODEL" \
  --listen 127.0.0.1:$((port + 3)) --metrics-listen "" >"$work/router.log" 2>&1 &
pids+=($!)
rpid=$!
wait_up 127.0.0.1:$((port + 3))
"$SOAK" --server 127.0.0.1:$((port + 3)) --ingest-server 127.0.0.1:$((port + 1)) --pid $rpid \
  --id-prefix alpaca_5000- --id-count "$N" --text --seconds "$SECONDS_RUN" --threads "$THREADS" \
  --json "$work/soak2.json" || echo "soak 2: errors (see the table)"
for p in "${shard_pids[@]}"; do
  echo "shard server $p: $(grep -c . /proc/$p/status >/dev/null && awk '/VmRSS|Threads/ {printf "%s %s ", $1, $2}' /proc/$p/status)"
done
kill -TERM $rpid "${shard_pids[@]}"; wait || true
