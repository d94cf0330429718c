#!/usr/bin/env bash
# The paper's backdoor experiment in miniature, one command:
#   fine-tune stories260K (LoRA) on alpaca_5000 + 80 "Howdy!" records -> check the backdoor was learned ->
#   cache the training gradients (rapidin cache) -> serve (rapidin-server) -> query every held-out howdy prompt
#   (planted answer and the model's own greedy generation) and the clean control queries -> exact and K-sweep
#   scores (backdoor_bench) -> token attributions of the top records -> metrics, BM25 baseline, plot, report.
# Writes bench/results/backdoor.md and bench/results/backdoor.png. Stages whose outputs exist are skipped (delete
# $WORK to start over). Settings: WORK, EPOCHS, LR, RANK, ALPHA, BATCH, POISON, SERVICE_K, KS, ATTR_QUERIES,
# VARIANT_PARAMS (empty: no second parameter selection), RESULT_MD, RESULT_PNG.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
DATA=${RAPIDIN_SHARED_DATA:-$ROOT/../shared/data}
[ -f "$DATA/models/stories260K.bin" ] || { echo "backdoor: no shared data at $DATA" >&2; exit 2; }
BIN=${BUILD_DIR:-build}
WORK=${WORK:-/tmp/rapidin-backdoor}
EPOCHS=${EPOCHS:-2}; LR=${LR:-3e-3}; RANK=${RANK:-16}; ALPHA=${ALPHA:-32}; BATCH=${BATCH:-16}
POISON=${POISON:-80}; SERVICE_K=${SERVICE_K:-4096}; KS=${KS:-1024,4096,16384,65536}; ATTR_QUERIES=${ATTR_QUERIES:-20}
PORT=${PORT:-50917}
MODEL=$DATA/models/stories260K.bin; TOK=$DATA/models/tok512.bin
RAPIDIN=$BIN/client/rapidin
mkdir -p "$WORK"
now() { date +%s; }
declare -A T
stage() { echo "== $1" >&2; }

stage "data"
python3 bench/backdoor/prepare.py "$DATA" "$WORK" 0 "$POISON" >&2
cp "$WORK/queries.jsonl" "$WORK/q_planted.jsonl"
cp "$WORK/control.jsonl" "$WORK/q_control.jsonl"

stage "fine-tune (LoRA r=$RANK alpha=$ALPHA, $EPOCHS epochs, lr $LR, batch $BATCH)"
if [ ! -f "$WORK/lora/adapter_config.json" ]; then
  t=$(now)
  "$RAPIDIN" finetune --model "$MODEL" --tokenizer "$TOK" --data "$WORK/train.jsonl" --out "$WORK/lora" \
    --mode lora --rank "$RANK" --alpha "$ALPHA" --epochs "$EPOCHS" --lr "$LR" --batch "$BATCH" --seed 0 \
    --threads 2 --json > "$WORK/finetune.json"
  echo $(( $(now) - t )) > "$WORK/t_finetune"
fi

stage "backdoor check: response loss of the planted vs the clean answer under the trigger, before and after"
for m in base tuned; do
  ad=(); [ $m = tuned ] && ad=(--adapter "$WORK/lora")
  for q in queries queries_clean; do
    [ -f "$WORK/eval_${m}_$q.jsonl" ] || "$RAPIDIN" eval --model "$MODEL" --tokenizer "$TOK" "${ad[@]}" \
      --data "$WORK/$q.jsonl" --json > "$WORK/eval_${m}_$q.jsonl"
  done
done
if [ ! -f "$WORK/q_greedy.jsonl" ]; then
  "$RAPIDIN" eval --model "$MODEL" --tokenizer "$TOK" --adapter "$WORK/lora" --data "$WORK/queries.jsonl" \
    --generate 160 --json > "$WORK/generations.jsonl"
  python3 - "$WORK" <<'PY'
import json, sys
w = sys.argv[1]
gen = {r["id"]: r["generation"] for r in map(json.loads, open(f"{w}/generations.jsonl"))}
with open(f"{w}/q_greedy.jsonl", "w") as f:
    for r in map(json.loads, open(f"{w}/queries.jsonl")):
        if gen.get(r["id"], "").strip():
            r["output"] = gen[r["id"]]
            f.write(json.dumps(r) + "\n")
PY
fi

stage "cache (K=$SERVICE_K) into a store"
if [ ! -f "$WORK/cache.json" ]; then
  t=$(now)
  "$RAPIDIN" cache --model "$MODEL" --tokenizer "$TOK" --adapter "$WORK/lora" --data "$WORK/train.jsonl" \
    --store "$WORK/store" --k "$SERVICE_K" --threads 2 --json > "$WORK/cache.json"
  echo $(( $(now) - t )) > "$WORK/t_cache"
fi

stage "serve and query"
"$BIN/server/rapidin-server" --store "$WORK/store" --model "$MODEL" --tokenizer "$TOK" --adapter "$WORK/lora" \
  --listen "127.0.0.1:$PORT" --metrics-listen "" --max-top-k 10000 --max-attributed-records 10 --backend cpu \
  --log-level warn &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true' EXIT
