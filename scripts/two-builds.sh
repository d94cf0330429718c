# Sourced by scripts/same-answers.sh and scripts/perf-compare.sh (from the repository root, with the two build
# folders as the arguments): checks them and the shared data, makes $WORK, and holds the steps both scripts take.
NAME=$(basename "$0" .sh)
[ $# = 2 ] || { echo "usage: $0 BEFORE_DIR AFTER_DIR" >&2; exit 2; }
for d in "$1" "$2"; do
  for b in rapidin rapidin-server; do [ -x "$d/$b" ] || { echo "$NAME: no $d/$b" >&2; exit 2; }; done
done
DATA="${RAPIDIN_SHARED_DATA:-$(cd .. && pwd)/shared/data}"
MODEL="$DATA/models/stories260K.bin"; TRAIN="$DATA/instructions/alpaca_5000.json"
[ -f "$MODEL" ] && [ -f "$TRAIN" ] || { echo "$NAME: no shared data at $DATA" >&2; exit 77; }
WORK=$(mktemp -d); trap 'rm -rf "$WORK"' EXIT; [ -n "${KEEP:-}" ] && trap - EXIT

# random_vector SEED FILE: one JSONL query vector of 4096 seeded N(0, 1) values (the stores use K=4096).
random_vector() {
  python3 -c "import random, sys; r = random.Random(int(sys.argv[1])); print('{\"vector\": [%s]}' % ', '.join('%.6f' % r.gauss(0, 1) for _ in range(4096)))" "$1" > "$2"
}

# serve BIN_DIR STORE PORT: starts that build's rapidin-server on the store and waits until it answers; pid in SRV.
serve() {
  "$1/rapidin-server" --store "$2" --model "$MODEL" --listen "127.0.0.1:$3" --metrics-listen "" --log-level warn &
  SRV=$!
  for _ in $(seq 200); do "$1/rapidin" stats --server "127.0.0.1:$3" > /dev/null 2>&1 && break; sleep 0.1; done
}
