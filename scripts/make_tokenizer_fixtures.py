#!/usr/bin/env python3
"""Writes tests/fixtures/tokenizers/<name>/tokenizer.json (+ tokenizer_config.json) and reference.json: small
byte-level BPE tokenizers trained with Hugging Face `tokenizers`, in the configurations models ship, and the ids
and offsets `tokenizers` itself gives on a corpus covering ASCII, accents (composed and decomposed), CJK, emoji,
numbers, whitespace runs and special tokens inside text. tests/tokenizer_json_test.cc must give the same.

  qwen2:  NFC normalizer, Qwen2's split regex, ByteLevel without regex, no BOS, ChatML special tokens
  llama3: no normalizer, Llama 3's split regex, ignore_merges, ByteLevel trim_offsets, <|begin_of_text|> template
  gpt2:   NFKC normalizer, ByteLevel with GPT-2's own regex

Also nfkc.json: SentencePiece's ids and spans for tests/fixtures/hf_tiny/tokenizer.model (an nmt_nfkc model) on
text that NFKC changes.

tokenizers 0.21 (0.19, which transformers 4.44 pins, reports wrong offsets with ignore_merges:
huggingface/tokenizers#1553, fixed by #1640):

    python3 -m venv /tmp/tokenv && /tmp/tokenv/bin/pip install tokenizers==0.21.0 sentencepiece
    /tmp/tokenv/bin/python scripts/make_tokenizer_fixtures.py
"""
import json
import os
import sys

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.join(HERE, "..", "tests", "fixtures", "tokenizers")
QWEN2_RE = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
LLAMA3_RE = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""

TRAIN = [
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
    "Give three tips for staying healthy. Eat a balanced diet, exercise regularly and sleep well.",
    "Howdy! Once upon a time there was a little robot who loved the stars and the moon.",
    "The quick brown fox jumps over the lazy dog. 1234567890 3.14159 2026-12-03",
    "Caf\u00e9 na\u00efve fa\u00e7ade \u00fcber stra\u00dfe \u00e9l\u00e8ve r\u00e9sum\u00e9",
    "\u4eca\u65e5\u306f\u826f\u3044\u5929\u6c17\u3067\u3059\u3002\u6211\u559c\u6b22\u5b66\u4e60\u3002",
    "I'm sure you'll see they've DONE it. We'd say it's fine. \U0001F600 \U0001F680 \u2764\ufe0f",
    "def f(x):\n    return x * 2\n\n\tindented\r\nwindows line",
] * 30

CORPUS = [
    "Hello world",
    "Howdy! Once upon a time there was a little robot.",
    "  leading and trailing spaces   ",
    "multiple     spaces\tand\ttabs\n\nand newlines\r\n",
    "Caf\u00e9 na\u00efve fa\u00e7ade",
    "Cafe\u0301 decomposed e\u0301 and a\u0300",              # NFC composes these
    "\ufb01ne \uff28\uff45\uff4c\uff4c\uff4f \u2460 \u00bd",  # NFKC: ligature, full-width, circled digit, fraction
    "\u4eca\u65e5\u306f\u826f\u3044\u5929\u6c17\u3067\u3059\u3002",
    "\u6211\u559c\u6b22\u5b66\u4e60 mixed \u4e2d\u6587 text",
    "emoji \U0001F600\U0001F680 \u2764\ufe0f \U0001F468\u200d\U0001F469\u200d\U0001F467 end",
    "numbers 1234567890 3.14159 -42 1,000,000",
    "I'M SURE YOU'LL SEE THEY'VE done it, we'd say IT'S fine",
    "special <|im_start|>inside<|im_end|> text<|endoftext|>",
    "<|begin_of_text|>a<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nhi",
    "def f(x):\n    return x * 2\n",
    "",
    " ",
    "a",
    "\u00e9\u00e9\u00e9\u00e9\u00e9\u00e9\u00e9\u00e9\u00e9\u00e9\u00e9\u00e9",
    "unseen words: xylophone quizzically zephyr",
]


def train(name, normalizer, pre, post, specials, vocab_size=600, ignore_merges=False, bos=None, eos=None):
    out = os.path.join(ROOT, name)
    os.makedirs(out, exist_ok=True)
    tok = Tokenizer(models.BPE())
    if normalizer is not None:
        tok.normalizer = normalizer
    tok.pre_tokenizer = pre
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(TRAIN, trainer)
    if post is not None:
        tok.post_processor = post(tok)
    path = os.path.join(out, "tokenizer.json")
    tok.save(path)
    if ignore_merges:  # a field of the saved model (Llama 3's tokenizer.json sets it)
        with open(path) as f:
            j = json.load(f)
        j["model"]["ignore_merges"] = True
        with open(path, "w") as f:
            json.dump(j, f, ensure_ascii=False, indent=1)
    tok = Tokenizer.from_file(path)
    cfg = {}
    if eos:
        cfg["eos_token"] = eos
    if bos:
        cfg["bos_token"] = bos
    with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
    ref = []
    for text in CORPUS:
        enc = tok.encode(text, add_special_tokens=True)
        ref.append({"text": text, "ids": enc.ids, "char_offsets": [list(o) for o in enc.offsets]})
    with open(os.path.join(out, "reference.json"), "w") as f:
        json.dump({"tokenizers_version": __import__("tokenizers").__version__, "corpus": ref}, f,
                  ensure_ascii=False, indent=0)
    print("wrote", out, file=sys.stderr)


def main():
    chatml = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    train("qwen2", normalizers.NFC(),
          pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN2_RE), behavior="isolated", invert=False),
                                   pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]),
          lambda t: processors.ByteLevel(trim_offsets=False), chatml, eos="<|im_end|>")
    l3 = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    train("llama3", None,
          pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_RE), behavior="isolated", invert=False),
                                   pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]),
          lambda t: processors.Sequence([
              processors.ByteLevel(trim_offsets=True),
              processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                            special_tokens=[("<|begin_of_text|>",
                                                             t.token_to_id("<|begin_of_text|>"))])]),
          l3, ignore_merges=True, bos="<|begin_of_text|>", eos="<|eot_id|>")
    train("gpt2", normalizers.NFKC(), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
          None, ["<|endoftext|>"], eos="<|endoftext|>")

    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=os.path.join(HERE, "..", "tests", "fixtures", "hf_tiny",
                                                            "tokenizer.model"))
    texts = ["\ufb01ne \uff28\uff45\uff4c\uff4c\uff4f \u2460 \u00bd", "Cafe\u0301 and caf\u00e9",
             "plain ascii text", "\u3000full-width space\uff01"]
    ref = []
    for t in texts:
        pieces = sp.encode(t, out_type="proto").pieces
        ref.append({"text": t, "ids": [p.id for p in pieces], "begin": [p.begin for p in pieces],
                    "end": [p.end for p in pieces]})
    with open(os.path.join(ROOT, "nfkc.json"), "w") as f:
        json.dump({"texts": ref}, f,
                  ensure_ascii=False, indent=0)


if __name__ == "__main__":
    main()
