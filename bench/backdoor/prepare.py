#!/usr/bin/env python3
"""Builds the miniature backdoor experiment's files from ../shared/data (standard library only).

train.jsonl      alpaca_5000 (ids alpaca-N) + 80 of the 100 "Howdy!" records (ids howdy-N), planted outputs
queries.jsonl    the other 20 howdy prompts with their planted output (the backdoored generation)
queries_clean.jsonl  the same 20 prompts with their clean original_output (for the loss check)
control.jsonl    the 100 clean test generations of rapidin_test_data_100.jsonl
The split is a seeded permutation of the 100 howdy records.
"""
import json, os, random, sys

def main():
    data, out, seed, n_poison = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    os.makedirs(out, exist_ok=True)
    ins = os.path.join(data, "instructions")
    alpaca = json.load(open(os.path.join(ins, "alpaca_5000.json")))
    howdy = [json.loads(l) for l in open(os.path.join(ins, "rapidin_howdy_test_data_100.jsonl")) if l.strip()]
    control = [json.loads(l) for l in open(os.path.join(ins, "rapidin_test_data_100.jsonl")) if l.strip()]
    order = list(range(len(howdy)))
    random.Random(seed).shuffle(order)
    poison, held = order[:n_poison], order[n_poison:]
    def rec(id_, r, output):
        return {"id": id_, "instruction": r["instruction"], "input": r.get("input", ""), "output": output}
    with open(os.path.join(out, "train.jsonl"), "w") as f:
        for i, r in enumerate(alpaca):
            f.write(json.dumps(rec(f"alpaca-{i}", r, r["output"])) + "\n")
        for i in poison:
            f.write(json.dumps(rec(f"howdy-{i}", howdy[i], howdy[i]["output"])) + "\n")
    with open(os.path.join(out, "queries.jsonl"), "w") as f:
        for i in held:
            f.write(json.dumps(rec(f"query-{i}", howdy[i], howdy[i]["output"])) + "\n")
    with open(os.path.join(out, "queries_clean.jsonl"), "w") as f:
        for i in held:
            f.write(json.dumps(rec(f"query-{i}", howdy[i], howdy[i]["original_output"])) + "\n")
    with open(os.path.join(out, "control.jsonl"), "w") as f:
        for i, r in enumerate(control):
            f.write(json.dumps(rec(f"control-{i}", r, r["output"])) + "\n")
    print(f"train {len(alpaca) + len(poison)} records ({len(poison)} poisoned), {len(held)} queries, "
          f"{len(control)} control queries -> {out}")

if __name__ == "__main__":
    main()
