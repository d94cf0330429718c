#!/usr/bin/env bash
# End-to-end test of the binaries: rapidin-server on loopback, driven by the rapidin CLI. Checks output, JSON,
# exit codes with one-line reasons, and a clean SIGTERM shutdown.
set -u
SERVER_BIN=$1
CLI=$2
work=$(mktemp -d)
trap 'kill -9 $spid $apid $bpid $rpid 2>/dev/null; rm -rf "$work"' EXIT
apid= bpid= rpid=
fail() { echo "FAIL: $*"; [ -f "$work/server.log" ] && tail -20 "$work/server.log"; exit 1; }

port=$((20000 + RANDOM % 20000)); mport=$((port + 1))
"$CLI" make-demo --n 300 --k 33 --queries 3 --seed 7 --out "$work/rec.jsonl" --out-queries "$work/q.jsonl" >/dev/null \
  || fail "make-demo"
"$SERVER_BIN" --store "$work/store" --k 33 --listen 127.0.0.1:$port --metrics-listen 127.0.0.1:$mport --shards 2 \
  >"$work/server.log" 2>&1 &
spid=$!
for _ in $(seq 50); do "$CLI" stats --server 127.0.0.1:$port >/dev/null 2>&1 && break; sleep 0.1; done

"$CLI" ingest --server 127.0.0.1:$port --file "$work/rec.jsonl" --batch-size 64 >"$work/ingest.out" 2>&1 \
  || fail "ingest: $(cat "$work/ingest.out")"
grep -q "300 inserted" "$work/ingest.out" || fail "ingest output: $(cat "$work/ingest.out")"

# Each demo query is a stored record's vector plus noise: that record must come first.
"$CLI" query --server 127.0.0.1:$port --vector-file "$work/q.jsonl" --top-k 3 --harmful-k 2 --json >"$work/q.json" \
  || fail "query --json"
python3 - "$work/q.json" <<'PY' || fail "query JSON content"
import json, sys
r = json.load(open(sys.argv[1]))
assert len(r["results"]) == 3, r
for i, res in enumerate(r["results"]):
    assert res["helpful"][0]["id"] == f"alpaca-{i * 100}", res["helpful"][0]
    assert len(res["helpful"]) == 3 and len(res["harmful"]) == 2
    s = [h["score"] for h in res["helpful"]]
    assert s == sorted(s, reverse=True)
PY
"$CLI" query --server 127.0.0.1:$port --vector-file "$work/q.jsonl" --top-k 2 | grep -q "helpful" || fail "table"
"$CLI" stats --server 127.0.0.1:$port --json | python3 -c 'import json,sys; d=json.load(sys.stdin); assert d["num_records"]=="300", d' \
  || fail "stats json"
"$CLI" get --server 127.0.0.1:$port --id alpaca-5 | grep -q "alpaca-5" || fail "get"

# Errors: non-zero exit, one line on stderr.
expect_err() {  # expected-code words... -- command
  local code=$1; shift; local words=$1; shift
  "$@" >/dev/null 2>"$work/err"; local rc=$?
  [ $rc -eq "$code" ] || fail "exit $rc (want $code) for: $* ($(cat "$work/err"))"
  [ "$(wc -l <"$work/err")" -eq 1 ] || fail "stderr not one line for: $*: $(cat "$work/err")"
  grep -q -- "$words" "$work/err" || fail "stderr lacks '$words': $(cat "$work/err")"
}
expect_err 1 "NOT_FOUND" "$CLI" get --server 127.0.0.1:$port --id nope
echo '{"vector": [1, 2]}' >"$work/badk.jsonl"
expect_err 1 "K is 33" "$CLI" query --server 127.0.0.1:$port --vector-file "$work/badk.jsonl"
echo '{"vector": [1, 2' >"$work/broken.jsonl"
expect_err 1 "broken.jsonl:1: malformed JSON" "$CLI" query --server 127.0.0.1:$port --vector-file "$work/broken.jsonl"
expect_err 1 "top_k" "$CLI" query --server 127.0.0.1:$port --vector-file "$work/q.jsonl" --top-k 0
expect_err 1 "FAILED_PRECONDITION" "$CLI" query --server 127.0.0.1:$port --generation "hi"
expect_err 2 "exactly one of" "$CLI" query --server 127.0.0.1:$port
# Text that is not UTF-8 is named before it is sent (gRPC would refuse the message with an empty status).
expect_err 1 "generation is not valid UTF-8 (byte 3)" "$CLI" query --server 127.0.0.1:$port --instruction hi \
  --generation $'caf\xe9'
expect_err 1 "hotwords\[0\] is not valid UTF-8" "$CLI" query --server 127.0.0.1:$port --instruction hi \
  --generation ok --hotword $'\xff'
expect_err 1 "id is not valid UTF-8 (byte 0)" "$CLI" get --server 127.0.0.1:$port --id $'\xe9x'
expect_err 2 "" "$CLI" frobnicate
expect_err 1 "UNAVAILABLE" "$CLI" stats --server 127.0.0.1:1 --timeout 2

curl -sf "http://127.0.0.1:$mport/metrics" | grep -q 'rapidin_requests_total{code="OK",method="Ingest"} 1' \
  || fail "metrics"