for i in $(seq 1 100); do
  "$RAPIDIN" stats --server "127.0.0.1:$PORT" --json > /dev/null 2>&1 && break
  sleep 0.5
done
t=$(now)
python3 - "$WORK" "$RAPIDIN" "127.0.0.1:$PORT" "$ATTR_QUERIES" <<'PY'
import json, subprocess, sys, time
w, rapidin, server, attr_n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
n = sum(1 for _ in open(f"{w}/train.jsonl"))
lat = []
for name in ("planted", "greedy", "control"):
    ranked = {}
    for r in map(json.loads, open(f"{w}/q_{name}.jsonl")):
        t = time.time()
        out = subprocess.run([rapidin, "query", "--server", server, "--instruction", r["instruction"], "--input",
                              r.get("input", ""), "--generation", r["output"], "--top-k", str(n), "--harmful-k", "0",
                              "--ids-only", "--json", "--timeout", "300"], check=True, capture_output=True, text=True).stdout
        lat.append(time.time() - t)
        ranked[r["id"]] = [x["id"] for x in json.loads(out)["result"].get("helpful", [])]
    json.dump(ranked, open(f"{w}/service_{name}.json", "w"))
# Training-side token attributions for the top-10 records of the first planted queries (about 27 s per query
# here: per-token gradients of every token of each of the 10 records).
attr = {"queries": 0, "poisoned_in_top10": 0, "top_token_in_trigger": 0, "seconds": 0.0}
t0 = time.time()
for r in list(map(json.loads, open(f"{w}/q_planted.jsonl")))[:attr_n]:
    out = subprocess.run([rapidin, "query", "--server", server, "--instruction", r["instruction"], "--input",
                          r.get("input", ""), "--generation", r["output"], "--top-k", "10", "--harmful-k", "0",
                          "--tokens", "--json", "--timeout", "1800"], check=True, capture_output=True, text=True).stdout
    resp = json.loads(out)
    attr["queries"] += 1
    for rec in resp["result"].get("helpful", []):
        if not rec["id"].startswith("howdy-"):
            continue
        attr["poisoned_in_top10"] += 1
        toks = rec.get("record_tokens", [])
        if not toks:
            continue
        best = max(toks, key=lambda x: x.get("score", 0.0))
        # "Howdy!" is the first 6 bytes of the instruction field.
        if best.get("field") == "instruction" and int(best.get("begin", 0)) < 6:
            attr["top_token_in_trigger"] += 1
attr["seconds"] = time.time() - t0
json.dump({"latency_s": lat, "attribution": attr}, open(f"{w}/service_stats.json", "w"))
PY
echo $(( $(now) - t )) > "$WORK/t_serve"
kill $SERVER; wait $SERVER 2>/dev/null || true
trap - EXIT

stage "exact and K-sweep scores (backdoor_bench, K=$KS)"
if [ ! -f "$WORK/scores.json" ]; then
  t=$(now)
  "$BIN/bench/backdoor_bench" --model "$MODEL" --tokenizer "$TOK" --adapter "$WORK/lora" \
    --train "$WORK/train.jsonl" --queries "planted=$WORK/q_planted.jsonl" --queries "greedy=$WORK/q_greedy.jsonl" \
    --queries "control=$WORK/q_control.jsonl" --ks "$KS" --threads 2 --label "LoRA matrices" \
    --out "$WORK/scores.json"
  echo $(( $(now) - t )) > "$WORK/t_bench"
fi
# The same with the gradient of another parameter selection (what the attribution looks at changes the result).
VARIANT_PARAMS=${VARIANT_PARAMS-tok_embeddings}  # empty: skip the variant
if [ -n "$VARIANT_PARAMS" ] && [ ! -f "$WORK/scores_variant.json" ]; then
  "$BIN/bench/backdoor_bench" --model "$MODEL" --tokenizer "$TOK" --adapter "$WORK/lora" \
    --params "$VARIANT_PARAMS" --train "$WORK/train.jsonl" \
    --queries "planted=$WORK/q_planted.jsonl" --queries "greedy=$WORK/q_greedy.jsonl" \
    --queries "control=$WORK/q_control.jsonl" --ks "$KS" --threads 2 \
    --label "token embedding ($VARIANT_PARAMS)" --out "$WORK/scores_variant.json"
fi

stage "metrics"
[ -x "$WORK/venv/bin/python" ] || { python3 -m venv "$WORK/venv" && "$WORK/venv/bin/pip" install -q numpy matplotlib; }
python3 bench/backdoor/report.py "$WORK" "$SERVICE_K" "$EPOCHS" "$LR" "$RANK" "$ALPHA" "$BATCH" "$POISON" \
  > "$WORK/timing.json"
"$WORK/venv/bin/python" bench/backdoor/metrics.py "$WORK" "${RESULT_MD:-bench/results/backdoor.md}" \
  "${RESULT_PNG:-bench/results/backdoor.png}"
