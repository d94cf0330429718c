#!/usr/bin/env bash
# Behaviour check for refactors (issue 15): two builds must give byte-identical answers on the demo's data.
#   bash scripts/same-answers.sh BEFORE_DIR AFTER_DIR
# Each DIR holds rapidin and rapidin-server (e.g. copies of build/client/rapidin and build/server/rapidin-server
# made before the change). Per build: cache the first $N Alpaca records with stories260K (K=4096), serve the store,
# then ask the same things through the CLI (gRPC): text queries with token attributions (both sides), a query by
# vector, records by id, the store's stats. Timing fields are dropped; everything else is compared byte for byte.
# Exit 0 when identical, 1 with a diff otherwise. Data: ../shared/data or $RAPIDIN_SHARED_DATA.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/two-builds.sh
N=${N:-300}; PORT=${PORT:-50931}

answers() {  # dir out
  local bin=$1 out=$2
  mkdir -p "$out"
  "$bin/rapidin" cache --model "$MODEL" --data "$TRAIN" --store "$out/store" --k 4096 --threads 2 --limit "$N" \
    --json > "$out/cache.json" 2> /dev/null
  serve "$bin" "$out/store" "$PORT"
  local q=("$bin/rapidin" query --server "127.0.0.1:$PORT" --json)
  {
    "${q[@]}" --instruction "Give three tips for staying healthy." --top-k 5 --harmful-k 3 --tokens \
      --generation "1. Eat a balanced diet. 2. Exercise regularly. 3. Get enough sleep."
    "${q[@]}" --instruction "Translate the sentence into French." --input "The cat sleeps." --top-k 8 \
      --generation "Le chat dort."
    "${q[@]}" --instruction "Name a color." --top-k 3 --harmful-k 3 --tokens --generation "Blue." \
      --hotword Blue
    "${q[@]}" --vector-file "$WORK/vector.jsonl" --top-k 5 --harmful-k 2
    "${q[@]}" --vector-file "$WORK/short.jsonl" --top-k 5  # refused: the wrong dimension (its error is compared)
    "$bin/rapidin" get --server "127.0.0.1:$PORT" --id alpaca_5000-7 --json
    "$bin/rapidin" stats --server "127.0.0.1:$PORT" --json
  } > "$out/answers.json" 2> "$out/errors.txt" || true
  kill "$SRV"; wait "$SRV" 2> /dev/null || true
  # Drop what is timing, not behaviour; keep the rest byte for byte.
  python3 - "$out/answers.json" "$out/cache.json" > "$out/canonical.txt" <<'PY'
import json, sys
TIMING = ("seconds", "latency", "_ms", "_s", "elapsed", "per_s", "uptime")
def strip(x):
    if isinstance(x, dict):
        return {k: strip(v) for k, v in x.items() if not any(t in k for t in TIMING)}
    if isinstance(x, list):
        return [strip(v) for v in x]
    return x
for path in sys.argv[1:]:
    dec = json.JSONDecoder()
    text = open(path).read()
    i = 0
    while True:
        while i < len(text) and text[i].isspace():
            i += 1
        if i >= len(text):
            break
        obj, i = dec.raw_decode(text, i)
        print(json.dumps(strip(obj), sort_keys=True))
PY
  cat "$out/errors.txt" >> "$out/canonical.txt"
}


random_vector 15 "$WORK/vector.jsonl"
echo '{"vector": [0.5, -1.25, 2.0]}' > "$WORK/short.jsonl"
# Both builds run in the same folder (the store's path is part of the stats), moved aside after.
answers "$1" "$WORK/run" && mv "$WORK/run" "$WORK/before"
answers "$2" "$WORK/run" && mv "$WORK/run" "$WORK/after"
lines=$(wc -l < "$WORK/before/canonical.txt")
if cmp -s "$WORK/before/canonical.txt" "$WORK/after/canonical.txt"; then
  grep -q "\"helpful\"" "$WORK/after/canonical.txt" > /dev/null || { echo "same-answers: no query answered" >&2; exit 1; }
  echo "same-answers: identical ($lines JSON answers, $N records cached by each build)"
else
  diff "$WORK/before/canonical.txt" "$WORK/after/canonical.txt" | head -40
  echo "same-answers: the builds answer differently" >&2
  exit 1
fi
