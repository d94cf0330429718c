#!/usr/bin/env bash
# Linear datamodeling score (LDS), one command: how well does each method's score predict the loss of a model
# retrained without half of the records? (Park et al. 2023; the field's standard next to the backdoor benchmark.)
#   data (bench/lds/prepare.py: RECORDS clean Alpaca records, QUERIES held-out answers, SUBSETS random halves)
#   -> fine-tune stories260K on all records (rapidin finetune, full, with checkpoints) -> retrain on every half with
#   the same recipe and record each query's loss (rapidin eval) -> rapidin's variants (backdoor_bench: exact and
#   compressed, Adam preconditioning, every checkpoint, the base model) -> the peers on the same model, records and
#   queries (bench/peers: Kronfluence, TRAK, Bergson, BM25; each in its own virtual environment) -> bench/lds/lds.py
#   -> bench/results/lds.md and lds.json.
# Stages whose outputs exist are skipped (delete $WORK to start over). Settings (environment): WORK, RECORDS, QUERIES,
# SUBSETS, EPOCHS, LR, BATCH, MAX_LENGTH, CHECKPOINT_EPOCHS, KS, PEERS (0: rapidin only), TRAK_DIM, BERGSON_DIM.
set -euo pipefail
cd "$(dirname "$0")/../.."
DATA=${RAPIDIN_SHARED_DATA:-$PWD/../shared/data}
[ -f "$DATA/models/stories260K.bin" ] || { echo "lds: no shared data at $DATA" >&2; exit 2; }
BIN=${BUILD_DIR:-build}
WORK=${WORK:-/tmp/rapidin-lds}
RECORDS=${RECORDS:-500}; QUERIES=${QUERIES:-50}; SUBSETS=${SUBSETS:-50}
EPOCHS=${EPOCHS:-2}; LR=${LR:-4e-3}; BATCH=${BATCH:-16}; MAX_LENGTH=${MAX_LENGTH:-512}
CHECKPOINT_EPOCHS=${CHECKPOINT_EPOCHS:-0,1}; KS=${KS:-4096,16384,65536}; PEERS=${PEERS:-1}
BASE=$DATA/models/stories260K.bin; TOK=$DATA/models/tok512.bin
RAPIDIN=$BIN/client/rapidin
W=$WORK
mkdir -p "$W/retrain"
stage() { echo "== [lds] $1" >&2; }
recipe=(--mode full --epochs "$EPOCHS" --lr "$LR" --batch "$BATCH" --seed 0 --max-length "$MAX_LENGTH" --threads 2)

stage "data"
[ -f "$W/setting.json" ] || python3 bench/lds/prepare.py "$DATA" "$W" "$RECORDS" "$QUERIES" "$SUBSETS" >&2
M=$(python3 -c "import json,sys; print(len(json.load(open(sys.argv[1]))['subsets']))" "$W/setting.json")

stage "fine-tune on all records (full, $EPOCHS epochs, lr $LR, batch $BATCH)"
if [ ! -f "$W/finetune.json" ]; then
  "$RAPIDIN" finetune --model "$BASE" --tokenizer "$TOK" --data "$W/train.jsonl" --out "$W/model.bin" "${recipe[@]}" \
    --checkpoint-epochs "$CHECKPOINT_EPOCHS" --json > "$W/finetune.json.tmp"
  mv "$W/finetune.json.tmp" "$W/finetune.json"
fi
[ -f "$W/eval_lds.jsonl" ] || "$RAPIDIN" eval --model "$W/model.bin" --tokenizer "$TOK" --data "$W/q_lds.jsonl" \
  --max-length "$MAX_LENGTH" --json > "$W/eval_lds.jsonl"

stage "retrain on each of the $M halves with the same recipe; each query's loss"
for j in $(seq 0 $((M - 1))); do
  [ -f "$W/retrain/$j.eval.jsonl" ] && continue
  t0=$(date +%s)
  "$RAPIDIN" finetune --model "$BASE" --tokenizer "$TOK" --data "$W/subsets/$j.jsonl" --out "$W/retrain/$j.bin" \
    "${recipe[@]}" --json > /dev/null
  "$RAPIDIN" eval --model "$W/retrain/$j.bin" --tokenizer "$TOK" --data "$W/q_lds.jsonl" --max-length "$MAX_LENGTH" \
    --json > "$W/retrain/$j.eval.jsonl.tmp"
  mv "$W/retrain/$j.eval.jsonl.tmp" "$W/retrain/$j.eval.jsonl"
  rm -f "$W/retrain/$j.bin" "$W/retrain/$j.bin.optimizer.safetensors"
  echo $(( $(date +%s) - t0 )) > "$W/retrain/$j.seconds"
  echo "[lds] retrained $((j + 1)) / $M ($(cat "$W/retrain/$j.seconds") s)" >&2
done
python3 - "$W/retrain" "$M" "full fine-tuning, $EPOCHS epochs, lr $LR, batch $BATCH, max length $MAX_LENGTH, seed 0" <<'PY'
import json, os, sys
d, m, recipe = sys.argv[1], int(sys.argv[2]), sys.argv[3]
secs = [float(open(f"{d}/{j}.seconds").read()) for j in range(m) if os.path.exists(f"{d}/{j}.seconds")]
json.dump({"recipe": recipe, "subsets": m, "seconds": sum(secs), "timed_subsets": len(secs)},
          open(f"{d}/summary.json", "w"))
PY

stage "rapidin's variants: the final model, each checkpoint, the base model (backdoor_bench)"
bb() {  # out model [extra...]
  local out=$1 model=$2; shift 2
  [ -f "$W/$out" ] || "$BIN/bench/backdoor_bench" --model "$model" --tokenizer "$TOK" --max-length "$MAX_LENGTH" \
    --train "$W/train.jsonl" --queries "lds=$W/q_lds.jsonl" --ks "$KS" --threads 2 --raw --out "$W/$out" "$@"
}
bb scores.json "$W/model.bin" --preconditioner "$W/model.bin.optimizer.safetensors" --label "final model"
for C in $(python3 -c "import json,sys; print(' '.join(c['path'] for c in json.load(open(sys.argv[1]))['checkpoints'][:-1]))" "$W/finetune.json"); do
  bb "scores_epoch-${C##*.epoch-}.json" "$C" --preconditioner "$C.optimizer.safetensors" --label "epoch ${C##*.epoch-}"
done
# Checkpoint 0 is the base model: its scores are these (no second pass over the same model).
[ -f "$W/scores_epoch-0.json" ] && [ ! -f "$W/scores_base.json" ] && cp "$W/scores_epoch-0.json" "$W/scores_base.json"
bb scores_base.json "$BASE" --label "base model"

if [ "$PEERS" = 1 ]; then
  stage "peers on the same model, records and queries"
  source bench/peers/peers.sh
  peer_venvs "$WORK"
  PEER_SETS=lds peer_scores "$RAPIDIN" "$TOK" "$W" "$W/peers" "$MAX_LENGTH" "${TRAK_DIM:-256}"
fi

stage "LDS"
source bench/venv.sh
PY=$(bench_venv "$WORK/venv" numpy)
"$PY" bench/lds/lds.py "$W"
