"""TracIn-CP (Pruthi et al. 2020) over backdoor_bench score files: the sum over the saved checkpoints of
lr_c * score_c. Shared by bench/backdoor/metrics.py and bench/lds/lds.py (standard library only).

A setting's directory holds scores.json (the final model) and scores_epoch-<e>.json for the checkpoints that
`rapidin finetune --json` listed in finetune.json (its last checkpoint is the final model). Summed compressed scores
equal the inner product of the checkpoints' concatenated sketches, so a store of those ranks the same.
"""
import json
import os
import sys


def checkpoints(w, bench, key):
    """[(lr, {key(query): query}, epoch)] for every checkpoint with a score file, earliest first, then the final
    model's from `bench` (scores.json); empty when no intermediate checkpoint was scored. Exits when a file scores
    other records than scores.json."""
    path = f"{w}/finetune.json"
    ft = json.load(open(path)) if os.path.exists(path) else {}
    out = []
    for c in ft.get("checkpoints", [])[:-1]:
        p = f"{w}/scores_epoch-{c['epoch']}.json"
        if os.path.exists(p):
            b = json.load(open(p))
            if b["records"] != bench["records"]:
                sys.exit(f"{p} scores other records than scores.json")
            out.append((c["lr"], {key(q): q for q in b["queries"]}, c["epoch"]))
    if out:
        last = ft["checkpoints"][-1]
        out.append((last["lr"], {key(q): q for q in bench["queries"]}, last["epoch"]))
    return out


def sums(ckpts):
    """[(tag, checkpoints)]: the sum over all of them and, when checkpoint 0 (the base model) is among more than
    two, the same sum without it."""
    out = [("tracincp", ckpts)] if ckpts else []
    if ckpts and ckpts[0][2] == 0 and len(ckpts) > 2:
        out.append(("tracincp-no-epoch0", ckpts[1:]))
    return out


def has_variant(ckpts, v):
    """Whether every checkpoint scored variant v."""
    return all(v in next(iter(by.values()))["variants"] for _, by, _ in ckpts)


def pick(q, v, k):
    """Query q's scores of variant v: exact (k None) or compressed at K=k."""
    return q["variants"][v]["exact"] if k is None else q["variants"][v]["compressed"][str(k)]


def weighted(ckpts, qkey, v, k):
    """sum over the checkpoints of lr_c * (query qkey's variant-v scores at checkpoint c), per record."""
    total = None
    for lr, by, _ in ckpts:
        x = pick(by[qkey], v, k)
        if total is None:
            total = [0.0] * len(x)
        for i, s in enumerate(x):
            total[i] += lr * s
    return total