kill -TERM $spid
wait $spid; rc=$?
[ $rc -eq 0 ] || fail "server exit code $rc after SIGTERM"
grep -q "shutdown complete" "$work/server.log" || fail "no graceful shutdown in log"
# Reopen: data persisted. With a host budget of 10 KiB (158 rows of 66 bytes) the other 142 rows are the cold tier,
# read from disk at every scan: same answers as before.
"$SERVER_BIN" --store "$work/store" --listen 127.0.0.1:$port --metrics-listen "" --host-budget-mb 0.01 \
  >"$work/server.log" 2>&1 &
spid=$!
for _ in $(seq 50); do "$CLI" stats --server 127.0.0.1:$port >/dev/null 2>&1 && break; sleep 0.1; done
"$CLI" stats --server 127.0.0.1:$port >"$work/stats_cold.out"
grep -q "records *300" "$work/stats_cold.out" || fail "records after restart"
grep -Eq "tier cold +142 records" "$work/stats_cold.out" || fail "cold tier: $(cat "$work/stats_cold.out")"
"$CLI" query --server 127.0.0.1:$port --vector-file "$work/q.jsonl" --top-k 3 --harmful-k 2 --json >"$work/q_cold.json" \
  || fail "query with cold rows"
python3 - "$work/q.json" "$work/q_cold.json" <<'PY' || fail "cold-tier answers differ from the resident ones"
import json, sys
a, b = (json.load(open(f))["results"] for f in sys.argv[1:3])
key = lambda rs: [[(x["id"], round(x["score"], 4)) for x in r.get(side, [])] for r in rs for side in ("helpful", "harmful")]
assert key(a) == key(b), (key(a), key(b))
PY
# Deletion (a resident row, then a cold one): by id and from a file, idempotent, gone from get and stats.
"$CLI" delete --server 127.0.0.1:$port --id alpaca-7 --id nope >"$work/del.out" 2>&1 \
  || fail "delete: $(cat "$work/del.out")"
grep -q "1 deleted, 1 not found; the store holds 299 records" "$work/del.out" \
  || fail "delete output: $(cat "$work/del.out")"
printf 'alpaca-250\n\nalpaca-7\n' >"$work/ids.txt"
"$CLI" delete --server 127.0.0.1:$port --ids-file "$work/ids.txt" --compact --json >"$work/del.json" \
  || fail "delete --ids-file"
python3 -c 'import json,sys; d=json.load(open(sys.argv[1]))
assert (d["deleted"], d["not_found"], d["record_count"]) == ("1", "1", "298"), d' "$work/del.json" \
  || fail "delete JSON: $(cat "$work/del.json")"
expect_err 1 "NOT_FOUND" "$CLI" get --server 127.0.0.1:$port --id alpaca-7
expect_err 2 "needs --id or --ids-file" "$CLI" delete --server 127.0.0.1:$port
"$CLI" stats --server 127.0.0.1:$port --json \
  | python3 -c 'import json,sys; d=json.load(sys.stdin); assert d["num_records"]=="298", d' || fail "stats after delete"
"$CLI" query --server 127.0.0.1:$port --vector-file "$work/q.jsonl" --top-k 3 --harmful-k 2 --json >"$work/q_exact.json" \
  || fail "exact query after delete"
kill -TERM $spid; wait $spid

# --index pca: built at the first start (every row a candidate here, so the answers are the exact ones), saved at
# shutdown, loaded at the next start.
for round in built loaded; do
  "$SERVER_BIN" --store "$work/store" --listen 127.0.0.1:$port --metrics-listen "" --index pca --index-dim 8 \
    --index-min-candidates 400 >"$work/server.log" 2>&1 &
  spid=$!
  for _ in $(seq 50); do "$CLI" stats --server 127.0.0.1:$port >/dev/null 2>&1 && break; sleep 0.1; done
  grep -q "index pca dim=8, 298 rows: $round" "$work/server.log" || fail "index $round: $(grep index "$work/server.log")"
  "$CLI" query --server 127.0.0.1:$port --vector-file "$work/q.jsonl" --top-k 3 --harmful-k 2 --json \
    >"$work/q_index.json" || fail "query with --index pca"
  python3 - "$work/q_exact.json" "$work/q_index.json" <<'PY' || fail "--index pca answers differ from the exact scan"
import json, sys
a, b = (json.load(open(f))["results"] for f in sys.argv[1:3])
key = lambda rs: [[(x["id"], x["score"]) for x in r.get(side, [])] for r in rs for side in ("helpful", "harmful")]
assert key(a) == key(b), (key(a), key(b))
PY
  "$CLI" stats --server 127.0.0.1:$port | grep -q "pca dim=8" || fail "stats does not name the index"
  kill -TERM $spid; wait $spid
done

# Router mode: the 300 records split over two shard servers behind a router answer like the single store.
head -n 150 "$work/rec.jsonl" >"$work/rec_a.jsonl"
tail -n +151 "$work/rec.jsonl" >"$work/rec_b.jsonl"
pa=$((port + 2)); pb=$((port + 3)); pr=$((port + 4))
"$SERVER_BIN" --store "$work/shard_a" --k 33 --listen 127.0.0.1:$pa --metrics-listen "" >"$work/shard_a.log" 2>&1 &
apid=$!
"$SERVER_BIN" --store "$work/shard_b" --k 33 --listen 127.0.0.1:$pb --metrics-listen "" >"$work/shard_b.log" 2>&1 &
bpid=$!
"$SERVER_BIN" --shard-servers 127.0.0.1:$pa,127.0.0.1:$pb --listen 127.0.0.1:$pr --metrics-listen "" \
  >"$work/router.log" 2>&1 &
