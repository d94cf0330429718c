#!/usr/bin/env bash
# The fault runs of bench/results/reliability.md (issue 16), on loopback, bounded in count and time:
#   shard-kill  a router over two shard servers at saturation; shard server 1 is killed with SIGKILL, then
#               restarted: what the router answers meanwhile and how soon it recovers.
#   kill [N]    N times (default 100): a server taking ingests and deletes (batches of 8 records, some streams of
#               three batches) is killed with SIGKILL at a random moment and restarted; each restart checks every
#               batch ever written against the writer's log (acknowledged: present; deleted: absent;
#               unacknowledged: whole or absent).
#   disk        a store on a small tmpfs filled by ingests until the disk is full: the error, queries after it,
#               reopening while full, and writing again once there is space (needs root for mount).
#   storm [S]   S seconds (default 60) of hostile clients beside well-behaved ones, on one server and on a router.
# Usage: bench/faults/run.sh [shard-kill] [kill [N]] [disk] [storm [S]]   (no argument: all four)
set -uo pipefail
BUILD=${BUILD_DIR:-build}
DATA=${RAPIDIN_SHARED_DATA:-$(cd .. && pwd)/shared/data}
CLI=$BUILD/client/rapidin
SERVER=$BUILD/server/rapidin-server
FAULTS=$BUILD/bench/faults
MODEL=$DATA/models/stories260K.bin
TRAIN=$DATA/instructions/alpaca_5000.json
N_RECORDS=${N_RECORDS:-300}
for f in "$CLI" "$SERVER" "$FAULTS"; do [[ -e $f ]] || { echo "faults: missing $f" >&2; exit 2; }; done
parts=("$@")
[[ ${#parts[@]} -eq 0 ]] && parts=(shard-kill kill disk storm)
work=$(mktemp -d /tmp/rapidin-faults.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  mountpoint -q "$work/small" 2>/dev/null && umount "$work/small"
  rm -rf "$work"
}
trap cleanup EXIT
port=$((30000 + RANDOM % 20000))
failed=0

wait_up() { for _ in $(seq 300); do "$CLI" stats --server "$1" >/dev/null 2>&1 && return 0; sleep 0.05; done; return 1; }
now() { date +%s.%N; }
need_cache() {  # shard-kill and storm serve real records: the model and Alpaca data from shared/data
  local i
  [[ -d $work/whole ]] && return 0
  for f in "$MODEL" "$TRAIN"; do [[ -e $f ]] || { echo "faults: missing $f (shared data)" >&2; exit 2; }; done
  echo "== caching $N_RECORDS Alpaca records (one store, and two ranges)"
  "$CLI" cache --model "$MODEL" --data "$TRAIN" --limit "$N_RECORDS" --store "$work/whole" --threads 2 >/dev/null 2>&1
  for i in 0 1; do
    "$CLI" cache --model "$MODEL" --data "$TRAIN" --limit "$N_RECORDS" --store "$work/range$i" --shard-count 2 \
      --shard-index $i --threads 2 >/dev/null 2>&1
  done
}
start_shards() {  # two shard servers on the ranges, and a router over them; sets s0 s1 router
  local i
  for i in 0 1; do
    "$SERVER" --store "$work/range$i" --listen 127.0.0.1:$((port + 1 + i)) --metrics-listen "" --shards 1 \
      >>"$work/shard$i.log" 2>&1 &
    pids+=($!)
    eval "s$i=$!"
  done
  "$SERVER" --shard-servers 127.0.0.1:$((port + 1)),127.0.0.1:$((port + 2)) --listen 127.0.0.1:$((port + 3)) \
    --metrics-listen "" >"$work/router.log" 2>&1 &
  pids+=($!)
  router=$!
  wait_up 127.0.0.1:$((port + 3))
}

shard_kill() {
  need_cache
  echo "== shard-kill: router over two shard servers, 4 client threads, shard server 1 killed at 8 s, restarted at 16 s"
  start_shards
  "$FAULTS" timeline --server 127.0.0.1:$((port + 3)) --id-prefix alpaca_5000- --id-count "$N_RECORDS" \
    --seconds 30 --threads 4 --out "$work/timeline.tsv" &
  local tl=$!
  sleep 8
  local t_kill t_restart t_ready
  t_kill=$(now); kill -9 "$s1"; wait "$s1" 2>/dev/null
  sleep 8
  t_restart=$(now)
  "$SERVER" --store "$work/range1" --listen 127.0.0.1:$((port + 2)) --metrics-listen "" --shards 1 \
    >>"$work/shard1.log" 2>&1 &
  pids+=($!); s1=$!
  wait_up 127.0.0.1:$((port + 2)); t_ready=$(now)
  wait "$tl"
  python3 - "$work/timeline.tsv" "$t_kill" "$t_restart" "$t_ready" "127.0.0.1:$((port + 2))" <<'PY' || failed=1
import sys, collections
path, t_kill, t_restart, t_ready, addr = sys.argv[1], *map(float, sys.argv[2:5]), sys.argv[5]
names = {0: "OK", 1: "CANCELLED", 4: "DEADLINE_EXCEEDED", 14: "UNAVAILABLE", 13: "INTERNAL", 2: "UNKNOWN"}
calls = []
for line in open(path):
    t0, t1, code, msg = (line.rstrip("\n").split("\t") + [""])[:4]
    calls.append((float(t0), float(t1), int(code), msg))
calls.sort()
before = [c for c in calls if c[1] < t_kill]  # answered before the kill
ok_after = [c for c in calls if c[0] >= t_kill and c[2] == 0]
first_ok = ok_after[0][1] if ok_after else None  # the end of the first OK call started after the kill
down = [c for c in calls if c[1] >= t_kill and (first_ok is None or c[0] < first_ok)]
after = [c for c in calls if first_ok is not None and c[0] >= first_ok]
def codes(cs): return ", ".join(f"{names.get(k, k)} {v}" for k, v in sorted(collections.Counter(c[2] for c in cs).items()))
named = sum(1 for c in down if c[2] == 14 and addr in c[3])
print(f"| phase | calls | status codes |\n|---|---|---|")
print(f"| both shard servers up (answered before the kill) | {len(before)} | {codes(before)} |")
print(f"| shard server {addr} killed, restarted {t_restart - t_kill:.1f} s later, until the router's first OK | {len(down)} | {codes(down)} |")
print(f"| after the first OK, to the end | {len(after)} | {codes(after)} |")
print()
ex = next((c[3] for c in down if c[2] == 14), "-")
ex2 = next((c[3] for c in reversed(down) if c[2] == 14), "-")
print(f"while it was down: {named} of {sum(1 for c in down if c[2] == 14)} UNAVAILABLE answers name {addr}; first \"{ex}\", last \"{ex2}\"")
print(f"restarted at +{t_restart - t_kill:.2f} s; the router's first OK at +{first_ok - t_kill:.2f} s, "
      f"{first_ok - t_restart:.2f} s after the restart began (store load included; the driver's own `rapidin stats` "
      f"poll of the shard server first answered at +{t_ready - t_kill:.2f} s)" if first_ok else "the router never answered OK again")
bad = [c for c in before + after if c[2] != 0] + [c for c in down if c[2] not in (0, 14)]
other = [c for c in down if c[2] == 14 and addr not in c[3]]
sys.exit(1 if bad or other or named == 0 or first_ok is None else 0)
PY
  kill -TERM "$s0" "$s1" "$router" 2>/dev/null; wait "$s0" "$s1" "$router" 2>/dev/null
}

kill_loop() {
  local n=$1 i
  echo "== kill: $n x SIGKILL of a server taking ingests and deletes"
  local store=$work/kstore log=$work/writer.log p=$((port + 10))
  : >"$log"
  local crashes=0 lost=0 torn=0 resurrected=0 un_p=0 un_a=0 acked=0 deleted=0
  for i in $(seq "$n"); do
    "$SERVER" --store "$store" --k 64 --listen 127.0.0.1:$p --metrics-listen "" --shards 2 >>"$work/kserver.log" 2>&1 &
    local spid=$!
    pids+=($spid)
    wait_up 127.0.0.1:$p || { echo "kill: run $i: the server did not start"; tail -5 "$work/kserver.log"; failed=1; break; }
    "$FAULTS" writer --server 127.0.0.1:$p --log "$log" --seed "$i" >"$work/w$i.out" 2>&1 &
    local wpid=$!
    for _ in $(seq 600); do grep -q "^check:" "$work/w$i.out" 2>/dev/null && break; sleep 0.02; done
    sleep "0.$((RANDOM % 9 + 1))"
    if ! kill -9 "$spid" 2>/dev/null; then crashes=$((crashes + 1)); fi
    wait "$spid" 2>/dev/null
    wait "$wpid"; local rc=$?
    if [[ $rc -ne 0 ]]; then echo "kill: run $i: writer exit $rc"; cat "$work/w$i.out"; failed=1; fi
    grep -q "TORN\|LOST\|RESURRECTED" "$work/w$i.out" && { cat "$work/w$i.out"; failed=1; }
  done
  "$SERVER" --store "$store" --k 64 --listen 127.0.0.1:$p --metrics-listen "" --shards 2 >>"$work/kserver.log" 2>&1 &
  local spid=$!
  pids+=($spid)
  wait_up 127.0.0.1:$p
  "$FAULTS" writer --server 127.0.0.1:$p --log "$log" --verify-only >"$work/wfinal.out" 2>&1 || failed=1
  kill -TERM "$spid"; wait "$spid" 2>/dev/null
  python3 - "$work" "$n" "$crashes" <<'PY' || failed=1
import re, sys, glob
work, n, crashes = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
tot = dict(lost=0, torn=0, resurrected=0, up=0, ua=0, ingested=0, streams=0, deleted=0)
for i in range(1, n + 2):
    path = f"{work}/w{i}.out" if i <= n else f"{work}/wfinal.out"
    text = open(path).read()
    m = re.search(r"unacknowledged: (\d+) present, (\d+) absent\); lost (\d+), torn (\d+), resurrected (\d+)", text)
    if m:
        tot["up"] += int(m[1]); tot["ua"] += int(m[2]); tot["lost"] += int(m[3]); tot["torn"] += int(m[4]); tot["resurrected"] += int(m[5])
    m = re.search(r"wrote: (\d+) batches ingested \((\d+) in streams of three\), (\d+) deleted", text)
    if m:
        tot["ingested"] += int(m[1]); tot["streams"] += int(m[2]); tot["deleted"] += int(m[3])
last = open(f"{work}/wfinal.out").read().strip().splitlines()[-1]
print(f"{n} SIGKILLs; {crashes} times the server was already gone (a crash of its own)")
print(f"acknowledged before the kills: {tot['ingested']} batches ingested ({tot['streams']} streams of three), "
      f"{tot['deleted']} deleted")
print(f"unacknowledged operations found at the restarts: {tot['up']} batches present, {tot['ua']} absent (each whole)")
print(f"lost {tot['lost']}, torn {tot['torn']}, resurrected {tot['resurrected']}")
print(f"final check: {last}")
sys.exit(1 if tot["lost"] or tot["torn"] or tot["resurrected"] or crashes else 0)
PY
}

disk() {
  echo "== disk: a store on a 24 MiB tmpfs (K=4096: 8 KiB per vector) filled by ingests"
  mkdir -p "$work/small"
  if ! mount -t tmpfs -o size=24m tmpfs "$work/small" 2>/dev/null; then
    echo "disk: skipped: cannot mount a tmpfs here (needs root)"
    return 0
  fi
  local store=$work/small/store log=$work/disk.log p=$((port + 20))
  : >"$log"
  "$SERVER" --store "$store" --k 4096 --listen 127.0.0.1:$p --metrics-listen "" --shards 2 >"$work/dserver.log" 2>&1 &
  local spid=$!
  pids+=($spid)
  wait_up 127.0.0.1:$p
  "$FAULTS" writer --server 127.0.0.1:$p --log "$log" --k 4096 --until-error >"$work/fill.out"
  sed 's/^/  /' "$work/fill.out"
  grep -q "disk is full" "$work/fill.out" || { echo "disk: no clear full-disk error"; failed=1; }
  echo "  disk: $(df -h --output=used,size "$work/small" | tail -1)"
  # RocksDB recovers by itself once the free space covers its write buffers (64 MiB here); it polls every 5 s.
  echo "-- free space on the running server's disk (remount at 128 MiB), then 20 more writes without a restart"
  echo "   (each refused write retried for up to 60 s):"
  mount -o remount,size=128m "$work/small"
  "$FAULTS" writer --server 127.0.0.1:$p --log "$log" --k 4096 --max-ops 20 --retry-seconds 60 >"$work/resume.out"
  sed 's/^/  /' "$work/resume.out"
  grep -q "until: OK" "$work/resume.out" || { echo "disk: the running server did not take writes again"; failed=1; }
  echo "-- fill again, stop the server (SIGTERM), and reopen the store while the disk is full:"
  "$FAULTS" writer --server 127.0.0.1:$p --log "$log" --k 4096 --until-error | sed 's/^/  /'
  kill -TERM "$spid"; wait "$spid" 2>/dev/null
  "$SERVER" --store "$store" --k 4096 --listen 127.0.0.1:$p --metrics-listen "" --shards 2 >"$work/dserver2.log" 2>&1 &
  spid=$!
  pids+=($spid)
  if wait_up 127.0.0.1:$p; then
    echo "  reopened while full:"
    "$FAULTS" writer --server 127.0.0.1:$p --log "$log" --k 4096 --verify-only | sed 's/^/  /' || failed=1
    kill -TERM "$spid"; wait "$spid" 2>/dev/null
  else
    echo "  did not reopen while full: $(grep -i "error\|fail" "$work/dserver2.log" | tail -1)"
  fi
  mount -o remount,size=256m "$work/small"
  "$SERVER" --store "$store" --k 4096 --listen 127.0.0.1:$p --metrics-listen "" --shards 2 >"$work/dserver3.log" 2>&1 &
  spid=$!
  pids+=($spid)
  wait_up 127.0.0.1:$p || { echo "disk: the store does not open with space again"; tail -3 "$work/dserver3.log"; failed=1; return; }
  echo "-- with space again: check every acknowledged batch, then 20 more writes:"
  "$FAULTS" writer --server 127.0.0.1:$p --log "$log" --k 4096 --max-ops 20 >"$work/final.out" || failed=1
  sed 's/^/  /' "$work/final.out"
  grep -q "until: OK" "$work/final.out" || failed=1
  kill -TERM "$spid"; wait "$spid" 2>/dev/null
  umount "$work/small"
}

storm() {
  local secs=$1
  need_cache
  local p=$((port + 30))
  echo "== storm: $secs s, 8 client threads (4 hostile), one server (--max-message-mb 4)"
  "$SERVER" --store "$work/whole" --listen 127.0.0.1:$p --metrics-listen "" --shards 2 --max-message-mb 4 \
    >"$work/sserver.log" 2>&1 &
  local spid=$!
  pids+=($spid)
  wait_up 127.0.0.1:$p
  "$FAULTS" storm --server 127.0.0.1:$p --id-prefix alpaca_5000- --id-count "$N_RECORDS" --seconds "$secs" \
    --threads 8 --max-message-mb 4 --pid "$spid" || failed=1
  kill -0 "$spid" 2>/dev/null || { echo "storm: the server died"; failed=1; }
  kill -TERM "$spid"; wait "$spid" 2>/dev/null
  echo "== storm: $((secs / 2)) s, 8 client threads (4 hostile), a router over two shard servers"
  start_shards
  "$FAULTS" storm --server 127.0.0.1:$((port + 3)) --id-prefix alpaca_5000- --id-count "$N_RECORDS" \
    --seconds $((secs / 2)) --threads 8 --max-message-mb 64 --pid "$router" || failed=1
  for p2 in "$s0" "$s1" "$router"; do kill -0 "$p2" 2>/dev/null || { echo "storm: process $p2 died"; failed=1; }; done
  kill -TERM "$s0" "$s1" "$router"; wait "$s0" "$s1" "$router" 2>/dev/null
}

part=0  # (the functions' own loops use i)
while [[ $part -lt ${#parts[@]} ]]; do
  arg=${parts[$((part + 1))]:-}
  case ${parts[$part]} in
    shard-kill) shard_kill ;;
    kill) n=100; [[ $arg =~ ^[0-9]+$ ]] && { n=$arg; part=$((part + 1)); }; kill_loop "$n" ;;
    disk) disk ;;
    storm) s=60; [[ $arg =~ ^[0-9]+$ ]] && { s=$arg; part=$((part + 1)); }; storm "$s" ;;
    *) echo "faults: unknown part ${parts[$part]}" >&2; exit 2 ;;
  esac
  part=$((part + 1))
done
[[ $failed -eq 0 ]] && echo "faults: all checks passed" || echo "faults: FAILED (see above)"
exit $failed
