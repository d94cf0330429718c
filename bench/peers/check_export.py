#!/usr/bin/env python3
"""The exported model in transformers computes rapidin's losses: mean response loss of the first query set
(PEER_SETS; planted by default), transformers (tok_<set>.jsonl ids) vs `rapidin eval` (eval_<set>.jsonl).
Exits 1 past 1e-4 nats."""
import json
import sys

import torch

sys.path.insert(0, __import__("os").path.dirname(__file__))
from common import Records, collate, jsonl, load_model, query_sets, record_losses  # noqa: E402

d, w = sys.argv[1], sys.argv[2]
model = load_model(f"{d}/hf")
first = query_sets()[0]
ds = Records(f"{d}/tok_{first}.jsonl")
want = {r["id"]: r["loss"] for r in jsonl(f"{w}/eval_{first}.jsonl")}
worst = 0.0
with torch.no_grad():
    for i in range(len(ds)):
        got = float(record_losses(model, collate([ds[i]]))[0])
        worst = max(worst, abs(got - want[ds.rows[i]["id"]]))
print(json.dumps({"records": len(ds), "max_abs_loss_difference": worst}))
sys.exit(0 if worst < 1e-4 else 1)
