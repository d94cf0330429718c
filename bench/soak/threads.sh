#!/usr/bin/env bash
# Threads per request, before and after the callback API (bench/results/reliability.md): for each rapidin-server
# binary given, a store of N cached records is served and bench/soak drives it for SECONDS with 4, 32 and 128
# client threads (vector queries, GetRecord, ingests and deletes; no text queries); prints the server's largest
# thread count during the run (sampled every 0.2 s) and the calls per second.
# Usage: bench/soak/threads.sh SERVER_BINARY... (from the repository root; SECONDS=15 N=300 by default)
set -euo pipefail
SECS=${SECONDS_RUN:-15}
N=${N:-300}
BUILD=${BUILD_DIR:-build}
DATA=${RAPIDIN_SHARED_DATA:-$(cd .. && pwd)/shared/data}
CLI=$BUILD/client/rapidin
SOAK=$BUILD/bench/soak
[[ $# -ge 1 ]] || { echo "usage: $0 SERVER_BINARY..." >&2; exit 2; }
work=$(mktemp -d /tmp/rapidin-threads.XXXXXX)
spid=""
trap '[[ -n $spid ]] && kill -9 $spid 2>/dev/null; rm -rf "$work"' EXIT
"$CLI" cache --model "$DATA/models/stories260K.bin" --data "$DATA/instructions/alpaca_5000.json" --limit "$N" \
  --store "$work/store" --threads 2 >/dev/null 2>&1
echo "| server | client threads | server threads idle | largest during the run | calls/s | errors |"
echo "|---|---|---|---|---|---|"
for clients in 4 32 128; do
  for server in "$@"; do
    rm -rf "$work/s" && cp -r "$work/store" "$work/s"
    port=$((30000 + RANDOM % 20000))
    "$server" --store "$work/s" --listen 127.0.0.1:$port --metrics-listen "" --shards 2 >"$work/server.log" 2>&1 &
    spid=$!
    for _ in $(seq 200); do "$CLI" stats --server 127.0.0.1:$port >/dev/null 2>&1 && break; sleep 0.05; done
    idle=$(awk '/Threads/ {print $2}' /proc/$spid/status)
    "$SOAK" --server 127.0.0.1:$port --pid $spid --id-prefix alpaca_5000- --id-count "$N" --seconds "$SECS" \
      --threads $clients >"$work/soak.txt" 2>&1 &
    lp=$!
    most=0
    while kill -0 $lp 2>/dev/null; do
      t=$(awk '/Threads/ {print $2}' /proc/$spid/status); ((t > most)) && most=$t; sleep 0.2
    done
    wait $lp || true
    line=$(grep "client threads:" "$work/soak.txt")
    rate=$(sed -E 's/.*calls \(([0-9.]+)\/s\).*/\1/' <<<"$line")
    errors=$(sed -E 's/.*\), ([0-9]+) errors.*/\1/' <<<"$line")
    echo "| $server | $clients | $idle | $most | $rate | $errors |"
    kill -TERM $spid; wait $spid 2>/dev/null || true
    spid=""
  done
done
