#!/usr/bin/env python3
"""BM25 (bm25s, Lucene's variant) on the text: each query's instruction + input + output against each training
record's. Usage: bm25_scores.py PEERS_DIR SETTING_DIR -> PEERS_DIR/scores_bm25s.npz + timing."""
import json
import os
import sys
import time

import bm25s
import numpy as np


def text(r):
    return " ".join([r["instruction"], r.get("input", ""), r["output"]])


def main():
    d, w = sys.argv[1], sys.argv[2]
    # The records the model scores (`rapidin tokenize` leaves out those whose prompt fills max_length), in order.
    usable = {json.loads(l)["id"] for l in open(f"{d}/tok_train.jsonl")}
    train = [r for r in map(json.loads, open(f"{w}/train.jsonl")) if r["id"] in usable]
    t0 = time.time()
    retriever = bm25s.BM25()
    retriever.index(bm25s.tokenize([text(r) for r in train], stopwords="en", show_progress=False), show_progress=False)
    t_index = time.time() - t0
    out, t_score = {}, 0.0
    for s in os.environ.get("PEER_SETS", "planted greedy control").split():  # as common.query_sets()
        qs = [json.loads(l) for l in open(f"{w}/q_{s}.jsonl")]
        t1 = time.time()
        toks = bm25s.tokenize([text(q) for q in qs], stopwords="en", show_progress=False)
        docs, scores = retriever.retrieve(toks, k=len(train), show_progress=False)
        full = np.zeros((len(qs), len(train)), dtype=np.float32)
        for i in range(len(qs)):
            full[i, docs[i]] = scores[i]
        out[s] = full
        t_score += time.time() - t1
    np.savez(f"{d}/scores_bm25s.npz", **out)
    json.dump({"method": "bm25s", "caching_s": t_index, "scoring_s": t_score}, open(f"{d}/timing_bm25s.json", "w"))


if __name__ == "__main__":
    main()
