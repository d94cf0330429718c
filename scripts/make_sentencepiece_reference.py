#!/usr/bin/env python3
"""Writes tests/fixtures/hf_tiny/sentencepiece_texts.json: ids and byte offsets that the sentencepiece package gives
for varied texts (the corpus's words, other letters, digits, repeated and leading spaces, characters outside the
vocabulary, long texts with many merges) under the fixture's tokenizer.model, for tests/hf_test.cc. No tabs or
newlines: rapidin's normaliser does not map them as nmt_nfkc does (a known gap, found with this script).
Usage: python3 scripts/make_sentencepiece_reference.py   (needs `pip install sentencepiece protobuf`)"""
import json
import os
import random

import sentencepiece as spm

HERE = os.path.dirname(os.path.abspath(__file__))
DIR = os.path.join(HERE, "..", "tests", "fixtures", "hf_tiny")
sp = spm.SentencePieceProcessor(model_file=os.path.join(DIR, "tokenizer.model"))
words = ("Below is an instruction that describes a task Write a response appropriately completes the request "
         "Instruction Give three tips for staying healthy Response Eat well sleep and exercise Howdy Once upon a "
         "time there was little robot who loved stars quick brown fox jumps over lazy dog").split()
extra = ["caf\u00e9", "\u2713", "\u732b", "x", "Z", "42", "###", ",", ".", "!", "  "]
rng = random.Random(20261204)
out = []
for n in range(120):
    size = rng.choice([1, 3, 8, 20, 60, 150])
    parts = [rng.choice(words) if rng.random() < 0.8 else rng.choice(extra) for _ in range(size)]
    text = "".join(p + rng.choice([" ", " ", " ", "", "  "]) for p in parts)
    if n % 7 == 0:
        text = " " + text
    pieces = sp.encode(text, out_type="proto").pieces
    out.append({"text": text, "ids": [p.id for p in pieces], "begin": [p.begin for p in pieces],
                "end": [p.end for p in pieces]})
with open(os.path.join(DIR, "sentencepiece_texts.json"), "w") as f:
    json.dump(out, f, ensure_ascii=False)
print("wrote", len(out), "texts,", sum(len(o["ids"]) for o in out), "pieces")