rpid=$!
for _ in $(seq 100); do "$CLI" stats --server 127.0.0.1:$pr >/dev/null 2>&1 && break; sleep 0.1; done
"$CLI" ingest --server 127.0.0.1:$pa --file "$work/rec_a.jsonl" >/dev/null || fail "ingest into shard a"
"$CLI" ingest --server 127.0.0.1:$pb --file "$work/rec_b.jsonl" >/dev/null || fail "ingest into shard b"
"$CLI" query --server 127.0.0.1:$pr --vector-file "$work/q.jsonl" --top-k 3 --harmful-k 2 --json >"$work/q_router.json" \
  || fail "query through the router: $(tail -3 "$work/router.log")"
python3 - "$work/q.json" "$work/q_router.json" $pa $pb <<'PY' || fail "router answers differ from the single store's"
import json, sys
a, b = (json.load(open(f))["results"] for f in sys.argv[1:3])
key = lambda rs: [[(x["id"], round(x["score"], 4)) for x in r.get(side, [])] for r in rs for side in ("helpful", "harmful")]
assert key(a) == key(b), (key(a), key(b))
src = {x["source"] for r in b for side in ("helpful", "harmful") for x in r.get(side, [])}
assert src <= {"127.0.0.1:%s" % p for p in sys.argv[3:]} and len(src) == 2, src
PY
"$CLI" stats --server 127.0.0.1:$pr >"$work/stats_router.out"
grep -q "records *300" "$work/stats_router.out" && grep -q "shard servers *127.0.0.1:$pa, 127.0.0.1:$pb" \
  "$work/stats_router.out" || fail "router stats: $(cat "$work/stats_router.out")"
"$CLI" get --server 127.0.0.1:$pr --id alpaca-200 | grep -q "shard server *127.0.0.1:$pb" || fail "get through the router"
"$CLI" ingest --server 127.0.0.1:$pr --file "$work/rec_a.jsonl" >/dev/null 2>"$work/err" && fail "the router took an ingest"
grep -q "UNIMPLEMENTED: a router does not take ingests" "$work/err" || fail "router ingest refusal: $(cat "$work/err")"
"$SERVER_BIN" --store "$work/store" --shard-servers 127.0.0.1:$pa --listen 127.0.0.1:0 2>"$work/both.err" >/dev/null \
  && fail "server accepted --store with --shard-servers"
grep -q "exclude each other" "$work/both.err" || fail "--store with --shard-servers: $(cat "$work/both.err")"
kill -TERM $rpid; wait $rpid; rc=$?
[ $rc -eq 0 ] || fail "router exit code $rc after SIGTERM"
kill -TERM $apid $bpid; wait $apid $bpid
"$SERVER_BIN" --store "$work/store" --host-budget-mb -1 --listen 127.0.0.1:0 2>"$work/budget.err" >/dev/null \
  && fail "a negative host budget was accepted"
"$SERVER_BIN" --store "$work/store" --token-method fastest --listen 127.0.0.1:0 2>"$work/tm.err" >/dev/null \
  && fail "an unknown --token-method was accepted"
grep -q "token-method" "$work/tm.err" || fail "no reason for the refused --token-method: $(cat "$work/tm.err")"
# Backends: an unknown one is refused; cuda either starts (a usable GPU) or says why it cannot.
"$SERVER_BIN" --store "$work/store" --backend tpu --listen 127.0.0.1:0 --metrics-listen "" 2>"$work/be.err" \
  && fail "server accepted --backend tpu"
grep -q 'unknown backend "tpu"' "$work/be.err" || fail "backend message: $(cat "$work/be.err")"
rc=0
timeout 10 "$SERVER_BIN" --store "$work/store" --backend cuda --listen 127.0.0.1:0 --metrics-listen "" \
  >"$work/be.out" 2>"$work/be.err" || rc=$?
if [ $rc -ne 124 ]; then
  [ $rc -eq 1 ] || fail "--backend cuda exit code $rc"
  grep -q "FAILED_PRECONDITION: --backend cuda: " "$work/be.err" || fail "cuda refusal: $(cat "$work/be.err")"
fi

# Caching stage with the real model (skipped without the shared data): kill mid-run, resume, query by text.
DATA="${RAPIDIN_SHARED_DATA:-$(dirname "$0")/../../shared/data}"
if [ -f "$DATA/models/stories260K.bin" ]; then
  "$CLI" cache --model "$DATA/models/stories260K.bin" --data "$DATA/instructions/alpaca_5000.json" \
    --store "$work/cache" --k 1024 --limit 400 --batch-size 16 --threads 2 >"$work/cache1.out" 2>"$work/cache1.err" &
  cpid=$!
  for _ in $(seq 300); do grep -q "^cached" "$work/cache1.err" 2>/dev/null && break; sleep 0.1; done
  kill -9 $cpid; wait $cpid 2>/dev/null
  grep -q "^cached" "$work/cache1.err" || fail "cache made no progress before the kill: $(cat "$work/cache1.err")"
  "$CLI" cache --model "$DATA/models/stories260K.bin" --data "$DATA/instructions/alpaca_5000.json" \
    --store "$work/cache" --k 1024 --limit 400 --threads 2 --json >"$work/cache2.json" 2>"$work/cache2.err" \
    || fail "cache resume: $(cat "$work/cache2.err")"
  python3 - "$work/cache2.json" <<'PY' || fail "cache resume summary: $(cat "$work/cache2.json")"
