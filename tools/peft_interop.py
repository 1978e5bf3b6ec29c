#!/usr/bin/env python3
"""Interop check: a prompt trained and saved by softprompt loads in Hugging Face PEFT
(`PeftModel.from_pretrained`) and gives the same loss there as in softprompt.

Usage: .venv/bin/python tools/peft_interop.py path/to/softprompt-binary
Exits non-zero on any mismatch. CI runs it after the Rust tests.
"""
import json
import os
import subprocess
import sys
import tempfile

import torch
from peft import PeftModel
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
FIX = os.path.join(ROOT, "tests", "fixtures")
TEMPLATE = "Review: {text}\nSentiment:"
LABELS = {"negative": " negative", "positive": " positive"}
TOL = 1e-4


def peft_loss(model_dir, prompt_dir, data):
    tok = Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
    rows = [json.loads(l) for l in open(data) if l.strip()]
    seqs, labels = [], []
    for r in rows:
        ctx = tok.encode(TEMPLATE.replace("{text}", r["text"])).ids
        tgt = tok.encode(LABELS[r["label"]], add_special_tokens=False).ids
        seqs.append(ctx + tgt)
        labels.append([-100] * len(ctx) + tgt)
    T = max(map(len, seqs))
    ids = torch.zeros((len(seqs), T), dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    lab = torch.full((len(seqs), T), -100, dtype=torch.long)
    for i, (s, l) in enumerate(zip(seqs, labels)):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
        lab[i, : len(l)] = torch.tensor(l)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, prompt_dir)
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, labels=lab).loss.item()


def main():
    binary = sys.argv[1]
    data = os.path.join(FIX, "data", "sentiment-dev.jsonl")
    train = os.path.join(FIX, "data", "sentiment-train.jsonl")
    failures = 0
    names = ["tiny-llama", "tiny-qwen2", "tiny-gpt2", "tiny-gemma3", "tiny-mistral"]
    for name in names:
        model = os.path.join(FIX, name)
        with tempfile.TemporaryDirectory() as out:
            prompt = os.path.join(out, "prompt")
            subprocess.run([binary, "train", "--model", model, "--train", train, "--output", prompt,
                            "--num-virtual-tokens", "5", "--init-text", "Classify the review", "--lr", "0.1",
                            "--steps", "15", "--quiet"], check=True, stdout=subprocess.DEVNULL)
            ours = json.loads(subprocess.run([binary, "eval", "--model", model, "--prompt", prompt, "--data", data,
                                              "--json"], check=True, capture_output=True, text=True).stdout)["loss"]
            theirs = peft_loss(model, prompt, data)
            ok = abs(ours - theirs) <= TOL
            failures += not ok
            print(f"{name}: softprompt loss {ours:.6f}  PEFT loss {theirs:.6f}  |diff| {abs(ours - theirs):.2e}  {'ok' if ok else 'MISMATCH'}")
    print(f"{len(names) - failures} passed, {failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
