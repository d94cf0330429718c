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
    /tmp/hfenv/bin/python scripts/make_hf_arch_fixtures.py [name ...]   (qwen2_chat: the chat demo's model)
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


def main():
    for name, spec in FIXTURES.items():
        if len(sys.argv) == 1 or name in sys.argv[1:]:
            write(name, *spec)
    if len(sys.argv) == 1 or "qwen2_chat" in sys.argv[1:]:
        write_chat_demo()


CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
          "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
QWEN2_RE = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""


def write_chat_demo():
    """tests/fixtures/qwen2_chat: the second demo's model. A Qwen2ForCausalLM (random weights, tied head) with a
    Qwen2-style byte-level tokenizer.json trained on this repository's own Markdown (not on any data set) and a
    ChatML chat_template; `rapidin finetune` trains it on chat records in scripts/demo.sh --chat. reference.json
    holds transformers' ids for chats rendered with apply_chat_template and the model's logits on one of them."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast
    import glob
    out = os.path.join(ROOT, "..", "qwen2_chat")
    os.makedirs(out, exist_ok=True)
    repo = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    texts = []
    for path in sorted(glob.glob(os.path.join(repo, "*.md")) + glob.glob(os.path.join(repo, "bench", "results", "*.md"))):
        with open(path, encoding="utf-8") as f:
            texts += [line for line in f.read().splitlines() if line.strip()]
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_RE), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=2048, special_tokens=specials, show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(os.path.join(out, "tokenizer.json"))
    with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
        json.dump({"chat_template": CHATML, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
                   "bos_token": None, "model_max_length": 512, "tokenizer_class": "Qwen2Tokenizer"}, f, indent=1)
    torch.manual_seed(99)
    cfg = tf.Qwen2Config(vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=172, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=True, torch_dtype="float32",
                         bos_token_id=None, eos_token_id=tok.token_to_id("<|im_end|>"))
    cfg._attn_implementation = "eager"
    model = tf.Qwen2ForCausalLM(cfg).float()
    model.save_pretrained(out, safe_serialization=True)
    model.eval()
    hf_tok = PreTrainedTokenizerFast(tokenizer_file=os.path.join(out, "tokenizer.json"), eos_token="<|im_end|>",
                                     pad_token="<|endoftext|>")
    hf_tok.chat_template = CHATML
    chats = [
        [{"role": "user", "content": "What does the router do?"},
         {"role": "assistant", "content": "It fans a query out to every shard server and merges the answers."}],
        [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Caf\u00e9? \u4eca\u65e5"},
         {"role": "assistant", "content": "Yes."}, {"role": "user", "content": "And then"},
         {"role": "assistant", "content": " the store  is\nwritten. \U0001F600"}],
    ]
    ref = []
    for c in chats:
        ids = hf_tok.apply_chat_template(c, tokenize=True)
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0]
        ref.append({"messages": c, "ids": ids, "text": hf_tok.apply_chat_template(c, tokenize=False),
                    "logits_last": logits[-1].tolist()})
    with open(os.path.join(out, "reference.json"), "w") as f:
        json.dump({"chats": ref}, f, ensure_ascii=False)
    print("wrote", out, file=sys.stderr)


if __name__ == "__main__":
    main()
