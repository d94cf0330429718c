#!/usr/bin/env python3
"""Builds the linear-datamodeling (LDS) experiment from ../shared/data (standard library only).

Usage: prepare.py DATA_DIR OUT_DIR [RECORDS=500] [QUERIES=50] [SUBSETS=50] [SEED=0]

Writes
  train.jsonl          RECORDS clean Alpaca records drawn from alpaca_5000 (seeded); ids "alpaca-<index>"
  q_lds.jsonl          QUERIES other Alpaca records, held out: their reference answers are the queries
  subsets/<m>.jsonl    SUBSETS random halves of train.jsonl (each drawn with its own seed), in train.jsonl's order
  setting.json         the counts, the seed and each subset's record ids
"""
import json
import os
import random
import sys


def main():
    data, out = sys.argv[1], sys.argv[2]
    n, q, m, seed = ([int(x) for x in sys.argv[3:7]] + [500, 50, 50, 0][len(sys.argv[3:7]):])
    alpaca = json.load(open(os.path.join(data, "instructions", "alpaca_5000.json")))
    if n + q > len(alpaca) or n < 2 or q < 1 or m < 2:
        sys.exit(f"prepare.py: bad sizes records={n} queries={q} subsets={m} (alpaca_5000 has {len(alpaca)})")
    rng = random.Random(seed)
    order = list(range(len(alpaca)))
    rng.shuffle(order)
    train_idx, query_idx = sorted(order[:n]), order[n:n + q]

    def rec(i):
        r = alpaca[i]
        return {"id": f"alpaca-{i}", "instruction": r["instruction"], "input": r.get("input", ""), "output": r["output"]}

    train = [rec(i) for i in train_idx]
    os.makedirs(os.path.join(out, "subsets"), exist_ok=True)
    with open(os.path.join(out, "train.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in train)
    with open(os.path.join(out, "q_lds.jsonl"), "w") as f:
        f.writelines(json.dumps(rec(i)) + "\n" for i in query_idx)
    subsets = []
    for j in range(m):
        pick = set(random.Random(seed * 100003 + j + 1).sample(range(n), n // 2))
        rows = [train[i] for i in range(n) if i in pick]
        subsets.append([r["id"] for r in rows])
        with open(os.path.join(out, "subsets", f"{j}.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    json.dump({"records": n, "queries": q, "subsets": subsets, "seed": seed,
               "source": "alpaca_5000.json (Stanford Alpaca, CC BY-NC 4.0)"},
              open(os.path.join(out, "setting.json"), "w"), indent=1)
    print(f"lds: {n} training records, {q} held-out queries, {m} half-subsets of {n // 2} -> {out}")


if __name__ == "__main__":
    main()
