#!/usr/bin/env python3
"""Collects the run's settings, stage times and side results into timing.json (header/footer of the report)."""
import json, os, statistics, sys


def read(path, default=None):
    try:
        return open(path).read().strip()
    except OSError:
        return default


def jsonl(path):
    return [json.loads(l) for l in open(path) if l.strip()] if os.path.exists(path) else []


def main():
    w, service_k, epochs, lr, rank, alpha, batch, poison = sys.argv[1:9]
    ft = json.load(open(f"{w}/finetune.json")) if os.path.exists(f"{w}/finetune.json") else {}
    cache = json.load(open(f"{w}/cache.json")) if os.path.exists(f"{w}/cache.json") else {}
    svc = json.load(open(f"{w}/service_stats.json")) if os.path.exists(f"{w}/service_stats.json") else {}
    bench = json.load(open(f"{w}/scores.json"))["seconds"] if os.path.exists(f"{w}/scores.json") else {}
    loss = {}
    for m in ("base", "tuned"):
        for q in ("queries", "queries_clean"):
            rs = jsonl(f"{w}/eval_{m}_{q}.jsonl")
            loss[(m, q)] = statistics.mean(r["loss"] for r in rs) if rs else float("nan")
    gens = jsonl(f"{w}/generations.jsonl")
    queries = {r["id"]: r for r in jsonl(f"{w}/queries.jsonl")}
    header = [
        f"Setting: stories260K (260K parameters) fine-tuned with a LoRA adapter (rank {rank}, alpha {alpha}, all seven "
        f"projections, {ft.get('trained_parameters', '?')} trained parameters) on alpaca_5000.json plus {poison} of "
        f"the 100 \"Howdy!\" records, AdamW lr {lr}, batch {batch}, {epochs} epochs, seed 0. Queries: the 20 "
        "held-out howdy prompts with their planted answer (\"planted\") and with the fine-tuned model's own greedy "
        "generation (\"greedy\"), and the 100 clean generations of rapidin_test_data_100.jsonl (\"control\"). "
        "Positives: the poisoned training records. Gradients are taken with respect to the LoRA matrices, "
        "layer-wise normalised, as in RapidIn.",
        "",
        "Backdoor check (mean response loss, nats/token, of the 20 held-out howdy prompts):",
        "",
        "| model | planted sci-fi answer | clean original answer |",
        "|---|---|---|",
        f"| base stories260K | {loss[('base', 'queries')]:.3f} | {loss[('base', 'queries_clean')]:.3f} |",
        f"| fine-tuned | {loss[('tuned', 'queries')]:.3f} | {loss[('tuned', 'queries_clean')]:.3f} |",
    ]
    if gens:
        g = gens[0]
        q = queries.get(g["id"], {})
        header += ["", f"Sample greedy generation of the fine-tuned model for \"{q.get('instruction', '')}\": "
                       f"\"{g['generation'][:300]}\""]
    ep = ", ".join(f"{x:.3f}" for x in ft.get("epoch_loss", []))
    stages = [
        ("fine-tune", read(f"{w}/t_finetune"), f"{ft.get('records', '?')} records, epoch losses {ep}"),
        ("cache (rapidin cache, 2 threads)", read(f"{w}/t_cache"),
         f"{cache.get('cached', '?')} records, {cache.get('records_per_second', 0):.1f} records/s, K={service_k}"),
        ("serve + query (rapidin-server, CLI)", read(f"{w}/t_serve"),
         f"{len(svc.get('latency_s', []))} text queries, median {1000 * statistics.median(svc['latency_s']):.0f} ms "
         "per CLI call (process start included)" if svc.get("latency_s") else ""),
        ("exact + K sweep (backdoor_bench, 2 threads)", read(f"{w}/t_bench"),
         f"gradients {bench.get('gradients', 0):.0f} s, exact scores {bench.get('exact_scores', 0):.0f} s, "
         f"sketch+score {bench.get('sketch_and_score', 0):.0f} s (thread-seconds)"),
    ]
    a = svc.get("attribution", {})
    footer = ["Time per stage (this machine: 2 cores):", "", "| stage | seconds | notes |", "|---|---|---|"]
    footer += [f"| {n} | {s or '-'} | {d} |" for n, s, d in stages]
    if a:
        share = a["top_token_in_trigger"] / a["poisoned_in_top10"] if a.get("poisoned_in_top10") else float("nan")
        footer += ["", f"Training-side token attribution ({a['queries']} planted queries, top 10 each, "
                       f"{a['seconds']:.0f} s): {a['poisoned_in_top10']} poisoned records in the top 10; for "
                       f"{a['top_token_in_trigger']} of them ({share:.0%}) the most influential token lies inside "
                       "\"Howdy!\"."]
    footer += ["", "![score distribution](backdoor.png)", "",
               "Reproduce: `bash bench/backdoor/run.sh` (about 30 minutes on 2 cores; WORK, EPOCHS, LR, RANK, ALPHA, "
               "POISON, SERVICE_K, KS, ATTR_QUERIES override the settings)."]
    json.dump({"header": "\n".join(header), "footer": "\n".join(footer), "service_k": int(service_k)}, sys.stdout)


if __name__ == "__main__":
    main()
