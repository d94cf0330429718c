#!/usr/bin/env python3
"""Peers' quality and time per stage next to rapidin's, on the same model, records and queries.
Usage: report.py WORK SETTING... -> bench/results/peers.md, and the peers' rows added to bench/results/backdoor.json
(rows of the same setting and method are replaced)."""
import glob
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from common import jsonl, labels_of, mean, rank_metrics  # noqa: E402
from metrics import md_section  # noqa: E402


def main():
    work, settings = sys.argv[1], sys.argv[2:]
    out_json = os.environ.get("RESULT_JSON", "bench/results/backdoor.json")
    out_md = os.environ.get("PEERS_MD", "bench/results/peers.md")
    doc = json.load(open(out_json)) if os.path.exists(out_json) else {"rows": []}
    lines = ["# Peers on the backdoor benchmark: same model, same records, same queries\n",
             "Written by `bash bench/peers/run.sh` after `bash bench/backdoor/run.sh`. Every method scores the "
             "fine-tuned model exported with `rapidin export-hf` (transformers reproduces `rapidin eval`'s losses: "
             "see the check line), on the token ids of `rapidin tokenize`, with rapidin's loss (mean over the "
             "response tokens). Times are wall seconds on this machine (2 cores, no GPU).\n"]
    old_md = open(out_md).read() if os.path.exists(out_md) else ""
    peer_settings = sorted({r["setting"] for r in doc["rows"]
                            if not r["method"].startswith("rapidin") and r["method"] not in ("bm25", "bm25-hotword")})
    for s in [x for x in peer_settings if x not in settings]:
        # A setting not re-run keeps its section (its rows stay in the JSON too).
        section = md_section(old_md, f"## {s}\n")
        if section:
            lines.append("\n" + section + "\n")
    for s in settings:
        w, d = f"{work}/{s}", f"{work}/{s}/peers"
        train = jsonl(f"{d}/tok_train.jsonl")  # the records every method scores, in the same order
        labels = labels_of(train)
        check = json.load(open(f"{d}/check_export.json")) if os.path.exists(f"{d}/check_export.json") else {}
        lines.append(f"\n## {s}\n\nexport check: {check}\n\n| queries | method | AUC | AP | precision@10 | recall@80 | "
                     "caching / fitting s | scoring s (all queries) |\n|---|---|---|---|---|---|---|---|\n")
        rows = []
        for f in sorted(glob.glob(f"{d}/scores_*.npz")):
            method = os.path.basename(f)[len("scores_"):-len(".npz")]
            t = json.load(open(f"{d}/timing_{method}.json"))
            sc = np.load(f)
            for q in ("planted", "greedy", "control"):
                m = mean([rank_metrics(row, labels) for row in sc[q]])
                rows.append({"setting": s, "queries": q, "method": method, "k": None, **m,
                             "caching_s": t["caching_s"], "scoring_s": t["scoring_s"]})
        doc["rows"] = [r for r in doc["rows"] if not (r["setting"] == s and any(
            r["method"] == x["method"] for x in rows))] + rows
        # rapidin's own rows and times, for the side-by-side table
        cache = json.load(open(f"{w}/cache.json")) if os.path.exists(f"{w}/cache.json") else {}
        svc = json.load(open(f"{w}/service_stats.json")) if os.path.exists(f"{w}/service_stats.json") else {}
        mine = [r for r in doc["rows"] if r["setting"] == s and r["method"] == "rapidin-service"]
        for r in mine + rows:
            cs = r.get("caching_s", cache.get("seconds"))
            ss = r.get("scoring_s", (svc.get("seconds") or {}).get("queries"))
            lines.append(f"| {r['queries']} | {r['method']} | {r['auc']:.3f} | {r['ap']:.3f} | "
                         f"{r['precision_at_10']:.3f} | {r['recall_at_80']:.3f} | "
                         f"{'-' if cs is None else f'{cs:.0f}'} | {'-' if ss is None else f'{ss:.0f}'} |\n")
    json.dump(doc, open(out_json, "w"), indent=1)
    open(out_md, "w").write("".join(lines))
    print("".join(lines))


if __name__ == "__main__":
    main()
