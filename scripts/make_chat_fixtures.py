#!/usr/bin/env python3
"""Writes tests/fixtures/chat/reference.json: the chat_template (Jinja) of each family rapidin recognises, as
the models ship them, and what transformers' apply_chat_template renders from them for a set of conversations
(with and without a generation prompt; null where the template raises). tests/chat_test.cc recognises each
template and must render the same text.

    /tmp/hfenv/bin/python scripts/make_chat_fixtures.py
"""
import json
import os

from transformers import PreTrainedTokenizerFast
from tokenizers import Tokenizer, models

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "chat")

TEMPLATES = {
    # Qwen2-Instruct
    "chatml": "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}",
    # Meta-Llama-3-8B-Instruct
    "llama3": "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}",
    # Llama-2-7b-chat-hf
    "llama2": "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}",
    # Mistral-7B-Instruct-v0.2
    "mistral": "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}",
    # gemma-2b-it
    "gemma": "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\\n'}}{% endif %}",
}
BOS_EOS = {"chatml": (None, "<|im_end|>"), "llama3": ("<|begin_of_text|>", "<|eot_id|>"),
           "llama2": ("<s>", "</s>"), "mistral": ("<s>", "</s>"), "gemma": ("<bos>", "<eos>")}

CONVERSATIONS = [
    [{"role": "user", "content": "Give three tips for staying healthy."},
     {"role": "assistant", "content": "Eat well, sleep, and exercise."}],
    [{"role": "system", "content": "You are terse."},
     {"role": "user", "content": "  Hi there!  "},
     {"role": "assistant", "content": " Hello. \n"},
     {"role": "user", "content": "Caf\u00e9 \u4eca\u65e5 \U0001F600?"},
     {"role": "assistant", "content": "Yes\n\nindeed."}],
    [{"role": "user", "content": "One turn, no answer yet"}],
    [{"role": "assistant", "content": "I speak first"}, {"role": "user", "content": "odd"}],
]


def main():
    os.makedirs(OUT, exist_ok=True)
    tok = Tokenizer(models.BPE())
    renders = {}
    for name, jinja in TEMPLATES.items():
        bos, eos = BOS_EOS[name]
        t = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos)
        t.chat_template = jinja
        out = []
        for conv in CONVERSATIONS:
            r = {}
            for gen in (False, True):
                try:
                    r["with_prompt" if gen else "plain"] = t.apply_chat_template(conv, tokenize=False,
                                                                                  add_generation_prompt=gen)
                except Exception as e:  # the template raises: rapidin must refuse the conversation too
                    r["with_prompt" if gen else "plain"] = None
            out.append(r)
        renders[name] = out
    with open(os.path.join(OUT, "reference.json"), "w") as f:
        json.dump({"templates": TEMPLATES, "bos_eos": BOS_EOS, "conversations": CONVERSATIONS,
                   "renders": renders}, f, ensure_ascii=False, indent=1)


if __name__ == "__main__":
    main()
