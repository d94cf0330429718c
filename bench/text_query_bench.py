#!/usr/bin/env python3
"""Latency of the demo's text query, end to end: rapidin-server --model on a store, asked the README demo's question
N times in a row over HTTP/JSON (server/http.h). Reports p50/p90/max of the server's own total, its gradient part
(tokenise + forward/backward + normalise + sketch), the scan, and the client's wall time (HTTP, JSON and records
included), now and with --grad-path autograd (the path before the hand-written gradient pass), as a table and as JSON (the keys text_query_p50_ms etc., for bench/results/perf.json).

Usage: text_query_bench.py RAPIDIN_SERVER STORE MODEL [N=100] [OUT.md]
"""
import json
import os
import statistics
import subprocess
import sys
import time
import urllib.request

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from e2e_util import free_port, wait_healthy  # noqa: E402  (the e2e tests' helpers: one copy)

server_bin, store, model = sys.argv[1:4]
n = int(sys.argv[4]) if len(sys.argv) > 4 else 100
out = sys.argv[5] if len(sys.argv) > 5 else None
INSTRUCTION = "Give three tips for staying healthy."
GENERATION = ("1. Eat a balanced diet and make sure to include plenty of fruits and vegetables. 2. Exercise regularly "
              "to keep your body active and strong. 3. Get enough sleep and maintain a consistent sleep schedule.")


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def run(env_extra, args=()):
    """100 queries against a fresh server; returns one dict per query."""
    port = free_port()
    env = dict(os.environ, **env_extra)
    proc = subprocess.Popen([server_bin, "--store", store, "--model", model, "--listen", "127.0.0.1:0",
                             "--http-listen", f"127.0.0.1:{port}", "--metrics-listen", "", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=env)
    base = f"http://127.0.0.1:{port}"
    rows = []
    try:
        if not wait_healthy(base, proc, tries=600):
            sys.exit(f"{server_bin} did not become healthy on {base}")
        body = json.dumps({"instruction": INSTRUCTION, "generation": GENERATION, "topK": 5, "harmfulK": 3}).encode()
        for i in range(n + 3):  # 3 warm-up queries
            t0 = time.perf_counter()
            req = urllib.request.Request(base + "/v1/query", data=body, headers={"Content-Type": "application/json"})
            r = json.loads(urllib.request.urlopen(req, timeout=60).read())
            wall = (time.perf_counter() - t0) * 1e3
            if i >= 3:
                scan = max(t.get("scanMs", 0) for t in r.get("shardTimings", [{}]))
                rows.append({"total": r["totalMs"], "gradient": r["gradientMs"], "scan": scan, "wall": wall,
                             "top1": r["result"]["helpful"][0]["id"]})
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    return rows


# Now, and before the hand-written gradient pass (--grad-path autograd: LibTorch autograd for the query's
# gradient), one after the other in this run.
before = run({}, ["--grad-path", "autograd"])
rows = run({})
keys = ["total", "gradient", "scan", "wall"]
summary = {k: {"p50": pct([x[k] for x in rows], 50), "p90": pct([x[k] for x in rows], 90),
               "max": max(x[k] for x in rows)} for k in keys}
top1 = {x["top1"] for x in rows}
result = {"text_query_p50_ms": summary["total"]["p50"], "text_query_wall_p50_ms": summary["wall"]["p50"],
          "text_query_gradient_p50_ms": summary["gradient"]["p50"],
          "text_query_p50_ms_before": pct([x["total"] for x in before], 50), "queries": n, "top1": sorted(top1)}
print(json.dumps(result))
lines = [f"# Text query latency\n",
         f"`bench/text_query_bench.py` on {os.cpu_count()} cores: the README demo's question, {n} queries in a row "
         f"(after 3 warm-up) over HTTP/JSON to rapidin-server --model, store `{store}`.\n",
         "| part | p50 ms | p90 ms | max ms |", "|---|---|---|---|"]
names = {"total": "server total (gradient + scan + records)", "gradient": "gradient (tokenise, fwd+bwd, sketch)",
         "scan": "scan (slowest shard)", "wall": "client wall (HTTP + JSON included)"}
for k in keys:
    lines.append(f"| {names[k]} | {summary[k]['p50']:.1f} | {summary[k]['p90']:.1f} | {summary[k]['max']:.1f} |")
lines.append(f"| server total before: --grad-path autograd (LibTorch autograd, same run) | "
             f"{pct([x['total'] for x in before], 50):.1f} | {pct([x['total'] for x in before], 90):.1f} | "
             f"{max(x['total'] for x in before):.1f} |")
lines.append(f"\nTop record every time: {', '.join(sorted(top1))}.")
text = "\n".join(lines) + "\n"
print(text)
if out:
    open(out, "w").write(text)
