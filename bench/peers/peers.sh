# Sourced by bench/peers/run.sh and bench/lds/run.sh: every peer on one setting's model, records and queries.
# Benchmark tools only; each peer in its own virtual environment under $WORK/venv-<name>.

# peer_venvs WORK -> PY_KF, PY_BM, PY_TR, PY_BG (created on first use)
source "$(dirname "${BASH_SOURCE[0]}")/../venv.sh"
peer_venvs() {
  local work=$1
  PY_KF=$(bench_venv "$work/venv-kronfluence" torch transformers kronfluence numpy safetensors)
  PY_BM=$(bench_venv "$work/venv-bm25s" bm25s numpy)
  PY_TR=$(bench_venv "$work/venv-dattri" torch transformers dattri numpy safetensors)
  PY_BG=$(bench_venv "$work/venv-bergson" bergson numpy)
}

# peer_scores RAPIDIN TOKENIZER W D MAX_LENGTH TRAK_DIM: export W/model.bin, tokenize W/train.jsonl and
# W/q_<set>.jsonl for each set of PEER_SETS (default planted greedy control), check the export, then Kronfluence,
# TRAK, Bergson and bm25s into D (stages whose outputs exist are skipped). Needs peer_venvs first.
peer_scores() {
  local rapidin=$1 tok=$2 w=$3 d=$4 max_length=$5 trak_dim=$6 s
  mkdir -p "$d"
  [ -f "$d/hf/config.json" ] || "$rapidin" export-hf --model "$w/model.bin" --out "$d/hf"
  for s in train ${PEER_SETS:-planted greedy control}; do
    local src=$w/q_$s.jsonl
    [ "$s" = train ] && src=$w/train.jsonl
    [ -f "$d/tok_$s.jsonl" ] || "$rapidin" tokenize --model "$w/model.bin" --tokenizer "$tok" \
      --max-length "$max_length" --data "$src" > "$d/tok_$s.jsonl"
  done
  "$PY_KF" bench/peers/check_export.py "$d" "$w" | tee "$d/check_export.json"
  [ -f "$d/scores_kronfluence-ekfac.npz" ] || "$PY_KF" bench/peers/kronfluence_scores.py "$d"
  [ -f "$d/scores_trak-dattri.npz" ] || "$PY_TR" bench/peers/trak_scores.py "$d" "$trak_dim"
  [ -f "$d/scores_bergson-trackstar.npz" ] || "$PY_BG" bench/peers/bergson_scores.py "$d" \
    "$w/model.bin.optimizer.safetensors" "${BERGSON_DIM:-16}"
  [ -f "$d/scores_bm25s.npz" ] || "$PY_BM" bench/peers/bm25_scores.py "$d" "$w"
}
