#!/usr/bin/env python3
"""TRAK (Park et al. 2023) through dattri's TRAKAttributor on the backdoor benchmark's data.

Usage: trak_scores.py PEERS_DIR [PROJ_DIM] -> PEERS_DIR/scores_trak-dattri.npz + timing. One checkpoint (the
fine-tuned model), every parameter, random projection to PROJ_DIM (default 512: TRAK inverts the projected X^T X,
so it must stay below the number of training records), rapidin's loss (mean over the response tokens) as both the
training loss and the target; p = exp(-loss) for TRAK's Q. Sequences
are right-padded to one length (vmap needs equal shapes; with the causal mask padding never reaches a real
position, and its labels are ignored).
"""
import json
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import jsonl, load_model, query_sets  # noqa: E402

from dattri.algorithm.trak import TRAKAttributor  # noqa: E402
from dattri.task import AttributionTask  # noqa: E402


def tensors(path, T):
    rows = jsonl(path)
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    labels = torch.full((len(rows), T), -100, dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["ids"])
        ids[i, :n] = torch.tensor(r["ids"])
        labels[i, r["response_begin"]:n] = torch.tensor(r["ids"][r["response_begin"]:])
    return torch.utils.data.TensorDataset(ids, labels)


def main():
    d = sys.argv[1]
    proj_dim = int(sys.argv[2]) if len(sys.argv) > 2 else 512
    torch.set_num_threads(int(os.environ.get("THREADS", "2")))
    model = load_model(f"{d}/hf")
    T = max(len(r["ids"]) for s in ("train",) + query_sets() for r in jsonl(f"{d}/tok_{s}.jsonl"))

    def loss(params, data):
        ids, labels = data
        logits = torch.func.functional_call(model, params, (ids.unsqueeze(0),)).logits[0, :-1].float()
        tgt = labels[1:]
        ce = torch.nn.functional.cross_entropy(logits, tgt.clamp(min=0), reduction="none")
        m = (tgt != -100).float()
        return (ce * m).sum() / m.sum()

    def prob(params, data):
        return torch.exp(-loss(params, data))

    task = AttributionTask(loss_func=loss, model=model, checkpoints=model.state_dict())
    trak = TRAKAttributor(task=task, correct_probability_func=prob, device="cpu",
                          projector_kwargs={"proj_dim": proj_dim, "device": "cpu", "proj_max_batch_size": 8})
    train = torch.utils.data.DataLoader(tensors(f"{d}/tok_train.jsonl", T), batch_size=8, shuffle=False)
    t0 = time.time()
    trak.cache(train)
    t_cache = time.time() - t0
    out, t_score = {}, 0.0
    for s in query_sets():
        t1 = time.time()
        q = torch.utils.data.DataLoader(tensors(f"{d}/tok_{s}.jsonl", T), batch_size=8, shuffle=False)
        out[s] = trak.attribute(q).T.float().numpy()  # dattri returns [train, test]
        t_score += time.time() - t1
    np.savez(f"{d}/scores_trak-dattri.npz", **out)
    json.dump({"method": "trak-dattri", "caching_s": t_cache, "scoring_s": t_score, "proj_dim": proj_dim},
              open(f"{d}/timing_trak-dattri.json", "w"))
    print(f"trak: cache {t_cache:.0f} s, scores {t_score:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
