#!/usr/bin/env python3
"""Writes tests/fixtures/arch/<name>: for each architecture next to Llama, a tiny random model in Hugging Face format
(model.safetensors + config.json), a PEFT LoRA adapter, and reference values computed by transformers itself
(logits, the response loss with the next-token shift, LoRA gradients, and the gradient of every base weight for
one record). tests/hf_arch_test.cc loads the same files and must agree to 1e-4 in float32.

Each configuration exercises what the architecture adds: Qwen2's q/k/v biases (tied and untied heads), Mistral's
sliding window shorter than the records, Llama 3's rope_scaling (type llama3) with GQA, Gemma's GeGLU, (1 + w)
RMSNorm, embedding scaling and a head_dim other than hidden/heads, Gemma2's soft-capping, extra norms,
query_pre_attn_scalar and alternating sliding window, Phi3's fused qkv and gate_up projections.

    python3 -m venv /tmp/hfenv && /tmp/hfenv/bin/pip install transformers==4.44.2 peft==0.12.0 safetensors torch
    /tmp/hfenv/bin/python scripts/make_hf_arch_fixtures.py
"""
import json
import os
import sys

import torch
import transformers as tf
from peft import LoraConfig, get_peft_model

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "arch")
V = 64
COMMON = dict(vocab_size=V, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, rope_theta=10000.0,
              torch_dtype="float32")
LLAMA_TARGETS = ["q_proj", "v_proj", "down_proj"]
FIXTURES = {
    "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM, dict(tie_word_embeddings=True), LLAMA_TARGETS),
    "qwen2_untied": (tf.Qwen2Config, tf.Qwen2ForCausalLM, dict(tie_word_embeddings=False), ["q_proj", "k_proj"]),
    "mistral": (tf.MistralConfig, tf.MistralForCausalLM, dict(sliding_window=4, tie_word_embeddings=False),
                LLAMA_TARGETS),
    "llama3": (tf.LlamaConfig, tf.LlamaForCausalLM,
               dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=False,
                    rope_theta=500000.0,
                    rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
               LLAMA_TARGETS),
    "gemma": (tf.GemmaConfig, tf.GemmaForCausalLM, dict(head_dim=8, hidden_activation="gelu_pytorch_tanh"),
              LLAMA_TARGETS),
    "gemma2": (tf.Gemma2Config, tf.Gemma2ForCausalLM,
               dict(head_dim=8, hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=6,
                    attn_logit_softcapping=2.0, final_logit_softcapping=3.0, sliding_window=4),
               LLAMA_TARGETS),
    "phi3": (tf.Phi3Config, tf.Phi3ForCausalLM,
             dict(sliding_window=64, tie_word_embeddings=False, pad_token_id=0),
             ["qkv_proj", "gate_up_proj", "down_proj"]),
}


def write(name, config_cls, model_cls, extra, targets):
    out = os.path.join(ROOT, name)
    os.makedirs(os.path.join(out, "adapter"), exist_ok=True)
    torch.manual_seed(1234)
    kw = dict(COMMON)
    kw.update(extra)
    cfg = config_cls(**kw)
    cfg._attn_implementation = "eager"
    model = model_cls(cfg).float()
    with torch.no_grad():  # larger than the default init so that every term matters
        for n, p in model.named_parameters():
            p.normal_(0, 0.3)
            if "norm" in n:
                # Gemma's norms scale by (1 + w): keep w small there, as trained models do
                p.copy_((0.0 if "gemma" in name else 1.0) + 0.1 * torch.randn_like(p))
    model.save_pretrained(out, safe_serialization=True)
    model.eval()
    # One record's gradient for every base weight (the full-model path, no adapter).
    g = torch.Generator().manual_seed(7)
    recs = [(torch.randint(3, V, (1, n), generator=g), b) for n, b in [(12, 4), (14, 6), (6, 1)]]
    for ids, _ in recs:
        ids[0, 0] = 1
    ids, begin = recs[0]
    model.zero_grad()
    logits = model(input_ids=ids).logits
    torch.nn.functional.cross_entropy(logits[0, begin - 1:-1], ids[0, begin:]).backward()
    base_grads = {n: p.grad.detach().reshape(-1).tolist() for n, p in model.named_parameters()}

    lora = LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0, bias="none",
                      task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, lora)
    with torch.no_grad():  # PEFT starts B at zero; random B makes the A gradients non-zero
        for n, p in peft_model.named_parameters():
            if "lora_" in n:
                p.normal_(0, 0.3)
    peft_model.save_pretrained(os.path.join(out, "adapter"), safe_serialization=True)
    peft_model.eval()
    records = []
    for ids, begin in recs:
        length = ids.shape[1]
        peft_model.zero_grad()
        logits = peft_model(input_ids=ids).logits  # [1, T, V]
        loss = torch.nn.functional.cross_entropy(logits[0, begin - 1:length - 1], ids[0, begin:length])
        loss.backward()
        grads = {n.replace(".default", ""): p.grad.detach().reshape(-1).tolist()
                 for n, p in peft_model.named_parameters() if "lora_" in n}
        records.append({"ids": ids[0].tolist(), "response_begin": begin, "loss": loss.item(),
                        "logits": logits[0].detach().reshape(-1).tolist(), "lora_grads": grads})
    with open(os.path.join(out, "reference.json"), "w") as f:
        json.dump({"architecture": cfg.architectures[0], "records": records, "base_grads": base_grads,
                   "lora_targets": targets}, f)
    readme = os.path.join(out, "adapter", "README.md")  # PEFT writes a model card; not needed
    if os.path.exists(readme):
        os.remove(readme)
    print("wrote", out, file=sys.stderr)


if __name__ == "__main__":
    for name, spec in FIXTURES.items():
        if len(sys.argv) == 1 or name in sys.argv[1:]:
            write(name, *spec)
