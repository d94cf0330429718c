#!/usr/bin/env python3
"""The service side of bench/backdoor/run.sh: every planted, greedy and control query through `rapidin query`
(full ranking, ids only), then token attributions of the top 10 records of the first ATTR planted queries.

Usage: service_queries.py SETTING_DIR RAPIDIN SERVER ATTR K VARIANT -> SETTING_DIR/service_{set}.json and
service_stats.json. A poisoned record's top token "lies in the trigger" when its byte span in the instruction
overlaps the record's trigger_span (prepare.py); BOS is never scored.
"""
import json
import subprocess
import sys
import time


def query(rapidin, server, r, top_k, tokens, hotword=None):
    cmd = [rapidin, "query", "--server", server, "--instruction", r["instruction"], "--input", r.get("input", ""),
           "--generation", r["output"], "--top-k", str(top_k), "--harmful-k", "0", "--json", "--timeout", "1800"]
    cmd += ["--tokens"] if tokens else ["--ids-only"]
    if hotword:
        cmd += ["--hotword", hotword]
    return json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)


def top_in_trigger(toks, span):
    if not toks or span is None:
        return False
    best = max(toks, key=lambda x: x.get("score", 0.0))
    b, e = int(best.get("begin", 0)), int(best.get("end", 0))
    return best.get("field") == "instruction" and b < span[1] and max(e, b + 1) > span[0]


def main():
    w, rapidin, server, attr_n, k, variant = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), sys.argv[6]
    train = {r["id"]: r for r in map(json.loads, open(f"{w}/train.jsonl"))}
    n = len(train)
    t0 = time.time()
    lat = []
    for name in ("planted", "greedy", "control"):
        ranking = {}
        for r in map(json.loads, open(f"{w}/q_{name}.jsonl")):
            t = time.time()
            ranking[r["id"]] = [x["id"] for x in query(rapidin, server, r, n, False)["result"].get("helpful", [])]
            lat.append(time.time() - t)
        json.dump({"k": k, "variant": variant, "ranking": ranking}, open(f"{w}/service_{name}.json", "w"))
    # A fixed payload (the second setting) is what an auditor would mark: the same queries with the generation's
    # loss restricted to it (RapidIn's hotwords), where the generation contains it.
    payload = json.load(open(f"{w}/setting.json")).get("payload_text")
    for name in ("planted", "greedy") if payload else ():
        ranking = {}
        for r in map(json.loads, open(f"{w}/q_{name}.jsonl")):
            if payload in r["output"]:
                ranking[r["id"]] = [x["id"] for x in query(rapidin, server, r, n, False, payload)["result"].get(
                    "helpful", [])]
        json.dump({"k": k, "variant": variant + "+hotword", "hotword": payload, "ranking": ranking},
                  open(f"{w}/service_{name}_hotword.json", "w"))
    attr = {"queries": 0, "poisoned_in_top10": 0, "top_token_in_trigger": 0, "token_loss_top_in_trigger": 0,
            "seconds": 0.0, "examples": []}
    t1 = time.time()
    for r in list(map(json.loads, open(f"{w}/q_planted.jsonl")))[:attr_n]:
        resp = query(rapidin, server, r, 10, True)
        attr["queries"] += 1
        for rec in resp["result"].get("helpful", []):
            if not rec["id"].startswith("poison-"):
                continue
            span = train[rec["id"]].get("trigger_span")
            attr["poisoned_in_top10"] += 1
            hit = top_in_trigger(rec.get("record_influence_tokens", []), span)
            attr["top_token_in_trigger"] += hit
            attr["token_loss_top_in_trigger"] += top_in_trigger(rec.get("record_tokens", []), span)
            if len(attr["examples"]) < 3:
                toks = sorted(rec.get("record_influence_tokens", []), key=lambda x: -x.get("score", 0.0))[:5]
                attr["examples"].append({"query": r["id"], "record": rec["id"], "top_tokens": [
                    {"text": x["text"], "field": x["field"], "score": x["score"]} for x in toks]})
    attr["seconds"] = time.time() - t1
    attr["trigger_top_token_share"] = (attr["top_token_in_trigger"] / attr["poisoned_in_top10"]
                                       if attr["poisoned_in_top10"] else None)
    json.dump({"latency_s": lat, "seconds": {"queries": t1 - t0, "attributions": attr["seconds"]},
               "attribution": attr}, open(f"{w}/service_stats.json", "w"), indent=1)
    print(f"service: {len(lat)} queries in {t1 - t0:.0f} s; trigger top token {attr['top_token_in_trigger']}/"
          f"{attr['poisoned_in_top10']} (token-loss view {attr['token_loss_top_in_trigger']})", file=sys.stderr)


if __name__ == "__main__":
    main()
