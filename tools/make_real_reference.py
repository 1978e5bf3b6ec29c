#!/usr/bin/env python3
"""Oracle values for the real-model tests, from transformers loading the same GGUF file:
  reference/tokens.json         ids of every Rotten Tomatoes test text and every SMS text
  reference/logits.safetensors  logits at every position of a few sentences (no prompt)
written into the assets folder (.cache/assets or $SOFTPROMPT_ASSETS). Run after fetch_assets.py:
  .venv/bin/python tools/make_real_reference.py
"""
import json
import os

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
ASSETS = os.environ.get("SOFTPROMPT_ASSETS", os.path.join(ROOT, ".cache", "assets"))
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SENTENCES = [
    "The capital of France is",
    "Review: a gripping, beautifully shot film.\nIs this movie review positive or negative? Answer:",
    "WINNER!! You have been selected to receive a £900 prize reward! Call 09061701461 now.",
]


def texts(path):
    return [json.loads(l)["text"] for l in open(path) if l.strip()]


def main():
    out = os.path.join(ASSETS, "reference")
    os.makedirs(out, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(ASSETS, gguf_file=GGUF)
    all_texts = texts(os.path.join(ASSETS, "rotten-tomatoes", "test.jsonl"))
    for split in ["train", "dev", "test"]:
        all_texts += texts(os.path.join(ASSETS, "sms-spam", f"{split}.jsonl"))
    ids = [tok(t)["input_ids"] for t in all_texts]
    with open(os.path.join(out, "tokens.json"), "w") as f:
        json.dump({"texts": all_texts, "ids": ids}, f)
    model = AutoModelForCausalLM.from_pretrained(ASSETS, gguf_file=GGUF, dtype=torch.float32)
    model.eval()
    tensors = {}
    with torch.no_grad():
        for i, s in enumerate(SENTENCES):
            x = torch.tensor([tok(s)["input_ids"]])
            tensors[f"ids_{i}"] = x[0].to(torch.int64)
            tensors[f"logits_{i}"] = model(input_ids=x).logits[0].contiguous()
    save_file(tensors, os.path.join(out, "logits.safetensors"))
    print(f"{out}: {len(all_texts)} tokenized texts, {len(SENTENCES)} logit references")


if __name__ == "__main__":
    main()