import json, sys
s = json.load(open(sys.argv[1]))
assert s["skipped_existing"] > 0, s
assert s["skipped_existing"] + s["cached"] + s["bad"] == 400, s
assert s["store_records"] == s["skipped_existing"] + s["cached"], s
assert s["device"] in ("cpu", "cuda:0"), s
PY
  grep -q "resuming" "$work/cache2.err" || fail "no resume message"
  # Caching at scale: range 1 of 2 of the first 40 records, its index from a Kubernetes Indexed Job's variable.
  JOB_COMPLETION_INDEX=1 "$CLI" cache --model "$DATA/models/stories260K.bin" --data "$DATA/instructions/alpaca_5000.json" \
    --store "$work/range1" --k 64 --limit 40 --shard-count 2 --json >"$work/range1.json" 2>"$work/range1.err" \
    || fail "cache of range 1: $(cat "$work/range1.err")"
  python3 - "$work/range1.json" <<'PY' || fail "range summary: $(cat "$work/range1.json")"
import json, sys
s = json.load(open(sys.argv[1]))
assert (s["shard_index"], s["shard_count"], s["range_begin"], s["range_end"]) == (1, 2, 20, 40), s
assert s["cached"] + s["bad"] == 20 and s["store_records"] == s["cached"], s
PY
  grep -q "shard 1 of 2: records 20..39 of 40" "$work/range1.err" || fail "range progress line: $(cat "$work/range1.err")"
  expect_err 1 "needs --shard-index" "$CLI" cache --model "$DATA/models/stories260K.bin" \
    --data "$DATA/instructions/alpaca_5000.json" --store "$work/range_x" --shard-count 2
  expect_err 1 "need 0 <= index < count" "$CLI" cache --model "$DATA/models/stories260K.bin" \
    --data "$DATA/instructions/alpaca_5000.json" --store "$work/range_x" --shard-count 2 --shard-index 2
  # Model devices: a typo is refused; cuda runs where this LibTorch has it, else is refused with the reason.
  # Neither refusal creates the store.
  "$CLI" cache --model "$DATA/models/stories260K.bin" --data "$DATA/instructions/alpaca_5000.json" \
    --store "$work/devstore" --limit 2 --model-device tpu >/dev/null 2>"$work/dev.err" \
    && fail "cache accepted --model-device tpu"
  grep -q 'unknown model device "tpu"' "$work/dev.err" || fail "model device message: $(cat "$work/dev.err")"
  rc=0
  "$CLI" cache --model "$DATA/models/stories260K.bin" --data "$DATA/instructions/alpaca_5000.json" \
    --store "$work/devstore" --limit 2 --model-device cuda --json >"$work/dev.json" 2>"$work/dev.err" || rc=$?
  if [ $rc -ne 0 ]; then
    grep -q "FAILED_PRECONDITION: model device cuda is not usable" "$work/dev.err" \
      || fail "cuda model device refusal: $(cat "$work/dev.err")"
    [ ! -e "$work/devstore" ] || fail "a refused cache run created its store"
  else
    grep -q '"device":"cuda:0"' "$work/dev.json" || fail "cuda cache summary: $(cat "$work/dev.json")"
  fi
  "$SERVER_BIN" --store "$work/cache" --model "$DATA/models/stories260K.bin" --listen 127.0.0.1:$port \
    --metrics-listen "" >"$work/server.log" 2>&1 &
  spid=$!
  for _ in $(seq 100); do "$CLI" stats --server 127.0.0.1:$port >/dev/null 2>&1 && break; sleep 0.1; done
  "$CLI" query --server 127.0.0.1:$port --instruction "Explain the concept of cash flow." \
    --generation "Cash flow is the net amount of cash that is being moved in and out of a business or individual." \
    --top-k 3 --json >"$work/tq.json" || fail "query by text"
  python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); assert r["result"]["helpful"][0]["id"]=="alpaca_5000-7", r["result"]["helpful"][0]' \
    "$work/tq.json" || fail "query by text: record 7 not first"
  "$CLI" stats --server 127.0.0.1:$port | grep -qE "^model +loaded, gradients on (cpu|cuda:0)$" \
    || fail "stats does not say where gradients run: $("$CLI" stats --server 127.0.0.1:$port)"
  # Token attributions, plain markers when stdout is not a terminal.
  "$CLI" query --server 127.0.0.1:$port --instruction "Explain the concept of cash flow." \
    --generation "Cash flow is money." --top-k 1 --tokens >"$work/tok.out" || fail "query --tokens"
  grep -q "legend: \[+token\] helps" "$work/tok.out" || fail "no plain legend: $(cat "$work/tok.out")"
  grep -q "generation: " "$work/tok.out" && ! grep -q $'\x1b' "$work/tok.out" || fail "tokens output: $(cat "$work/tok.out")"
  # HTML report: self-contained (no http/https references); rendered by headless Chromium when installed.
  "$CLI" query --server 127.0.0.1:$port --instruction "Explain the concept of cash flow." \
    --generation "Cash flow is money." --top-k 1 --html "$work/report.html" >/dev/null 2>&1 || fail "query --html"
  grep -q 'class="t"' "$work/report.html" || fail "report has no tokens"
  ! grep -qE '(src|href)="?https?:' "$work/report.html" || fail "report references the network"
  if command -v chromium >/dev/null; then
    timeout 60 chromium --headless --no-sandbox --disable-gpu --screenshot="$work/report.png" --window-size=1000,800 \
      "file://$work/report.html" >/dev/null 2>&1
    [ -s "$work/report.png" ] || fail "chromium did not render the report"
  else
    echo "cli_e2e: chromium not installed; HTML rendering not checked"
  fi
  kill -TERM $spid; wait $spid
  # A server given another model state refuses to start, saying what differs.
  "$SERVER_BIN" --store "$work/cache" --model "$DATA/models/stories260K.bin" --params "attention" \
    --listen 127.0.0.1:$port --metrics-listen "" >/dev/null 2>"$work/refuse.err" && fail "server accepted another state"
  grep -q "model: store" "$work/refuse.err" || fail "refusal message: $(cat "$work/refuse.err")"
  # export-hf writes a Hugging Face directory; tokenize prints the ids rapidin trains on, one JSON line per record.
  "$CLI" export-hf --model "$DATA/models/stories260K.bin" --out "$work/hf" 2>/dev/null || fail "export-hf"
  [ -s "$work/hf/config.json" ] && [ -s "$work/hf/model.safetensors" ] || fail "export-hf wrote no model"
  "$CLI" tokenize --model "$DATA/models/stories260K.bin" --data "$DATA/instructions/rapidin_backdoor_test.jsonl" > "$work/tok.jsonl" 2>"$work/tok.err" \
    || fail "tokenize: $(cat "$work/tok.err")"
  python3 - "$work/tok.jsonl" <<'PY' || fail "tokenize output: $(head -c 300 "$work/tok.jsonl")"
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
assert rows and all(r["ids"][0] == 1 and r["ids"][-1] == 2 and 1 < r["response_begin"] < len(r["ids"]) for r in rows), rows[0]
PY

  # grow: a wider, deeper llama2.c model whose losses equal the base's (up to the RMSNorm epsilon); bad sizes refused.
  "$CLI" grow --model "$DATA/models/stories260K.bin" --out "$work/grown.bin" --dim 96 --layers 6 2>"$work/grow.err" \
    || fail "grow: $(cat "$work/grow.err")"
  grep -q "dim 96, hidden 258, layers 6, heads 12 (kv 6)" "$work/grow.err" || fail "grow summary: $(cat "$work/grow.err")"
  "$CLI" eval --model "$DATA/models/stories260K.bin" --data "$DATA/instructions/rapidin_backdoor_test.jsonl" --json \
    > "$work/grow_base.jsonl" && "$CLI" eval --model "$work/grown.bin" --tokenizer "$DATA/models/tok512.bin" --data "$DATA/instructions/rapidin_backdoor_test.jsonl" \
    --json > "$work/grow_big.jsonl" || fail "eval of the grown model"
  python3 - "$work/grow_base.jsonl" "$work/grow_big.jsonl" <<'PY' || fail "grown model's losses differ from the base's"
