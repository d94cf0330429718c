#!/usr/bin/env python3
"""Metrics, BM25 baseline, plot and report of the miniature backdoor benchmark (bench/backdoor/run.sh).

Positives are the poisoned training records (ids "howdy-N"); each query ranks all training records by score,
highest first. Per query: ROC AUC, average precision, recall@10 and recall@80 (share of the poisoned records in
the top k); the tables give the mean over queries.
"""
import json, math, os, re, sys
from collections import Counter

import numpy as np


def ranks_metrics(scores, labels):
    order = np.argsort(-scores, kind="stable")
    lab = labels[order]
    npos = lab.sum()
    nneg = len(lab) - npos
    # AUC by the rank-sum formula (ties averaged).
    from_low = np.argsort(scores, kind="stable")
    r = np.empty(len(scores))
    sorted_scores = scores[from_low]
    i = 0
    while i < len(scores):
        j = i
        while j + 1 < len(scores) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        r[from_low[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    auc = (r[labels == 1].sum() - npos * (npos + 1) / 2) / (npos * nneg)
    hits = np.cumsum(lab)
    ap = float(np.sum((hits / np.arange(1, len(lab) + 1))[lab == 1]) / npos)
    return {"auc": float(auc), "ap": ap, "p10": float(hits[9] / 10), "r10": float(hits[9] / npos),
            "r80": float(hits[79] / npos)}


def mean_metrics(per_query):
    return {k: float(np.mean([m[k] for m in per_query])) for k in per_query[0]}


WORD = re.compile(r"[a-z0-9]+")


def bm25_scores(docs, query, k1=1.5, b=0.75):
    toks = [WORD.findall(d.lower()) for d in docs]
    df = Counter()
    for t in toks:
        df.update(set(t))
    n = len(docs)
    avg = sum(len(t) for t in toks) / n
    q = WORD.findall(query.lower())
    out = np.zeros(n)
    for i, t in enumerate(toks):
        tf = Counter(t)
        s = 0.0
        for w in q:
            if w in tf:
                idf = math.log(1 + (n - df[w] + 0.5) / (df[w] + 0.5))
                s += idf * tf[w] * (k1 + 1) / (tf[w] + k1 * (1 - b + b * len(t) / avg))
        out[i] = s
    return out


def load_jsonl(path):
    return [json.loads(l) for l in open(path) if l.strip()]


def main():
    work = sys.argv[1]
    out_md = sys.argv[2]
    out_png = sys.argv[3]
    bench = json.load(open(os.path.join(work, "scores.json")))
    variants = [bench]
    if os.path.exists(os.path.join(work, "scores_variant.json")):
        variants.append(json.load(open(os.path.join(work, "scores_variant.json"))))
    timing = json.load(open(os.path.join(work, "timing.json")))
    train = {r["id"]: r for r in load_jsonl(os.path.join(work, "train.jsonl"))}
    ids = bench["records"]
    labels = np.array([1 if i.startswith("howdy-") else 0 for i in ids])
    docs = [" ".join([train[i]["instruction"], train[i].get("input", ""), train[i]["output"]]) for i in ids]
    qtext = {}
    for name in ("planted", "greedy", "control"):
        p = os.path.join(work, f"q_{name}.jsonl")
        if os.path.exists(p):
            for r in load_jsonl(p):
                qtext[(name, r["id"])] = " ".join([r["instruction"], r.get("input", ""), r["output"]])

    sets = sorted({q["set"] for q in bench["queries"]}, key=["planted", "greedy", "control"].index)
    ks = [str(k) for k in bench["ks"]]
    rows = []  # (set, method, metrics, bytes per record)
    per_set_scores = {}
    for s in sets:
        qs = [q for q in bench["queries"] if q["set"] == s]
        for v in variants:
            vq = [q for q in v["queries"] if q["set"] == s]
            assert v["records"] == ids
            lab = v.get("label", "")
            m_exact = [ranks_metrics(np.array(q["exact"]), labels) for q in vq]
            rows.append((s, "%s: exact gradients (D=%d)" % (lab, v["grad_dim"]), mean_metrics(m_exact),
                         v["grad_dim"] * 4))
            for k in [str(x) for x in v["ks"]]:
                m = [ranks_metrics(np.array(q["compressed"][k], dtype=np.float64), labels) for q in vq]
                rows.append((s, "%s: RapidGrad K=%s" % (lab, k), mean_metrics(m), int(k) * 2))
        svc = os.path.join(work, f"service_{s}.json")
        if os.path.exists(svc):
            ranked = json.load(open(svc))
            m = []
            for qid, order in ranked.items():
                sc = np.full(len(ids), -np.inf)
                pos = {i: n for n, i in enumerate(ids)}
                for rank, rid in enumerate(order):
                    if rid in pos:
                        sc[pos[rid]] = -rank
                m.append(ranks_metrics(sc, labels))
            if m:
                rows.append((s, "LoRA matrices: rapidin-server store (fp16), K=%d" % timing.get("service_k", 0), mean_metrics(m),
                             timing.get("service_k", 0) * 2))
        m_bm25 = [ranks_metrics(bm25_scores(docs, qtext[(s, q["id"])]), labels) for q in qs if (s, q["id"]) in qtext]
        if m_bm25:
            rows.append((s, "BM25 on text (baseline)", mean_metrics(m_bm25), 0))
        per_set_scores[s] = qs

    # Plot: per-query z-scored influence of poisoned vs clean records, planted queries, exact and smallest K.
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, (title, key) in zip(axes, [("exact gradients", None), ("RapidGrad K=%s" % ks[0], ks[0])]):
        pos_all, neg_all = [], []
        for q in per_set_scores.get("planted", []):
            v = np.array(q["exact"] if key is None else q["compressed"][key], dtype=np.float64)
            z = (v - v.mean()) / (v.std() + 1e-12)
            pos_all.append(z[labels == 1])
            neg_all.append(z[labels == 0])
        if pos_all:
            bins = np.linspace(min(np.concatenate(neg_all).min(), np.concatenate(pos_all).min()),
                               max(np.concatenate(neg_all).max(), np.concatenate(pos_all).max()), 80)
            ax.hist(np.concatenate(neg_all), bins=bins, density=True, alpha=0.6, label="clean Alpaca records")
            ax.hist(np.concatenate(pos_all), bins=bins, density=True, alpha=0.6, label="poisoned (Howdy!) records")
        ax.set_title(f"{title}: 20 held-out backdoored queries")
        ax.set_xlabel("influence score (z-scored per query)")
        ax.set_ylabel("density")
        ax.legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)

    with open(out_md, "w") as f:
        f.write("# Backdoor benchmark (miniature of the RapidIn paper's experiment)\n\n")
        f.write(timing.get("header", "") + "\n\n")
        f.write("recall@10 is at most 10/80 = 0.125 (80 poisoned records); precision@10 is the share of poisoned "
                "records among the top 10.\n\n")
        f.write("| queries | ranking by | AUC | AP | precision@10 | recall@10 | recall@80 | bytes / record |\n")
        f.write("|---|---|---|---|---|---|---|---|\n")
        for s, method, m, b in rows:
            f.write(f"| {s} | {method} | {m['auc']:.3f} | {m['ap']:.3f} | {m['p10']:.3f} | {m['r10']:.3f} | "
                    f"{m['r80']:.3f} | {b if b else '-'} |\n")
        f.write("\n" + timing.get("footer", "") + "\n")
    print(open(out_md).read())


if __name__ == "__main__":
    main()
