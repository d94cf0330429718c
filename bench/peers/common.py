"""Shared by the peer scripts: the fine-tuned model as exported by `rapidin export-hf`, the token ids rapidin uses
(`rapidin tokenize`), the response-only loss (mean over the response tokens and EOS, as rapidin's), and the
metrics of bench/backdoor/metrics.py."""
import json
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "backdoor"))
from metrics import rank_metrics, mean  # noqa: E402,F401


def jsonl(path):
    return [json.loads(l) for l in open(path) if l.strip()]


def load_model(hf_dir):
    from transformers import LlamaForCausalLM
    m = LlamaForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32, attn_implementation="eager")
    m.eval()
    return m


class Records(torch.utils.data.Dataset):
    """Token ids with labels = -100 on the prompt (the loss covers the response tokens and EOS)."""

    def __init__(self, path):
        self.rows = jsonl(path)

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        r = self.rows[i]
        ids = torch.tensor(r["ids"], dtype=torch.long)
        labels = ids.clone()
        labels[:r["response_begin"]] = -100
        return {"input_ids": ids, "labels": labels}


def collate(items):
    T = max(len(x["input_ids"]) for x in items)
    ids = torch.zeros(len(items), T, dtype=torch.long)
    labels = torch.full((len(items), T), -100, dtype=torch.long)
    mask = torch.zeros(len(items), T, dtype=torch.long)
    for b, x in enumerate(items):
        n = len(x["input_ids"])
        ids[b, :n] = x["input_ids"]
        labels[b, :n] = x["labels"]
        mask[b, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def record_losses(model, batch):
    """Per-record mean next-token loss over the labelled positions, [B]."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
    labels = batch["labels"][:, 1:]
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1),
                                           ignore_index=-100, reduction="none").view(labels.shape)
    n = (labels != -100).sum(1).clamp(min=1)
    return ce.sum(1) / n


def query_sets():
    """The query sets the peer scripts score: PEER_SETS (space-separated), default the backdoor benchmark's three."""
    return tuple(os.environ.get("PEER_SETS", "planted greedy control").split())


def labels_of(train_rows):
    return np.array([1 if r["id"].startswith("poison-") else 0 for r in train_rows])
