#!/usr/bin/env bash
# The second demo: a Qwen2-architecture model with a byte-level tokenizer.json and a ChatML chat template
# (tests/fixtures/qwen2_chat, written by scripts/make_hf_arch_fixtures.py with transformers), fully fine-tuned by
# `rapidin finetune` on chat records made from the Alpaca data (user = instruction + input, assistant = output);
# then its gradients are cached, rapidin-server serves them, and a chat query is answered with token attributions.
# RAPIDIN_DEMO_CHAT_N records (default 300). Data: ../shared/data or $RAPIDIN_SHARED_DATA.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/demo-env.sh
N="${RAPIDIN_DEMO_CHAT_N:-300}"
PORT="${RAPIDIN_DEMO_PORT:-50051}"
W="$WORK/chat"
mkdir -p "$W"
echo "--- chat records from the first $N Alpaca records"
python3 - "$TRAIN" "$N" "$W/chat.jsonl" <<'PY'
import json, sys
recs = json.load(open(sys.argv[1]))[: int(sys.argv[2])]
with open(sys.argv[3], "w") as f:
    for i, r in enumerate(recs):
        user = r["instruction"] + ("\n\n" + r["input"] if r.get("input") else "")
        f.write(json.dumps({"id": f"alpaca_5000-{i}", "messages": [
            {"role": "user", "content": user}, {"role": "assistant", "content": r["output"]}]}) + "\n")
PY
echo "--- fine-tuning the tiny Qwen2 (full, AdamW) on them"
rm -rf "$W/model" "$W/store"
"$CLI" finetune --model tests/fixtures/qwen2_chat --data "$W/chat.jsonl" --out "$W/model" --mode full \
  --epochs 3 --batch 8 --lr 3e-3 --max-length 256
echo "--- caching gradients of the chat records (K=4096)"
"$CLI" cache --model "$W/model" --data "$W/chat.jsonl" --store "$W/store" --k 4096 --threads 2 --max-length 256
"$SERVER" --store "$W/store" --model "$W/model" --listen "127.0.0.1:$PORT" --metrics-listen "" \
  >"$W/server.log" 2>&1 &
SPID=$!
trap 'kill -TERM $SPID 2>/dev/null || true' EXIT
for _ in $(seq 100); do "$CLI" stats --server "127.0.0.1:$PORT" >/dev/null 2>&1 && break; sleep 0.1; done
"$CLI" stats --server "127.0.0.1:$PORT"
python3 - "$W/chat.jsonl" "$W/query.json" <<'PY'
import json, sys
first = json.loads(open(sys.argv[1]).readline())
json.dump(first["messages"], open(sys.argv[2], "w"))
PY
echo "--- which training chats explain this assistant turn?"
cat "$W/query.json"; echo
"$CLI" query --server "127.0.0.1:$PORT" --chat "$W/query.json" --top-k 5 --harmful-k 3 --tokens
kill -TERM $SPID && wait $SPID
trap - EXIT