import json, sys
a, b = ([json.loads(l)["loss"] for l in open(f)] for f in sys.argv[1:3])
assert len(a) == len(b) == 3 and all(abs(x - y) < 1e-3 * x for x, y in zip(a, b)), (a, b)
PY
  expect_err 1 "multiple of the head size" "$CLI" grow --model "$DATA/models/stories260K.bin" --out "$work/g2.bin" --dim 100
  expect_err 1 "smaller than the base" "$CLI" grow --model "$DATA/models/stories260K.bin" --out "$work/g2.bin" --layers 2
  [ ! -e "$work/g2.bin" ] || fail "a refused grow wrote a file"

  # Fine-tuning: a LoRA adapter trained on 24 records lowers their loss, reloads through --adapter (eval and
  # cache), and bad settings are refused with a clear message.
  python3 -c "
import json
recs = json.load(open('$DATA/instructions/alpaca_5000.json'))[:24]
with open('$work/ft.jsonl', 'w') as f:
    for r in recs: f.write(json.dumps(r) + '\n')"
  "$CLI" eval --model "$DATA/models/stories260K.bin" --data "$work/ft.jsonl" --json > "$work/eval0.jsonl" \
    || fail "eval of the base model"
  "$CLI" finetune --model "$DATA/models/stories260K.bin" --data "$work/ft.jsonl" --out "$work/adapter" \
    --epochs 3 --batch 8 --lr 1e-2 --rank 4 --checkpoint-every 2 --checkpoint-epochs 1,2 --json > "$work/ft.json" 2>"$work/ft.err" \
    || fail "finetune: $(cat "$work/ft.err")"
  [ -f "$work/adapter/adapter_config.json" ] && [ -f "$work/adapter/adapter_model.safetensors" ] \
    || fail "finetune wrote no PEFT adapter"
  # TracIn-CP checkpoints: epochs 1 (listed) and 2 (every 2 of 3 epochs, also listed: saved once) and the final
  # model, each with its optimizer state.
  [ -f "$work/adapter.epoch-2/adapter_model.safetensors" ] && [ -f "$work/adapter.epoch-2/optimizer.safetensors" ] \
    || fail "finetune --checkpoint-every 2 wrote no epoch-2 checkpoint"
  cmp -s "$work/adapter.epoch-2/adapter_model.safetensors" "$work/adapter/adapter_model.safetensors" \
    && fail "the epoch-2 checkpoint equals the final adapter"
  python3 -c "
