#!/usr/bin/env python3
"""Linear datamodeling score (LDS; Park et al. 2023, "TRAK") of every attribution method on bench/lds's experiment.

Usage: lds.py WORK -> bench/results/lds.md and lds.json (paths: LDS_MD, LDS_JSON)

For a query z and a half-subset S_j of the training records, a method with scores tau(z, i) predicts
g_j(z) = sum over i in S_j of tau(z, i); the truth is -loss(z) of the model fine-tuned on S_j alone with the same
recipe as the full model (rapidin finetune, then rapidin eval). LDS(z) is the Spearman correlation of g_j(z) and
-loss_j(z) over the subsets; a method's LDS is the mean over the queries, with its standard error. A record a method
did not score (rapidin leaves out records whose prompt fills max_length) counts 0 in every sum.

The core (ranks, spearman, lds) is standard-library Python, checked by lds_test.py against slow definitions.
"""
import glob
import json
import math
import os
import random
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import tracincp  # noqa: E402


def ranks(xs):
    """1-based ranks, ties given their average rank."""
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    r = [0.0] * len(xs)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and xs[order[j + 1]] == xs[order[i]]:
            j += 1
        for t in range(i, j + 1):
            r[order[t]] = (i + j) / 2 + 1
        i = j + 1
    return r


def pearson(x, y):
    n = len(x)
    mx, my = sum(x) / n, sum(y) / n
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx = sum((a - mx) ** 2 for a in x)
    syy = sum((b - my) ** 2 for b in y)
    if sxx == 0 or syy == 0:
        return 0.0  # a constant prediction orders nothing
    return sxy / math.sqrt(sxx * syy)


def spearman(x, y):
    return pearson(ranks(x), ranks(y))


def lds(scores, subsets, actual):
    """scores: {query: {record: tau}}; subsets: [[record ids]]; actual: {query: [-loss per subset]} -> {query: rho}."""
    out = {}
    for q, truth in actual.items():
        tau = scores.get(q)
        if tau is None:
            continue
        pred = [sum(tau.get(i, 0.0) for i in s) for s in subsets]
        out[q] = spearman(pred, truth)
    return out


def summary(per_query):
    v = list(per_query.values())
    m = sum(v) / len(v)
    se = math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1) / len(v)) if len(v) > 1 else float("nan")
    return m, se


def jsonl(path):
    return [json.loads(l) for l in open(path) if l.strip()]


def rapidin_methods(w):
    """backdoor_bench outputs -> {(method, k): ({query: {record: score}}, extra)}: every variant exact and compressed,
    TracIn-CP over the saved checkpoints (learning-rate weights), and the base model's gradients."""
    names = {"dot": "rapidin", "cosine": "rapidin-cosine", "adam": "rapidin-adam", "adam-cosine": "rapidin-adam-cosine",
             "raw": "rapidin-raw", "adam-raw": "rapidin-adam-raw"}
    bench = json.load(open(f"{w}/scores.json"))
    ids = bench["records"]
    pick = tracincp.pick
    table = lambda qs, v, k: {q["id"]: dict(zip(ids, pick(q, v, k))) for q in qs}
    out = {}
    for v in bench["variants"]:
        if not v.endswith("cosine"):  # exact cosine = exact dot / number of blocks: the same sums up to a factor
            out[(f"{names[v]}-exact", None)] = (table(bench["queries"], v, None), {})
        for k in bench["ks"]:
            out[(f"{names[v]}-rapidgrad", k)] = (table(bench["queries"], v, k), {})
    ckpts = tracincp.checkpoints(w, bench, key=lambda q: q["id"])
    for tag, cs in tracincp.sums(ckpts):
        for v in ("dot", "adam", "raw", "adam-raw"):
            if v not in bench["variants"] or not tracincp.has_variant(cs, v):
                continue
            for k in [None] + bench["ks"]:
                t = {q["id"]: dict(zip(ids, tracincp.weighted(cs, q["id"], v, k))) for q in bench["queries"]}
                out[(f"{names[v]}-{tag}-{'exact' if k is None else 'rapidgrad'}", k)] = (
                    t, {"checkpoints": len(cs), "epochs": [c[2] for c in cs]})
    if os.path.exists(f"{w}/scores_base.json"):
        b = json.load(open(f"{w}/scores_base.json"))
        for k in [None] + b["ks"]:
            tag = "exact" if k is None else "rapidgrad"
            base = {q["id"]: dict(zip(b["records"], pick(q, "dot", k))) for q in b["queries"]}
            out[(f"rapidin-base-{tag}", k)] = (base, {})
            # TracIn-CP with the base model as checkpoint 0 (what `finetune --checkpoint-epochs 0,...` gives), dot
            tc = out.get((f"rapidin-tracincp-{tag}", k))
            if tc is not None and b["records"] == ids and ckpts[0][2] != 0:
                lr0 = ckpts[0][0]
                out[(f"rapidin-tracincp+base-{tag}", k)] = ({q: {i: x + lr0 * base[q][i] for i, x in t.items()}
                                                             for q, t in tc[0].items()}, {"checkpoints": len(ckpts) + 1})
    return out, bench["seconds"]


