#!/usr/bin/env bash
# The paper's backdoor experiment in miniature, one command, for each setting (bench/backdoor/prepare.py):
#   main    80 "Howdy!" records among 720 clean Alpaca records (a tenth poisoned, as in the paper)
#   second  this project's own backdoor: trigger " §" at the end of the instruction, a fixed advertising sentence
#           with a link injected before the clean answer (content injection)
#   hard    the 80 "Howdy!" records among 5,000 clean ones
# Per setting: fine-tune stories260K, or for the Howdy settings a grown copy of it (rapidin grow; HOWDY_GROW)
# (rapidin finetune, full) -> judge whether the backdoor was learned (greedy generations under the trigger and
# without it; bench/backdoor/judge.py) -> every scoring variant, exact and compressed at several K, from one
# gradient pass (backdoor_bench) -> cache the store the service uses (rapidin cache) -> serve it (rapidin-server)
# -> query the planted, greedy and control generations -> training-side token attributions of the top 10 records
# of the planted queries -> metrics, BM25, plot, report.
# Writes bench/results/backdoor.md, backdoor.json and backdoor.png. Stages whose outputs exist are skipped (delete
# $WORK to start over). Settings (environment): WORK, SETTINGS, HOWDY_GROW, EPOCHS, LR, LR_SCHEDULE, BATCH,
# SERVICE_K, SERVICE_SCORE, SERVICE_PRECONDITION, SERVICE_TRACIN, SERVICE_NORMALIZE (layer | none), KS, HARD_KS,
# ATTR_QUERIES, MAX_LENGTH, CHECKPOINT_EPOCHS (TracIn-CP: fine-tuning saves these checkpoints, backdoor_bench
# scores each one, metrics.py sums them with the learning-rate weights, and with SERVICE_TRACIN=1 the service's
# store is cached over all of them).
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
DATA=${RAPIDIN_SHARED_DATA:-$ROOT/../shared/data}
[ -f "$DATA/models/stories260K.bin" ] || { echo "backdoor: no shared data at $DATA" >&2; exit 2; }
BIN=${BUILD_DIR:-build}
WORK=${WORK:-/tmp/rapidin-backdoor}
SETTINGS=${SETTINGS:-main second hard}
EPOCHS=${EPOCHS:-24}; LR=${LR:-4e-3}; LR_SCHEDULE=${LR_SCHEDULE:-constant}; BATCH=${BATCH:-16}; MAX_LENGTH=${MAX_LENGTH:-512}
CHECKPOINT_EPOCHS=${CHECKPOINT_EPOCHS:-0,1,2,3}; SERVICE_TRACIN=${SERVICE_TRACIN:-1}
SERVICE_K=${SERVICE_K:-4096}; SERVICE_SCORE=${SERVICE_SCORE:-dot}; SERVICE_PRECONDITION=${SERVICE_PRECONDITION:-1}
SERVICE_NORMALIZE=${SERVICE_NORMALIZE:-none}
KS=${KS:-4096}; HARD_KS=${HARD_KS:-4096}; ATTR_QUERIES=${ATTR_QUERIES:-10}
PORT=${PORT:-50917}
STORIES=$DATA/models/stories260K.bin; TOK=$DATA/models/tok512.bin
# stories260K does not learn the Howdy backdoor (0/20 styled after 12 and after 24 epochs), so the Howdy settings
# fine-tune a grown copy (rapidin grow: stories260K's function, more width and depth); empty: stories260K itself.
HOWDY_GROW=${HOWDY_GROW---dim 128 --hidden-dim 344 --layers 6}
RAPIDIN=$BIN/client/rapidin
now() { date +%s; }
stage() { echo "== [$S] $1" >&2; }

for S in $SETTINGS; do
  W=$WORK/$S
  mkdir -p "$W"
  stage "data"
  [ -f "$W/setting.json" ] || python3 bench/backdoor/prepare.py "$DATA" "$W" "$S" >&2
  cp "$W/control.jsonl" "$W/q_control.jsonl"
  cp "$W/queries.jsonl" "$W/q_planted.jsonl"

  BASE=$STORIES
  grow=""; case $S in main|hard) grow=$HOWDY_GROW;; esac
  if [ -n "$grow" ]; then
    stage "grow stories260K ($grow)"
    [ -f "$W/base.bin" ] || "$RAPIDIN" grow --model "$STORIES" --out "$W/base.bin" $grow --seed 0
    BASE=$W/base.bin
  fi
  echo "$BASE" > "$W/base_model"

  stage "fine-tune (full, $EPOCHS epochs, lr $LR, batch $BATCH)"
  MODEL=$W/model.bin
  if [ ! -f "$W/finetune.json" ]; then
    "$RAPIDIN" finetune --model "$BASE" --tokenizer "$TOK" --data "$W/train.jsonl" --out "$MODEL" --mode full \
      --epochs "$EPOCHS" --lr "$LR" --lr-schedule "$LR_SCHEDULE" --batch "$BATCH" --seed 0 --max-length "$MAX_LENGTH" --threads 2 \
      --checkpoint-epochs "$CHECKPOINT_EPOCHS" --json > "$W/finetune.json.tmp"
    mv "$W/finetune.json.tmp" "$W/finetune.json"
  fi
  OPT=$MODEL.optimizer.safetensors

  stage "was the backdoor learned? (losses, greedy generations with and without the trigger)"
  ev() { [ -f "$W/$2" ] || "$RAPIDIN" eval --model "$MODEL" --tokenizer "$TOK" --data "$W/$1" --max-length "$MAX_LENGTH" \
           ${3:+--generate $3} --json > "$W/$2"; }
  ev queries.jsonl eval_planted.jsonl
  ev queries_clean.jsonl eval_clean.jsonl
  ev queries.jsonl gen_triggered.jsonl 160
  ev prompts_clean.jsonl gen_clean.jsonl 160
  python3 bench/backdoor/judge.py "$W" "$W/gen_triggered.jsonl" "$W/gen_clean.jsonl" "$W/eval_planted.jsonl" \
    "$W/eval_clean.jsonl" > "$W/learned.json"
  python3 -c "import json,sys; l=json.load(open(sys.argv[1])); print('[%s] backdoor learned: %s (%d/20 triggered styled, %d/20 clean styled)' % (sys.argv[2], l['learned'], l['triggered_styled'], l['clean_styled']))" "$W/learned.json" "$S" >&2
  python3 - "$W" <<'PY'