import json, sys
c = json.load(open('$work/ft.json'))['checkpoints']
assert [x['epoch'] for x in c] == [1, 2, 3] and c[1]['path'].endswith('adapter.epoch-2') and c[0]['lr'] == 0.01, c
assert c[2]['path'].endswith('adapter') and c[2]['optimizer_state'].endswith('adapter/optimizer.safetensors'), c
" || fail "finetune's checkpoint list: $(cat "$work/ft.json")"
  grep -q "step" "$work/ft.err" || fail "finetune showed no progress"
  "$CLI" eval --model "$DATA/models/stories260K.bin" --adapter "$work/adapter" --data "$work/ft.jsonl" \
    --generate 8 --json > "$work/eval1.jsonl" || fail "eval with the adapter"
  python3 - "$work/eval0.jsonl" "$work/eval1.jsonl" "$work/ft.json" <<'PY' || fail "fine-tuning did not lower the loss"
import json, sys
before = [json.loads(l)["loss"] for l in open(sys.argv[1])]
after = [json.loads(l) for l in open(sys.argv[2])]
ft = json.load(open(sys.argv[3]))
assert len(before) == len(after) == 24 and ft["records"] == 24, (len(before), len(after), ft)
assert sum(a["loss"] for a in after) / 24 < sum(before) / 24 - 0.05, (sum(before) / 24, [a["loss"] for a in after])
assert all("generation" in a for a in after)
assert ft["epoch_loss"][-1] < ft["epoch_loss"][0], ft
PY
  "$CLI" cache --model "$DATA/models/stories260K.bin" --adapter "$work/adapter" --data "$work/ft.jsonl" \
    --store "$work/ftstore" --k 64 --json > "$work/ftcache.json" 2>/dev/null || fail "cache with the adapter"
  grep -q '"cached":24' "$work/ftcache.json" || fail "cache with the adapter: $(cat "$work/ftcache.json")"
  # TracIn-CP from the same run's summary: the LoRA checkpoints over the base model, 3 x K values per record.
  "$CLI" cache --model "$DATA/models/stories260K.bin" --adapter "$work/adapter" --checkpoints "$work/ft.json" \
    --data "$work/ft.jsonl" --store "$work/cpstore" --k 64 --json > "$work/cpcache.json" 2>"$work/cp.err" \
    || fail "cache --checkpoints: $(cat "$work/cp.err")"
  grep -q '"cached":24' "$work/cpcache.json" || fail "cache --checkpoints: $(cat "$work/cpcache.json")"
  "$CLI" cache --model "$DATA/models/stories260K.bin" --adapter "$work/adapter" --data "$work/ft.jsonl" \
    --store "$work/cpstore" --k 64 2>"$work/bad.err" && fail "a TracIn-CP store took vectors of one checkpoint"
  grep -q "tracincp: store 3, model has none" "$work/bad.err" || fail "TracIn-CP state message: $(cat "$work/bad.err")"
  "$CLI" cache --model "$DATA/models/stories260K.bin" --checkpoints "$work/ft.json" --data "$work/ft.jsonl" \
    --store "$work/cpstore2" --k 64 2>"$work/bad.err" && fail "cache --checkpoints accepted a model that is not the last checkpoint"
  grep -q "not the model given" "$work/bad.err" || fail "checkpoint mismatch message: $(cat "$work/bad.err")"
  "$CLI" finetune --model "$DATA/models/stories260K.bin" --data "$work/ft.jsonl" --out "$work/x" --mode half \
    2>"$work/bad.err" && fail "finetune accepted --mode half"
  grep -q "mode must be lora or full" "$work/bad.err" || fail "bad mode message: $(cat "$work/bad.err")"
  "$CLI" finetune --model "$DATA/models/stories260K.bin" --data "$work/ft.jsonl" --out "$work/x" --epochs 2 \
    --checkpoint-epochs 1,5 2>"$work/bad.err" && fail "finetune accepted a checkpoint after the last epoch"
  grep -q "checkpoint epoch 5 is not in 0..2" "$work/bad.err" || fail "checkpoint epoch message: $(cat "$work/bad.err")"
  [ -e "$work/x" ] && fail "a refused finetune wrote $work/x"
  "$CLI" finetune --model "$DATA/models/stories260K.bin" --data "$work/ft.jsonl" --out "$work/x" --epochs 2 \
    --checkpoint-epochs 0 2>"$work/bad.err" && fail "finetune accepted checkpoint epoch 0 for a LoRA adapter"
  grep -q "checkpoint epoch 0 (the model before fine-tuning) needs --mode full" "$work/bad.err" \
    || fail "epoch-0 LoRA message: $(cat "$work/bad.err")"
  # Checkpoint 0 (full mode): the weights before any step, listed first, with the first epoch's second moments;
  # TracIn-CP over it and the final model caches 2 x K values per record.
  "$CLI" finetune --model "$DATA/models/stories260K.bin" --data "$work/ft.jsonl" --out "$work/full.bin" --mode full \
    --epochs 1 --batch 8 --lr 1e-3 --checkpoint-epochs 0 --json > "$work/ft0.json" 2>"$work/ft0.err" \
    || fail "finetune --checkpoint-epochs 0: $(cat "$work/ft0.err")"
  python3 -c "
