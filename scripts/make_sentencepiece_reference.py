#!/usr/bin/env python3
"""Writes tests/fixtures/hf_tiny/sentencepiece_texts.json: ids and byte offsets that the sentencepiece package gives
for varied texts (the corpus's words, other letters, digits, repeated and leading spaces, tabs, newlines, control
and zero-width characters that the model's nmt_nfkc map rewrites, characters outside the vocabulary, long texts
with many merges) under the fixture's tokenizer.model, for tests/hf_test.cc; and sentencepiece_bytes.json: the same
for byte strings (hex), malformed UTF-8 and whitespace-only inputs among them.
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
extra = ["caf\u00e9", "\u2713", "\u732b", "x", "Z", "42", "###", ",", ".", "!", "  ", "\t", "\n", "\r\n", "\n\n",
         "\u200b", "\ufeff", "\x01", "\x7f", "\u00a0", "\u3000", "\ufb01", "\uff21", "e\u0301", "\U0001f600"]
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

raw = [b"", b" ", b"\t\n \r\n", b"a\xffb", b"x\xe2\x96", b"\xc0\xafq", b"\xed\xa0\x80z", b"\xf4\x90\x80\x80!",
       b"\xef\xbf\xbd ok", b"\x00mid\x00dle", b"tab\t\tdouble", b"  lead and trail \n\t ", b"\x01\x02\x03",
       "\u00a0\u2002\u2028\u3000 spaces".encode(), "\ufb01\ufb02 \u2460\u00bd".encode(), b"\x80\x80\x80"]
out = []
for b in raw:
    pieces = sp.encode(b, out_type="proto").pieces
    out.append({"hex": b.hex(), "ids": [p.id for p in pieces], "begin": [p.begin for p in pieces],
                "end": [p.end for p in pieces]})
with open(os.path.join(DIR, "sentencepiece_bytes.json"), "w") as f:
    json.dump(out, f)
print("wrote", len(out), "byte strings")
