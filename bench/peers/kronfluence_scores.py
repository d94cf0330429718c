#!/usr/bin/env python3
"""Kronfluence (EK-FAC influence functions; Grosse et al. 2023) on the backdoor benchmark's data.

Usage: kronfluence_scores.py PEERS_DIR -> PEERS_DIR/scores_kronfluence-ekfac.npz (scores[set] = [Q, N]) + timing.
The model is the fine-tuned one (export-hf), every Linear module is tracked (the same weight matrices as rapidin's
default selection, bar the tied embedding/output head), and the loss is rapidin's (mean response loss per record).
"""
import json
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import Records, collate, load_model, query_sets, record_losses  # noqa: E402

from kronfluence.analyzer import Analyzer, prepare_model  # noqa: E402
from kronfluence.arguments import FactorArguments, ScoreArguments  # noqa: E402
from kronfluence.task import Task  # noqa: E402
from kronfluence.utils.dataset import DataLoaderKwargs  # noqa: E402


class ResponseLoss(Task):
    def compute_train_loss(self, batch, model, sample=False):
        if not sample:
            return record_losses(model, batch).sum()
        # Pseudo-labels drawn from the model (the true Fisher), on the response positions.
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
        labels = batch["labels"][:, 1:]
        with torch.no_grad():
            sampled = torch.distributions.Categorical(logits=logits).sample()
        sampled = torch.where(labels == -100, labels, sampled)
        ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), sampled.reshape(-1),
                                               ignore_index=-100, reduction="none").view(labels.shape)
        return (ce.sum(1) / (labels != -100).sum(1).clamp(min=1)).sum()

    def compute_measurement(self, batch, model):
        return record_losses(model, batch).sum()

    def get_influence_tracked_modules(self):
        return None

    def get_attention_mask(self, batch):
        return batch["attention_mask"]


def main():
    d = sys.argv[1]
    torch.manual_seed(0)
    torch.set_num_threads(int(os.environ.get("THREADS", "2")))
    model = load_model(f"{d}/hf")
    task = ResponseLoss()
    model = prepare_model(model, task)
    an = Analyzer(analysis_name="backdoor", model=model, task=task, cpu=True, disable_tqdm=True,
                  output_dir=f"{d}/kronfluence")
    dl = DataLoaderKwargs(collate_fn=collate)
    train = Records(f"{d}/tok_train.jsonl")
    t0 = time.time()
    an.fit_all_factors(factors_name="ekfac", dataset=train, per_device_batch_size=16, dataloader_kwargs=dl,
                       factor_args=FactorArguments(strategy="ekfac"), overwrite_output_dir=False)
    t_fit = time.time() - t0
    # Every query set in one pairwise pass: the training gradients are the cost, computed once.
    sets = query_sets()
    queries = Records(f"{d}/tok_{sets[0]}.jsonl")
    bounds = [0, len(queries)]
    for s in sets[1:]:
        rows = Records(f"{d}/tok_{s}.jsonl").rows
        queries.rows += rows
        bounds.append(bounds[-1] + len(rows))
    t1 = time.time()
    an.compute_pairwise_scores(scores_name="all", factors_name="ekfac", query_dataset=queries, train_dataset=train,
                               per_device_query_batch_size=len(queries), per_device_train_batch_size=16,
                               dataloader_kwargs=dl, score_args=ScoreArguments(), overwrite_output_dir=False)
    t_score = time.time() - t1
    allq = an.load_pairwise_scores("all")["all_modules"].float().numpy()
    out = {s: allq[bounds[i]:bounds[i + 1]] for i, s in enumerate(sets)}
    np.savez(f"{d}/scores_kronfluence-ekfac.npz", **out)
    json.dump({"method": "kronfluence-ekfac", "caching_s": t_fit, "scoring_s": t_score},
              open(f"{d}/timing_kronfluence-ekfac.json", "w"))
    print(f"kronfluence: factors {t_fit:.0f} s, scores {t_score:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
