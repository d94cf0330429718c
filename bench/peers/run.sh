#!/usr/bin/env bash
# Peers on the backdoor benchmark, one command (after bench/backdoor/run.sh, whose WORK it reads):
#   rapidin export-hf + rapidin tokenize -> check transformers reproduces rapidin's losses -> Kronfluence (EK-FAC)
#   -> TRAK (dattri, projection to TRAK_DIM) -> Bergson (gradient cosine and TrackStar, projection BERGSON_DIM per
#   module, Adam second moments of the fine-tuning run) -> BM25 (bm25s) -> bench/results/peers.md and the peers' rows in
#   bench/results/backdoor.json.
# Each peer runs in its own virtual environment under $WORK/venv-<name> (benchmark tools only; never part of the
# C++ build). Settings: WORK, SETTINGS, TRAK_DIM (default 512: below the number of training records, since TRAK
# inverts the projected X^T X; 2048 against 800 records made it singular and the scores chance-level here).
set -euo pipefail
cd "$(dirname "$0")/../.."
BIN=${BUILD_DIR:-build}
WORK=${WORK:-/tmp/rapidin-backdoor}
SETTINGS=${SETTINGS:-main}
DATA=${RAPIDIN_SHARED_DATA:-$PWD/../shared/data}
TOK=$DATA/models/tok512.bin
venv() {  # name packages...
  local v=$WORK/venv-$1; shift
  [ -x "$v/bin/python" ] || { python3 -m venv "$v" && "$v/bin/pip" install -q "$@"; }
  echo "$v/bin/python"
}
PY_KF=$(venv kronfluence torch transformers kronfluence numpy safetensors)
PY_BM=$(venv bm25s bm25s numpy)
PY_TR=$(venv dattri torch transformers dattri numpy safetensors)
PY_BG=$(venv bergson bergson numpy)
for S in $SETTINGS; do
  W=$WORK/$S; D=$W/peers
  mkdir -p "$D"
  [ -f "$D/hf/config.json" ] || "$BIN/client/rapidin" export-hf --model "$W/model.bin" --out "$D/hf"
  for f in train:train q_planted:planted q_greedy:greedy q_control:control; do
    [ -f "$D/tok_${f#*:}.jsonl" ] || "$BIN/client/rapidin" tokenize --model "$W/model.bin" --tokenizer "$TOK" \
      --data "$W/${f%%:*}.jsonl" > "$D/tok_${f#*:}.jsonl"
  done
  "$PY_KF" bench/peers/check_export.py "$D" "$W" | tee "$D/check_export.json"
  [ -f "$D/scores_kronfluence-ekfac.npz" ] || "$PY_KF" bench/peers/kronfluence_scores.py "$D"
  [ -f "$D/scores_trak-dattri.npz" ] || "$PY_TR" bench/peers/trak_scores.py "$D" "${TRAK_DIM:-512}"
  [ -f "$D/scores_bergson-trackstar.npz" ] || "$PY_BG" bench/peers/bergson_scores.py "$D" \
    "$W/model.bin.optimizer.safetensors" "${BERGSON_DIM:-16}"
  [ -f "$D/scores_bm25s.npz" ] || "$PY_BM" bench/peers/bm25_scores.py "$D" "$W"
done
"$PY_KF" bench/peers/report.py "$WORK" $SETTINGS
