#!/usr/bin/env python3
"""Writes tests/fixtures/hf_tiny: a tiny random Llama in Hugging Face format (sharded safetensors + index,
config.json), a SentencePiece tokenizer.model, a PEFT LoRA adapter, and reference values computed by
Hugging Face itself (logits, response loss with the next-token shift, LoRA gradients, tokenizer ids/offsets).
The C++ test (tests/hf_test.cc) loads the same files and must agree.

    python3 -m venv /tmp/hfenv && /tmp/hfenv/bin/pip install transformers==4.36.2 peft==0.7.1 safetensors sentencepiece protobuf torch
    /tmp/hfenv/bin/python scripts/make_hf_fixture.py
"""
import io
import json
import os
import sys

import sentencepiece as spm
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "hf_tiny")
os.makedirs(os.path.join(OUT, "adapter"), exist_ok=True)
torch.manual_seed(1234)

# A SentencePiece BPE model trained on a few sentences (byte fallback, so any text encodes).
corpus = [
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
    "### Instruction: Give three tips for staying healthy. ### Response: Eat well, sleep, and exercise.",
    "Howdy! Once upon a time there was a little robot who loved the stars.",
    "The quick brown fox jumps over the lazy dog. 1 2 3 4 5 6 7 8 9 0",
] * 20
model_io = io.BytesIO()
spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus), model_writer=model_io, vocab_size=320,
                               model_type="bpe", byte_fallback=True, character_coverage=1.0,
                               bos_id=1, eos_id=2, unk_id=0, pad_id=-1)
with open(os.path.join(OUT, "tokenizer.model"), "wb") as f:
    f.write(model_io.getvalue())
sp = spm.SentencePieceProcessor(model_proto=model_io.getvalue())

cfg = LlamaConfig(vocab_size=sp.get_piece_size(), hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5,
                  rope_theta=10000.0, tie_word_embeddings=False, torch_dtype="float32")
model = LlamaForCausalLM(cfg).float()
with torch.no_grad():  # larger than the default init so that every term matters
    for p in model.parameters():
        p.normal_(0, 0.3)
    for n, p in model.named_parameters():
        if "norm" in n:
            p.copy_(1 + 0.1 * torch.randn_like(p))
model.save_pretrained(OUT, safe_serialization=True, max_shard_size="20KB")

lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.0,
                  bias="none", task_type="CAUSAL_LM")
peft_model = get_peft_model(model, lora)
with torch.no_grad():  # PEFT starts B at zero; random B makes the A gradients non-zero
    for n, p in peft_model.named_parameters():
        if "lora_" in n:
            p.normal_(0, 0.3)
peft_model.save_pretrained(os.path.join(OUT, "adapter"), safe_serialization=True)
peft_model.eval()

records = []
g = torch.Generator().manual_seed(7)
for length, begin in [(9, 4), (14, 6), (6, 1)]:
    ids = torch.randint(3, cfg.vocab_size, (1, length), generator=g)
    ids[0, 0] = 1
    peft_model.zero_grad()
    logits = peft_model(input_ids=ids).logits  # [1, T, V]
    loss = torch.nn.functional.cross_entropy(logits[0, begin - 1:length - 1], ids[0, begin:length])
    loss.backward()
    grads = {}
    for n, p in peft_model.named_parameters():
        if "lora_" in n:
            grads[n.replace(".default", "")] = p.grad.detach().reshape(-1).tolist()
    with torch.no_grad():
        base_logits = model.get_base_model()(input_ids=ids).logits if hasattr(model, "get_base_model") else None
    records.append({"ids": ids[0].tolist(), "response_begin": begin, "loss": loss.item(),
                    "logits": logits[0].detach().reshape(-1).tolist(), "lora_grads": grads})

texts = ["Howdy! Once upon a time.", "caf\u00e9 \u2713 42", "Give three tips for staying healthy."]
tok = []
for t in texts:
    pieces = sp.encode(t, out_type="proto").pieces
    tok.append({"text": t, "ids": [p.id for p in pieces], "begin": [p.begin for p in pieces],
                "end": [p.end for p in pieces]})
with open(os.path.join(OUT, "reference.json"), "w") as f:
    json.dump({"records": records, "tokenizer": tok, "lora_scale": 8 / 4}, f)
readme = os.path.join(OUT, "adapter", "README.md")  # PEFT writes a model card; not needed
if os.path.exists(readme):
    os.remove(readme)
print("wrote", OUT, file=sys.stderr)