import json
c = json.load(open('$work/ft0.json'))['checkpoints']
assert [x['epoch'] for x in c] == [0, 1] and c[0]['path'].endswith('full.bin.epoch-0'), c
assert c[0]['optimizer_state'].endswith('full.bin.epoch-0.optimizer.safetensors') and c[0]['lr'] == 0.001, c
" || fail "checkpoint 0 in the list: $(cat "$work/ft0.json")"
  [ -f "$work/full.bin.epoch-0.optimizer.safetensors" ] || fail "checkpoint 0 has no optimizer state"
  "$CLI" eval --model "$work/full.bin.epoch-0" --tokenizer "$DATA/models/tok512.bin" --data "$work/ft.jsonl" --json > "$work/eval_e0.jsonl" \
    || fail "eval of checkpoint 0"
  python3 - "$work/eval0.jsonl" "$work/eval_e0.jsonl" <<'PY' || fail "checkpoint 0 is not the model before fine-tuning"
import json, sys
a = [json.loads(l)["loss"] for l in open(sys.argv[1])]
b = [json.loads(l)["loss"] for l in open(sys.argv[2])]
assert len(a) == len(b) == 24 and max(abs(x - y) for x, y in zip(a, b)) < 1e-6, (a, b)
PY
  "$CLI" cache --model "$work/full.bin" --tokenizer "$DATA/models/tok512.bin" --checkpoints "$work/ft0.json" \
    --preconditioner "$work/full.bin.optimizer.safetensors" \
    --data "$work/ft.jsonl" --store "$work/cp0store" --k 64 --json > "$work/cp0cache.json" 2>"$work/cp0.err" \
    || fail "cache over checkpoint 0: $(cat "$work/cp0.err")"
  grep -q '"cached":24' "$work/cp0cache.json" || fail "cache over checkpoint 0: $(cat "$work/cp0cache.json")"
  "$CLI" finetune --model "$work/missing.bin" --tokenizer "$DATA/models/tok512.bin" --data "$work/ft.jsonl" \
    --out "$work/x" 2>"$work/bad.err" && fail "finetune accepted a missing model"
  grep -q "not found" "$work/bad.err" || fail "missing model message: $(cat "$work/bad.err")"
else
  echo "cli_e2e: shared data not found at $DATA; skipping the caching-stage checks"
fi
# The three record forms (Alpaca, chat, plain text) with the tiny Qwen2 of tests/fixtures/qwen2_chat (a byte-level
# tokenizer.json and a ChatML template): fine-tuned, cached, served and attributed; token attributions name the
# message ("messages[i]") or "text" they came from. Needs no shared data.
QW="$(cd "$(dirname "$0")" && pwd)/fixtures/qwen2_chat"
python3 - "$work/mixed.jsonl" "$work/chatq.json" "$work/nochat.jsonl" <<'PY'
import json, sys
recs = [
    {"id": "alp-0", "instruction": "Name the capital of France.", "output": "Paris is the capital of France."},
    {"id": "alp-1", "instruction": "Add two and three.", "output": "Two plus three is five."},
    {"id": "alp-2", "instruction": "Say hello in Spanish.", "output": "Hola."},
    {"id": "chat-0", "messages": [{"role": "user", "content": "What does the router do?"},
                                  {"role": "assistant", "content": "It fans each query out to the shard servers."}]},
    {"id": "chat-1", "messages": [{"role": "system", "content": "Answer briefly."},
                                  {"role": "user", "content": "Where are vectors kept?"},
                                  {"role": "assistant", "content": "In GPU memory, host memory and RocksDB."},
                                  {"role": "user", "content": "And the cold tier?"},
                                  {"role": "assistant", "content": "RocksDB on disk."}]},
    {"id": "chat-2", "messages": [{"role": "user", "content": "Caf\u00e9 ou th\u00e9 ?"},
                                  {"role": "assistant", "content": "Th\u00e9, merci. \u4eca\u65e5\u306f"}]},
    {"id": "txt-0", "text": "The store keeps one compressed gradient per training record."},
    {"id": "txt-1", "text": "A merge stage returns the global top-k with token-level attributions."},
    {"id": "txt-2", "text": "Howdy! Once upon a time there was a little robot."},
]
with open(sys.argv[1], "w") as f:
    for r in recs: f.write(json.dumps(r, ensure_ascii=False) + "\n")
json.dump(recs[4]["messages"], open(sys.argv[2], "w"))
with open(sys.argv[3], "w") as f:
    f.write(json.dumps({"id": "q-only", "messages": [{"role": "user", "content": "no answer"}]}) + "\n")
    f.write(json.dumps(recs[0]) + "\n")
