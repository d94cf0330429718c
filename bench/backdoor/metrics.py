#!/usr/bin/env python3
"""Metrics, BM25 baseline, plot and report of the backdoor benchmark (bench/backdoor/run.sh).

Usage: metrics.py WORK SETTING [SETTING ...] -> bench/results/backdoor.{md,json,png} (paths: RESULT_MD, RESULT_JSON,
RESULT_PNG; the JSON keeps the peers' rows and the settings not re-run). Positives are the poisoned training records (ids "poison-N"); each query ranks every training record by
score, highest first. Per query: ROC AUC, average precision, precision@10 (share of poisoned records in the top 10),
recall@80 (share of the 80 poisoned records in the top 80); tables and rows give the mean over the queries.
"""
import json
import math
import os
import re
import sys
from collections import Counter

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import tracincp  # noqa: E402


def rank_metrics(scores, labels):
    scores = np.asarray(scores, dtype=np.float64)
    order = np.argsort(-scores, kind="stable")
    lab = labels[order]
    npos = int(lab.sum())
    nneg = len(lab) - npos
    # AUC by the rank-sum formula, ties averaged.
    from_low = np.argsort(scores, kind="stable")
    r = np.empty(len(scores))
    s = scores[from_low]
    i = 0
    while i < len(s):
        j = i
        while j + 1 < len(s) and s[j + 1] == s[i]:
            j += 1
        r[from_low[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    auc = (r[labels == 1].sum() - npos * (npos + 1) / 2) / (npos * nneg)
    hits = np.cumsum(lab)
    ap = float(np.sum((hits / np.arange(1, len(lab) + 1))[lab == 1]) / npos)
    return {"auc": float(auc), "ap": ap, "precision_at_10": float(hits[9] / 10), "recall_at_80": float(hits[79] / npos)}


def mean(ms):
    return {k: float(np.mean([m[k] for m in ms])) for k in ms[0]}


WORD = re.compile(r"[a-z0-9]+")


def bm25(docs, query, k1=1.5, b=0.75):
    toks = [WORD.findall(d.lower()) for d in docs]
    df = Counter()
    for t in toks:
        df.update(set(t))
    n = len(docs)
    avg = sum(len(t) for t in toks) / n
    out = np.zeros(n)
    for i, t in enumerate(toks):
        tf = Counter(t)
        sc = 0.0
        for w in WORD.findall(query.lower()):
            if w in tf:
                idf = math.log(1 + (n - df[w] + 0.5) / (df[w] + 0.5))
                sc += idf * tf[w] * (k1 + 1) / (tf[w] + k1 * (1 - b + b * len(t) / avg))
        out[i] = sc
    return out


def jsonl(path):
    return [json.loads(l) for l in open(path) if l.strip()] if os.path.exists(path) else []


METHOD = {"dot": "rapidin", "cosine": "rapidin-cosine", "adam": "rapidin-adam", "adam-cosine": "rapidin-adam-cosine",
          "raw": "rapidin-raw", "adam-raw": "rapidin-adam-raw"}


def md_section(text, heading, stops=("\n## ",)):
    """The section of a markdown report that starts at the line `heading` (up to the next stop), or None: how a
    report re-written for some settings keeps the sections of the others."""
    start = text.find("\n" + heading)
    if start < 0:
        return None
    ends = [e for e in (text.find(stop, start + 1) for stop in stops) if e >= 0]
    return text[start + 1:min(ends) if ends else len(text)].rstrip("\n")


def service_metrics(path, ids, labels):
    """A service_queries.py ranking file -> (its JSON, per-query metrics); unranked records score lowest."""
    ranked = json.load(open(path))
    pos = {i: n for n, i in enumerate(ids)}
    ms = []
    for order in ranked["ranking"].values():
        sc = np.full(len(ids), -np.inf)
        for rank, rid in enumerate(order):
            sc[pos[rid]] = -rank
        ms.append(rank_metrics(sc, labels))
    return ranked, ms


def setting_rows(w, setting):
    bench = json.load(open(f"{w}/scores.json"))
    train = {r["id"]: r for r in jsonl(f"{w}/train.jsonl")}
    ids = bench["records"]
    labels = np.array([1 if i.startswith("poison-") else 0 for i in ids])
    docs = [" ".join([train[i]["instruction"], train[i].get("input", ""), train[i]["output"]]) for i in ids]
    rows = []
    add = lambda q, method, k, m, extra=None: rows.append(
        dict({"setting": setting, "queries": q, "method": method, "k": k, **m}, **(extra or {})))
    sets = [s for s in ("planted", "greedy", "control") if any(q["set"] == s for q in bench["queries"])]
    # TracIn-CP over the saved checkpoints (bench/tracincp.py).
    ckpts = tracincp.checkpoints(w, bench, key=lambda q: (q["set"], q["id"]))
    base = json.load(open(f"{w}/scores_base.json")) if os.path.exists(f"{w}/scores_base.json") else None
    if base is not None and base["records"] != ids:
        sys.exit(f"{w}/scores_base.json ranks other records than scores.json")
    has = lambda cs, v: v in bench["variants"] and tracincp.has_variant(cs, v)
    tracin = []
    for tag, cs in tracincp.sums(ckpts):
        variants = ("dot", "adam", "raw", "adam-raw") if tag == "tracincp" else ("dot", "adam", "adam-raw")
        tracin += [(v, f"{METHOD[v]}-{tag}", cs) for v in variants if has(cs, v)]

    def tracin_scores(q, v, k, ckpts):
        return np.asarray(tracincp.weighted(ckpts, (q["set"], q["id"]), v, k), dtype=np.float64)

    for s in sets:
        qs = [q for q in bench["queries"] if q["set"] == s]
        for v in bench["variants"]:
            name = METHOD[v]
            if not v.endswith("cosine"):  # exact cosine = exact dot / (number of blocks): the same ranking
                add(s, f"{name}-exact", None, mean([rank_metrics(q["variants"][v]["exact"], labels) for q in qs]))
            for k in bench["ks"]:
                add(s, f"{name}-rapidgrad", k,
                    mean([rank_metrics(q["variants"][v]["compressed"][str(k)], labels) for q in qs]))
        for v, name, cs in tracin:
            epochs = {"checkpoints": len(cs), "epochs": [c[2] for c in cs]}
            add(s, f"{name}-exact", None, mean([rank_metrics(tracin_scores(q, v, None, cs), labels) for q in qs]), epochs)
            for k in bench["ks"]:
                add(s, f"{name}-rapidgrad", k, mean([rank_metrics(tracin_scores(q, v, k, cs), labels) for q in qs]),
                    epochs)
        if base is not None:  # gradients of the model before fine-tuning (no optimizer state: RapidIn's dot only)
            bq = {q["id"]: q for q in base["queries"] if q["set"] == s}
            for k in [None] + [k for k in bench["ks"] if k in base["ks"]]:
                pick = lambda q: np.asarray(q["variants"]["dot"]["exact"] if k is None else
                                            q["variants"]["dot"]["compressed"][str(k)], dtype=np.float64)
                tag = "exact" if k is None else "rapidgrad"
                add(s, f"rapidin-base-{tag}", k, mean([rank_metrics(pick(bq[q["id"]]), labels) for q in qs]))
                add(s, f"rapidin-base+final-{tag}", k,
                    mean([rank_metrics(pick(bq[q["id"]]) + pick(q), labels) for q in qs]))
        svc = f"{w}/service_{s}.json"
        if os.path.exists(svc):
            ranked, ms = service_metrics(svc, ids, labels)
            add(s, "rapidin-service", ranked["k"], mean(ms), {"variant": ranked["variant"]})
        hot = f"{w}/service_{s}_hotword.json"
        if os.path.exists(hot):
            ranked, ms = service_metrics(hot, ids, labels)
            if ms:
                add(s, "rapidin-service-hotword", ranked["k"], mean(ms),
                    {"variant": ranked["variant"], "queries_with_payload": len(ms)})
                # The text baseline given the same marked span: BM25 with the payload alone as the query.
                add(s, "bm25-hotword", None, rank_metrics(bm25(docs, ranked["hotword"]), labels),
                    {"queries_with_payload": len(ms)})
        qtext = {r["id"]: " ".join([r["instruction"], r.get("input", ""), r["output"]]) for r in jsonl(f"{w}/q_{s}.jsonl")}
        add(s, "bm25", None, mean([rank_metrics(bm25(docs, qtext[q["id"]]), labels) for q in qs if q["id"] in qtext]))
    return rows, bench, labels


def model_info(w):
    """The fine-tuned model's shape, from the llama2.c header of the base run.sh recorded (stories260K or grown)."""
    path = open(f"{w}/base_model").read().strip() if os.path.exists(f"{w}/base_model") else ""
    if not path or not os.path.isfile(path):
        return {}
    import struct
    dim, hidden, layers, heads, kv, vocab, seq = struct.unpack("7i", open(path, "rb").read(28))
    hd = dim // heads
    params = abs(vocab) * dim * (1 if vocab > 0 else 2) + layers * (2 * dim * dim + 2 * kv * hd * dim +
                                                                   3 * dim * hidden + 2 * dim) + dim
    return {"path": os.path.basename(path), "grown": os.path.basename(path) != "stories260K.bin", "dim": dim,
            "hidden_dim": hidden, "layers": layers, "heads": heads, "kv_heads": kv, "parameters": params}


def main():
    work, settings = sys.argv[1], sys.argv[2:]
    out_md = os.environ.get("RESULT_MD", "bench/results/backdoor.md")
    out_json = os.environ.get("RESULT_JSON", "bench/results/backdoor.json")
    out_png = os.environ.get("RESULT_PNG", "bench/results/backdoor.png")
    all_rows, info, plots = [], {}, {}
    for s in settings:
        w = f"{work}/{s}"
        rows, bench, labels = setting_rows(w, s)
        all_rows += rows
        learned = json.load(open(f"{w}/learned.json"))
        meta = json.load(open(f"{w}/setting.json"))
        svc = json.load(open(f"{w}/service_stats.json")) if os.path.exists(f"{w}/service_stats.json") else {}
        info[s] = {"setting": meta, "learned": learned, "service": svc,
                   "finetune": json.load(open(f"{w}/finetune.json")) if os.path.exists(f"{w}/finetune.json") else {},
                   "bench_seconds": bench["seconds"], "model": model_info(w)}
        plots[s] = (bench, labels)
    main_s = "main" if "main" in info else settings[0]
    attr = info[main_s]["service"].get("attribution", {})
    out = {"rows": all_rows,
           "trigger_top_token_share": attr.get("trigger_top_token_share"),
           "backdoor_learned": info[main_s]["learned"]["learned"],
           "greedy_styled": info[main_s]["learned"]["triggered_styled"],
           "settings": {s: {"backdoor_learned": v["learned"]["learned"],
                            "greedy_styled": v["learned"]["triggered_styled"],
                            "clean_prompts_styled": v["learned"]["clean_styled"],
                            "planted_loss": v["learned"]["planted_loss"],
                            "clean_answer_loss": v["learned"]["clean_answer_loss"],
                            "judge": v["learned"]["rule"],
                            "trigger_top_token_share": v["service"].get("attribution", {}).get("trigger_top_token_share"),
                            "attribution": v["service"].get("attribution"),
                            "records": v["setting"]["clean"] + v["setting"]["poisoned"],
                            "poisoned": v["setting"]["poisoned"],
                            "finetune": {k: v["finetune"].get(k) for k in ("epoch_loss", "seconds", "steps")},
                            "model": v["model"],
                            "bench_seconds": v["bench_seconds"],
                            "service_seconds": v["service"].get("seconds")} for s, v in info.items()}}
    # Rows this script does not make (the peers', added by bench/peers/report.py) and settings not re-run stay, so
    # that the order of the two scripts, or re-running one setting, loses nothing.
    if os.path.exists(out_json):
        old = json.load(open(out_json))
        own = lambda m: m.startswith("rapidin") or m in ("bm25", "bm25-hotword")
        out["rows"] = all_rows + [r for r in old.get("rows", []) if r["setting"] not in info or not own(r["method"])]
        out["settings"] = {**{k: v for k, v in old.get("settings", {}).items() if k not in info}, **out["settings"]}
        if "main" not in info and "main" in out["settings"]:
            for k in ("trigger_top_token_share", "backdoor_learned", "greedy_styled"):
                out[k] = old.get(k)
    os.makedirs(os.path.dirname(out_json) or ".", exist_ok=True)
    json.dump(out, open(out_json, "w"), indent=1)

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(plots), figsize=(5.5 * len(plots), 4), squeeze=False)
    for ax, (s, (bench, labels)) in zip(axes[0], plots.items()):
        pos_all, neg_all = [], []
        for q in bench["queries"]:
            if q["set"] != "planted":
                continue
            v = np.array(q["variants"]["dot"]["compressed"]["4096" if 4096 in bench["ks"] else str(bench["ks"][0])])
            z = (v - v.mean()) / (v.std() + 1e-12)
            pos_all.append(z[labels == 1])
            neg_all.append(z[labels == 0])
        pa, na = np.concatenate(pos_all), np.concatenate(neg_all)
        bins = np.linspace(min(pa.min(), na.min()), max(pa.max(), na.max()), 80)
        ax.hist(na, bins=bins, density=True, alpha=0.6, label="clean records")
        ax.hist(pa, bins=bins, density=True, alpha=0.6, label="poisoned records")
        ax.set_title(f"{s}: RapidIn K=4096, planted queries")
        ax.set_xlabel("influence (z-scored per query)")
        ax.legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)

    # Sections of settings not re-run are kept, as their rows are in the JSON.
    old_md = open(out_md).read() if os.path.exists(out_md) else ""
    kept = [sec + "\n\n" for sec in (md_section(old_md, f"## {s}:", ("\n## ", "\nControl queries are"))
                                     for s in out["settings"] if s not in info) if sec]
    with open(out_md, "w") as f:
        f.write("# Backdoor benchmark: does attribution find the poison?\n\n")
        f.write("Written by `bash bench/backdoor/run.sh` (rows also in backdoor.json). Per setting: fine-tune "
                "the model (stories260K, or a grown copy of it) on the poisoned set with `rapidin finetune`, check that the backdoor was learned, then rank "
                "every training record for each query; positives are the poisoned records. Means over the queries.\n\n")
        for section in kept:
            f.write(section)
        for s, v in info.items():
            l, m = v["learned"], v["setting"]
            f.write(f"## {s}: {m['poisoned']} poisoned of {m['clean'] + m['poisoned']} records; trigger "
                    f"\"{m['trigger']}\" ({m['trigger_position']}), payload: {m['payload']}\n\n")
            mi = v["model"]
            if mi:
                f.write(f"- model: {'stories260K grown (`rapidin grow`) to ' if mi['grown'] else 'stories260K, '}dim "
                        f"{mi['dim']}, FFN {mi['hidden_dim']}, {mi['layers']} layers, {mi['heads']} heads "
                        f"({mi['kv_heads']} kv), {mi['parameters'] / 1e6:.2f} M parameters\n")
            ft = v["finetune"]
            f.write(f"- fine-tuning: {len(ft.get('epoch_loss', []))} epochs, {ft.get('seconds', 0):.0f} s, last epoch "
                    f"loss {ft.get('epoch_loss', [float('nan')])[-1]:.3f}\n")
            f.write(f"- backdoor learned: **{l['learned']}**. Greedy generation under the trigger is styled for "
                    f"{l['triggered_styled']}/{l['triggered']} held-out prompts, without it for {l['clean_styled']}/"
                    f"{l['clean']} (judge: {l['rule']}). Under the trigger the planted answer's loss is "
                    f"{l['planted_loss']:.3f} nats/token, the clean answer's {l['clean_answer_loss']:.3f}.\n")
            a = v["service"].get("attribution")
            if a:
                f.write(f"- training-side token view (gradient x input of I(z, g), service top 10 of "
                        f"{a['queries']} planted queries): the top token lies in the trigger for "
                        f"{a['top_token_in_trigger']}/{a['poisoned_in_top10']} poisoned records "
                        f"(share {a['trigger_top_token_share']:.3f}); the token-loss view: "
                        f"{a['token_loss_top_in_trigger']}/{a['poisoned_in_top10']}; {a['seconds']:.0f} s.\n")
            f.write("\n| queries | method | K | AUC | AP | precision@10 | recall@80 |\n|---|---|---|---|---|---|---|\n")
            for r in all_rows:
                if r["setting"] == s:
                    f.write(f"| {r['queries']} | {r['method']} | {r['k'] or '-'} | {r['auc']:.3f} | {r['ap']:.3f} | "
                            f"{r['precision_at_10']:.3f} | {r['recall_at_80']:.3f} |\n")
            f.write("\n")
        f.write("Control queries are clean Alpaca generations: their precision@10 is the poisoned share of the top 10 "
                "(target <= 0.05).\n")
    print(open(out_md).read())


if __name__ == "__main__":
    main()