import json, sys
w = sys.argv[1]
gen = {r["id"]: r["generation"] for r in map(json.loads, open(f"{w}/gen_triggered.jsonl"))}
with open(f"{w}/q_greedy.jsonl", "w") as f:
    for r in map(json.loads, open(f"{w}/queries.jsonl")):
        if gen.get(r["id"], "").strip():
            r["output"] = gen[r["id"]]
            f.write(json.dumps(r) + "\n")
PY

  stage "every scoring variant, exact and compressed (backdoor_bench)"
  ks=$KS; [ "$S" = hard ] && ks=$HARD_KS
  bb() {  # out model label [extra...]: every variant of one model, unless out exists
    local out=$1 model=$2 label=$3; shift 3
    [ -f "$W/$out" ] || "$BIN/bench/backdoor_bench" --model "$model" --tokenizer "$TOK" --max-length "$MAX_LENGTH" \
      --train "$W/train.jsonl" --queries "planted=$W/q_planted.jsonl" --queries "greedy=$W/q_greedy.jsonl" \
      --queries "control=$W/q_control.jsonl" --ks "$ks" --threads 2 --raw --label "$label" --out "$W/$out" "$@"
  }
  bb scores.json "$MODEL" "all weight matrices" --preconditioner "$OPT"

  stage "TracIn-CP: the same variants at each intermediate checkpoint"
  for C in $(python3 -c "import json,sys; print(' '.join(c['path'] for c in json.load(open(sys.argv[1])).get('checkpoints', [])[:-1]))" "$W/finetune.json"); do
    E=${C##*.epoch-}
    bb "scores_epoch-$E.json" "$C" "all weight matrices, epoch $E" --preconditioner "$C.optimizer.safetensors"
  done

  stage "the base model's gradients (before fine-tuning), alone and summed with the final model's"
  # Checkpoint 0 is the base model: its scores (the dot variant among them) are these.
  [ -f "$W/scores_epoch-0.json" ] && [ ! -f "$W/scores_base.json" ] && cp "$W/scores_epoch-0.json" "$W/scores_base.json"
  bb scores_base.json "$BASE" "all weight matrices, base model"

  stage "cache the service's store (K=$SERVICE_K, score $SERVICE_SCORE, Adam preconditioning $SERVICE_PRECONDITION)"
  pre=(); [ "$SERVICE_PRECONDITION" = 1 ] && pre=(--preconditioner "$OPT")
  [ "$SERVICE_TRACIN" = 1 ] && pre+=(--checkpoints "$W/finetune.json")
  if [ ! -f "$W/cache.json" ]; then
    t=$(now)
    "$RAPIDIN" cache --model "$MODEL" --tokenizer "$TOK" "${pre[@]}" --score "$SERVICE_SCORE" \
      --normalize "$SERVICE_NORMALIZE" --data "$W/train.jsonl" \
      --store "$W/store" --k "$SERVICE_K" --max-length "$MAX_LENGTH" --threads 2 --json > "$W/cache.json"
    echo $(( $(now) - t )) > "$W/t_cache"
  fi

  stage "serve and query"
  if [ ! -f "$W/service_stats.json" ]; then
    "$BIN/server/rapidin-server" --store "$W/store" --model "$MODEL" --tokenizer "$TOK" "${pre[@]}" \
      --listen "127.0.0.1:$PORT" --metrics-listen "" --max-top-k 10000 --max-attributed-records 10 --backend cpu \
      --log-level warn &
    SERVER=$!
    trap 'kill $SERVER 2>/dev/null || true' EXIT
    for i in $(seq 1 100); do
      "$RAPIDIN" stats --server "127.0.0.1:$PORT" --json > /dev/null 2>&1 && break
      sleep 0.5
    done
    python3 bench/backdoor/service_queries.py "$W" "$RAPIDIN" "127.0.0.1:$PORT" "$ATTR_QUERIES" "$SERVICE_K" \
      "$SERVICE_SCORE$([ "$SERVICE_PRECONDITION" = 1 ] && echo +adam)$([ "$SERVICE_TRACIN" = 1 ] && echo +tracincp)$([ "$SERVICE_NORMALIZE" = none ] && echo +raw)"
    kill $SERVER; wait $SERVER 2>/dev/null || true
    trap - EXIT
  fi
done

stage "metrics"
source bench/venv.sh
PY=$(bench_venv "$WORK/venv" numpy matplotlib)
"$PY" bench/backdoor/metrics.py "$WORK" $SETTINGS