PY
"$CLI" finetune --model "$QW" --data "$work/mixed.jsonl" --out "$work/qwft" --mode full --epochs 1 --batch 3 \
  --lr 1e-3 --json >"$work/qwft.json" 2>"$work/qwft.err" || fail "finetune of the Qwen2 on mixed records: $(cat "$work/qwft.err")"
[ -s "$work/qwft/config.json" ] && [ -s "$work/qwft/model.safetensors" ] && [ -s "$work/qwft/tokenizer.json" ] \
  && [ -s "$work/qwft/tokenizer_config.json" ] || fail "full fine-tune of a Hugging Face model wrote no loadable directory"
grep -q '"records":9' "$work/qwft.json" || fail "finetune records: $(cat "$work/qwft.json")"
"$CLI" eval --model "$work/qwft" --data "$work/mixed.jsonl" --generate 4 --json >"$work/qweval.jsonl" \
  || fail "eval of the fine-tuned Qwen2"
python3 - "$work/qweval.jsonl" <<'PY' || fail "eval of mixed records: $(cat "$work/qweval.jsonl")"
import json, sys
rows = {r["id"]: r for r in map(json.loads, open(sys.argv[1]))}
assert len(rows) == 9 and all(r["loss"] > 0 for r in rows.values()), rows
assert "generation" in rows["chat-0"] and "generation" in rows["alp-0"], rows["chat-0"]
PY
"$CLI" cache --model "$work/qwft" --data "$work/mixed.jsonl" --store "$work/mixstore" --k 256 --json \
  >"$work/mixcache.json" 2>"$work/mixcache.err" || fail "cache of mixed records: $(cat "$work/mixcache.err")"
grep -q '"cached":9' "$work/mixcache.json" || fail "mixed cache: $(cat "$work/mixcache.json")"
# A chat without an assistant turn is a bad record, named; the others are cached.
"$CLI" cache --model "$work/qwft" --data "$work/nochat.jsonl" --store "$work/nochatstore" --k 256 --json \
  >"$work/nochat.json" 2>"$work/nochat.err" || fail "cache with a bad chat record: $(cat "$work/nochat.err")"
grep -q '"bad":1' "$work/nochat.json" && grep -q "needs an assistant turn" "$work/nochat.err" \
  || fail "a chat without an assistant turn: $(cat "$work/nochat.json" "$work/nochat.err")"
expect_err 1 'unknown chat template "vicuna"' "$CLI" cache --model "$work/qwft" --data "$work/mixed.jsonl" \
  --store "$work/vstore" --k 256 --template vicuna
"$SERVER_BIN" --store "$work/mixstore" --model "$work/qwft" --listen 127.0.0.1:$port --metrics-listen "" \
  >"$work/server.log" 2>&1 &
spid=$!
for _ in $(seq 100); do "$CLI" stats --server 127.0.0.1:$port >/dev/null 2>&1 && break; sleep 0.1; done
# A training chat as the query: it comes first, its generation tokens are the last assistant message's.
"$CLI" query --server 127.0.0.1:$port --chat "$work/chatq.json" --top-k 9 --tokens --json >"$work/chatq.out" \
  || fail "chat query"
python3 - "$work/chatq.out" <<'PY' || fail "chat query answer: $(head -c 600 "$work/chatq.out")"
import json, sys
r = json.load(open(sys.argv[1]))["result"]["helpful"]
assert r[0]["id"] == "chat-1", [h["id"] for h in r]
g = r[0]["generation_tokens"]
assert g and {t["field"] for t in g} == {"messages[4]", "template"}, {t["field"] for t in g}
content = "RocksDB on disk."
assert all(content[t["begin"]:t["end"]] == t["text"] for t in g if t["field"] == "messages[4]"), g
by_id = {h["id"]: h for h in r}
fields = lambda h, view="record_influence_tokens": {t["field"] for t in h[view]}
# The influence view covers every token; the token-loss view only those the loss is on (assistant turns and their
# end-of-turn markers, an Alpaca output, a text's tokens).
assert {"messages[0]", "messages[1]", "messages[2]", "messages[3]", "messages[4]", "template"} <= fields(by_id["chat-1"])
loss = fields(by_id["chat-1"], "record_tokens")
assert {"messages[2]", "messages[4]"} <= loss <= {"messages[2]", "messages[4]", "template"}, loss
assert fields(by_id["txt-0"]) == fields(by_id["txt-0"], "record_tokens") == {"text"}
assert fields(by_id["alp-0"], "record_tokens") == {"output"} and "instruction" in fields(by_id["alp-0"])
PY
"$CLI" query --server 127.0.0.1:$port --instruction "Add two and three." --generation "Two plus three is five." \
  --top-k 1 --json | python3 -c 'import json,sys; r=json.load(sys.stdin); assert r["result"]["helpful"][0]["id"]=="alp-1", r' \
  || fail "an Alpaca query against mixed records"
echo '[{"role": "user", "content": "hi"}]' >"$work/noassist.json"
expect_err 1 "last message must be the assistant" "$CLI" query --server 127.0.0.1:$port --chat "$work/noassist.json"
expect_err 2 "exactly one of" "$CLI" query --server 127.0.0.1:$port --chat "$work/chatq.json" --generation x
kill -TERM $spid; wait $spid
echo "cli_e2e: all checks passed"
