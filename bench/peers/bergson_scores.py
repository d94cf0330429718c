#!/usr/bin/env python3
"""Bergson (EleutherAI) on the backdoor benchmark's data: its gradient collector, two of its scores.

Usage: bergson_scores.py PEERS_DIR OPTIMIZER_STATE [PROJECTION_DIM]
  -> PEERS_DIR/scores_bergson-cosine.npz and scores_bergson-trackstar.npz (scores[set] = [Q, N]) + timing files.

Gradients come from bergson's own InMemoryCollector/CollectorComputer (per-module hooks on every Linear of the
decoder, two-sided Rademacher projection to PROJECTION_DIM x PROJECTION_DIM per module, default 16 as in its
TrackStar config; mean response loss as rapidin's, prompt labels -100).
  bergson-cosine     projected gradients, unit-normalised, inner product (gradient cosine).
  bergson-trackstar  TrackStar (Chang et al. 2024) as bergson composes it: gradients divided by sqrt(v)+eps with v
                     the Adam second moments of the fine-tuning run (bergson's AdamNormalizer, fed rapidin's
                     optimizer state mapped to the exported names), projected, then per module R^-1/2 with R the
                     training gradients' autocorrelation (bergson's damped inverse, damping 0.1 x mean eigenvalue),
                     unit-normalised, inner product. The query-side mixing of R is left out (one R from the index).
"""
import json
import os
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import jsonl, load_model, query_sets  # noqa: E402

from datasets import Dataset  # noqa: E402
from bergson import GradientProcessor, IndexConfig, InMemoryCollector  # noqa: E402
from bergson.collector.collector import CollectorComputer  # noqa: E402
from bergson.gradients import AdamNormalizer  # noqa: E402

HF_MODULES = {"self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk",
              "self_attn.v_proj": "attention.wv", "self_attn.o_proj": "attention.wo",
              "mlp.gate_proj": "feed_forward.w1", "mlp.down_proj": "feed_forward.w2",
              "mlp.up_proj": "feed_forward.w3"}


def read_safetensors(path):
    import struct
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        head = json.loads(f.read(n))
        base = 8 + n
        out = {}
        for k, v in head.items():
            if k == "__metadata__":
                continue
            a, b = v["data_offsets"]
            f.seek(base + a)
            out[k] = torch.from_numpy(np.frombuffer(f.read(b - a), dtype=np.float32).reshape(v["shape"]).copy())
    return out


def adam_normalizers(path, cfg):
    """rapidin's second moments (llama2.c names and row order) -> bergson normalizers keyed by module name."""
    v = read_safetensors(path)
    hd = cfg.hidden_size // cfg.num_attention_heads

    def permute(w, heads):  # llama2.c's interleaved RoPE pairs -> Hugging Face halves (as `rapidin export-hf`)
        return w.view(heads, hd // 2, 2, w.size(1)).transpose(1, 2).reshape(heads * hd, w.size(1)).contiguous()

    out = {}
    for l in range(cfg.num_hidden_layers):
        for hf, ours in HF_MODULES.items():
            w = v[f"layers.{l}.{ours}.weight"]
            if ours == "attention.wq":
                w = permute(w, cfg.num_attention_heads)
            if ours == "attention.wk":
                w = permute(w, cfg.num_key_value_heads)
            out[f"layers.{l}.{hf}"] = AdamNormalizer(weight_avg_sq=w)
    return out


def collect(model, rows, processor, run_path):
    ds = Dataset.from_dict({"input_ids": [r["ids"] for r in rows],
                            "labels": [[-100] * r["response_begin"] + r["ids"][r["response_begin"]:] for r in rows]})
    cfg = IndexConfig(run_path=run_path, projection_dim=processor.projection_dim or 0, loss_reduction="mean")
    os.makedirs(cfg.partial_run_path, exist_ok=True)
    col = InMemoryCollector(model=model.base_model, cfg=cfg, processor=processor, data=ds)
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]["ids"]))
    batches = [order[i:i + 8] for i in range(0, len(order), 8)]
    CollectorComputer(model=model, data=ds, collector=col, batches=batches, cfg=cfg).run_with_collector_hooks(
        desc="bergson gradients")
    names = list(col.gradients)
    return names, {n: col.gradients[n].float() for n in names}


def unit(x):
    return x / x.norm(dim=1, keepdim=True).clamp(min=1e-30)


def main():
    d, opt = sys.argv[1], sys.argv[2]
    pdim = int(sys.argv[3]) if len(sys.argv) > 3 else 16
    torch.manual_seed(0)
    torch.set_num_threads(int(os.environ.get("THREADS", "2")))
    model = load_model(f"{d}/hf")
    train = jsonl(f"{d}/tok_train.jsonl")
    sets = query_sets()
    qrows = {s: jsonl(f"{d}/tok_{s}.jsonl") for s in sets}
    allq = [r for s in sets for r in qrows[s]]
    bounds = np.cumsum([0] + [len(qrows[s]) for s in sets])
    tmp = tempfile.mkdtemp(prefix="bergson-")
    results = {}
    for method, normalizers in (("bergson-cosine", {}), ("bergson-trackstar", adam_normalizers(opt, model.config))):
        proc = GradientProcessor(normalizers=normalizers, projection_dim=pdim, projection_type="rademacher")
        t0 = time.time()
        names, g_train = collect(model, train, proc, f"{tmp}/{method}-train")
        t_cache = time.time() - t0
        t1 = time.time()
        _, g_q = collect(model, allq, proc, f"{tmp}/{method}-queries")
        if method == "bergson-trackstar":
            for n in names:  # R^-1/2 per module from the training gradients' autocorrelation
                R = (g_train[n].double().T @ g_train[n].double()) / len(train)
                lam, U = torch.linalg.eigh(R)
                lam = lam.clamp(min=0)
                h = (U * (lam + 0.1 * lam.mean()).rsqrt()) @ U.T
                g_train[n] = (g_train[n].double() @ h).float()
                g_q[n] = (g_q[n].double() @ h).float()
        X = unit(torch.cat([g_train[n] for n in names], 1))
        Q = unit(torch.cat([g_q[n] for n in names], 1))
        S = (Q @ X.T).numpy()
        t_score = time.time() - t1
        np.savez(f"{d}/scores_{method}.npz", **{s: S[bounds[i]:bounds[i + 1]] for i, s in enumerate(sets)})
        json.dump({"caching_s": t_cache, "scoring_s": t_score, "projection_dim": pdim, "modules": len(names),
                   "dimension": int(X.shape[1])}, open(f"{d}/timing_{method}.json", "w"))
        results[method] = {"caching_s": round(t_cache, 1), "scoring_s": round(t_score, 1), "dim": int(X.shape[1])}
    print(json.dumps(results))


if __name__ == "__main__":
    main()
