#!/usr/bin/env bash
# Peers on the backdoor benchmark, one command (after bench/backdoor/run.sh, whose WORK it reads):
#   rapidin export-hf + rapidin tokenize -> check transformers reproduces rapidin's losses -> Kronfluence (EK-FAC)
#   -> TRAK (dattri, projection to TRAK_DIM) -> Bergson (gradient cosine and TrackStar, projection BERGSON_DIM per
#   module, Adam second moments of the fine-tuning run) -> BM25 (bm25s) -> bench/results/peers.md and the peers' rows in
#   bench/results/backdoor.json.
# Each peer runs in its own virtual environment under $WORK/venv-<name> (benchmark tools only; never part of the
# C++ build). Settings: WORK, SETTINGS, MAX_LENGTH, BERGSON_DIM, TRAK_DIM (default 512: below the number of training records, since TRAK
# inverts the projected X^T X; 2048 against 800 records made it singular and the scores chance-level here).
set -euo pipefail
cd "$(dirname "$0")/../.."
BIN=${BUILD_DIR:-build}
WORK=${WORK:-/tmp/rapidin-backdoor}
SETTINGS=${SETTINGS:-main}
DATA=${RAPIDIN_SHARED_DATA:-$PWD/../shared/data}
TOK=$DATA/models/tok512.bin
source bench/peers/peers.sh
peer_venvs "$WORK"
for S in $SETTINGS; do
  peer_scores "$BIN/client/rapidin" "$TOK" "$WORK/$S" "$WORK/$S/peers" "${MAX_LENGTH:-512}" "${TRAK_DIM:-512}"
done
"$PY_KF" bench/peers/report.py "$WORK" $SETTINGS