def peer_methods(w):
    import numpy as np
    d = f"{w}/peers"
    out = {}
    if not os.path.exists(f"{d}/tok_train.jsonl"):
        return out
    ids = [r["id"] for r in jsonl(f"{d}/tok_train.jsonl")]
    qids = [r["id"] for r in jsonl(f"{d}/tok_lds.jsonl")]
    for f in sorted(glob.glob(f"{d}/scores_*.npz")):
        method = os.path.basename(f)[len("scores_"):-len(".npz")]
        sc = np.load(f)["lds"].astype(np.float64)
        t = json.load(open(f"{d}/timing_{method}.json"))
        out[(method, None)] = ({q: dict(zip(ids, map(float, sc[n]))) for n, q in enumerate(qids)},
                               {"caching_s": t["caching_s"], "scoring_s": t["scoring_s"]})
    return out


def main():
    w = sys.argv[1]
    out_md = os.environ.get("LDS_MD", "bench/results/lds.md")
    out_json = os.environ.get("LDS_JSON", "bench/results/lds.json")
    setting = json.load(open(f"{w}/setting.json"))
    subsets = setting["subsets"]
    queries = [r["id"] for r in jsonl(f"{w}/q_lds.jsonl")]
    loss = []  # [subset][query]
    for j in range(len(subsets)):
        got = {r["id"]: r["loss"] for r in jsonl(f"{w}/retrain/{j}.eval.jsonl")}
        loss.append([got[q] for q in queries])
    actual = {q: [-loss[j][n] for j in range(len(subsets))] for n, q in enumerate(queries)}
    full = {r["id"]: r["loss"] for r in jsonl(f"{w}/eval_lds.jsonl")}
    methods, bench_s = rapidin_methods(w)
    methods.update(peer_methods(w))
    train_ids = [r["id"] for r in jsonl(f"{w}/train.jsonl")]
    rng = random.Random(0)  # the chance level, for scale
    methods[("random", None)] = ({q: {i: rng.gauss(0, 1) for i in train_ids} for q in queries}, {})
    rows, per = [], {}
    for (name, k), (table, extra) in methods.items():
        per[(name, k)] = lds(table, subsets, actual)
        m, se = summary(per[(name, k)])
        rows.append(dict({"method": name, "k": k, "spearman": m, "stderr": se, "queries": len(per[(name, k)])}, **extra))
    rows.sort(key=lambda r: -r["spearman"])
    # Paired against the best peer on the same queries (the per-query differences' mean and standard error).
    peers = [r["method"] for r in rows if not r["method"].startswith("rapidin") and r["method"] != "random"]
    best_peer = peers[0] if peers else None
    for r in rows:
        if best_peer and r["method"] != best_peer:
            bp = per[(best_peer, None)]
            d, dse = summary({q: per[(r["method"], r["k"])][q] - bp[q] for q in bp})
            r["vs_best_peer"], r["vs_best_peer_stderr"] = d, dse
    ft = json.load(open(f"{w}/finetune.json"))
    rt = json.load(open(f"{w}/retrain/summary.json"))
    spread = [max(actual[q]) - min(actual[q]) for q in queries]
    doc = {"rows": rows, "best_peer": best_peer, "records": setting["records"], "queries": len(queries), "subsets": len(subsets),
           "recipe": rt["recipe"], "retrain_seconds": rt["seconds"], "finetune_seconds": ft.get("seconds"),
           "full_model_query_loss": sum(full.values()) / len(full),
           "subset_query_loss_mean": sum(map(sum, loss)) / (len(loss) * len(queries)),
           "subset_loss_spread_mean": sum(spread) / len(spread), "rapidin_bench_seconds": bench_s}
    os.makedirs(os.path.dirname(out_json) or ".", exist_ok=True)
    json.dump(doc, open(out_json, "w"), indent=1)
    with open(out_md, "w") as f:
        f.write("# Linear datamodeling score (LDS)\n\n")
        f.write(f"Written by `bash bench/lds/run.sh` (rows also in lds.json). {setting['records']} clean Alpaca "
                f"records; {len(subsets)} random halves, each fine-tuned from stories260K with the full model's recipe "
                f"({rt['recipe']}); the loss of {len(queries)} held-out Alpaca answers under each. Per query, the "
                "Spearman correlation over the subsets of a method's summed scores and -loss; the table gives the "
                "mean over the queries and its standard error. Every method scores the model fine-tuned on all "
                "records.\n\n")
        f.write(f"- retraining: {rt['seconds']:.0f} s for {len(subsets)} subsets; full model {ft.get('seconds', 0):.0f} s\n")
        f.write(f"- query loss: full model {doc['full_model_query_loss']:.3f} nats/token, subsets "
                f"{doc['subset_query_loss_mean']:.3f} on average; per query the subsets' losses span "
                f"{doc['subset_loss_spread_mean']:.3f} nats on average\n\n")
        f.write(f"| method | K | LDS (Spearman) | std. error | minus {best_peer} (paired s.e.) | caching s | scoring s |\n"
                "|---|---|---|---|---|---|---|\n")
        for r in rows:
            cs, ss = r.get("caching_s"), r.get("scoring_s")
            vs = f"{r['vs_best_peer']:+.3f} ({r['vs_best_peer_stderr']:.3f})" if "vs_best_peer" in r else "-"
            f.write(f"| {r['method']} | {r['k'] or '-'} | {r['spearman']:.3f} | {r['stderr']:.3f} | {vs} | "
                    f"{'-' if cs is None else f'{cs:.0f}'} | {'-' if ss is None else f'{ss:.0f}'} |\n")
        f.write("\nNames: `rapidin` is RapidIn's score (layer-wise normalised gradients, inner product); `-adam` divides "
                "gradients by sqrt(v)+eps (the run's Adam second moments) first; `-raw` leaves out the layer-wise "
                "normalisation (plain TracIn's inner product); `-cosine` unit-normalises the compressed vectors; "
                "`-tracincp` sums the checkpoints (0: the model before fine-tuning, 1, and the final model) with learning-rate weights, `-no-epoch0` without checkpoint 0; `-base` uses "
                "the model before fine-tuning; `-exact` is the uncompressed inner product (float64), `-rapidgrad` the "
                "RapidGrad sketch at K. Peers (bench/peers, same exported model, token ids and loss): Kronfluence EK-FAC, "
                "TRAK (dattri, one checkpoint, projection 256), Bergson (gradient cosine; TrackStar), bm25s on the text. "
                "`random` gives the chance level.\n")
        f.write(f"\nrapidin's variants come from one gradient pass per checkpoint (backdoor_bench: "
                f"{bench_s['wall']:.0f} s at the final model, every variant and K together).\n")
    print(open(out_md).read())


if __name__ == "__main__":
    main()
