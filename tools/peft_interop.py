#!/usr/bin/env python3
"""Interop check, both ways, for every prompt-learning method (prompt tuning, prefix tuning with
and without projection, P-tuning with an MLP and an LSTM encoder):

- a prompt trained and saved by softprompt loads in Hugging Face PEFT
  (`PeftModel.from_pretrained`) and gives the same loss there as in softprompt;
- an adapter trained and saved by PEFT (`get_peft_model`, a few AdamW steps, `save_pretrained`)
  loads in softprompt and gives PEFT's loss.

Usage: .venv/bin/python tools/peft_interop.py path/to/softprompt-binary [--backend candle|tch]
Exits non-zero on any mismatch. CI runs it after the Rust tests.
"""
import json
import os
import subprocess
import sys
import tempfile

import torch
from peft import PeftModel, PrefixTuningConfig, PromptEncoderConfig, get_peft_model
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
FIX = os.path.join(ROOT, "tests", "fixtures")
TEMPLATE = "Review: {text}\nSentiment:"
LABELS = {"negative": " negative", "positive": " positive"}
TOL = 1e-4


# (name, softprompt train flags, PEFT config of the same method or None)
METHODS = [
    ("prompt", ["--method", "prompt"], None),
    ("prefix", ["--method", "prefix"],
     lambda: PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5)),
    ("prefix+projection", ["--method", "prefix", "--prefix-projection", "16"],
     lambda: PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5, prefix_projection=True,
                                encoder_hidden_size=16)),
    ("p-tuning mlp", ["--method", "p-tuning", "--encoder-hidden-size", "16"],
     lambda: PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=5, encoder_hidden_size=16)),
    ("p-tuning lstm", ["--method", "p-tuning", "--encoder", "lstm", "--encoder-hidden-size", "8"],
     lambda: PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=5, encoder_hidden_size=8,
                                 encoder_reparameterization_type="LSTM")),
]


def encode(model_dir, data):
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
    return ids, mask, lab


def peft_loss(model_dir, prompt_dir, data):
    ids, mask, lab = encode(model_dir, data)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, prompt_dir)
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, labels=lab).loss.item()


def peft_train(model_dir, config, data, out):
    """A few full-batch AdamW steps of a fresh PEFT adapter, saved with save_pretrained."""
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = get_peft_model(base, config)
    ids, mask, lab = encode(model_dir, data)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    model.train()
    for _ in range(8):
        loss = model(input_ids=ids, attention_mask=mask, labels=lab).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(out)


def our_loss(binary, backend, model, prompt, data):
    out = subprocess.run([binary, "eval", "--backend", backend, "--model", model, "--prompt", prompt,
                          "--data", data, "--template", TEMPLATE,
                          "--labels", ",".join(f"{k}={v}" for k, v in LABELS.items()), "--json"],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out)["loss"]


def main():
    binary = sys.argv[1]
    backend = sys.argv[sys.argv.index("--backend") + 1] if "--backend" in sys.argv else "candle"
    data = os.path.join(FIX, "data", "sentiment-dev.jsonl")
    train = os.path.join(FIX, "data", "sentiment-train.jsonl")
    failures = checks = 0
    names = ["tiny-llama", "tiny-qwen2", "tiny-gpt2", "tiny-gemma3", "tiny-mistral"]

    def report(name, way, ours, theirs):
        nonlocal failures, checks
        ok = abs(ours - theirs) <= TOL
        failures += not ok
        checks += 1
        print(f"{name:13} {way:27} softprompt loss {ours:.6f}  PEFT loss {theirs:.6f}  "
              f"|diff| {abs(ours - theirs):.2e}  {'ok' if ok else 'MISMATCH'}", flush=True)

    for name in names:
        model = os.path.join(FIX, name)
        for method, flags, peft_config in METHODS:
            with tempfile.TemporaryDirectory() as out:
                # ours -> PEFT
                prompt = os.path.join(out, "ours")
                # a text start where the method takes one (prompt tuning, the plain prefix: its keys
                # and values); the projected prefix and P-tuning start as PEFT's do
                init = ([] if "--prefix-projection" in flags or method.startswith("p-tuning")
                        else ["--init-text", "Classify the review"])
                subprocess.run([binary, "train", "--backend", backend, "--model", model, "--train", train,
                                "--output", prompt, "--num-virtual-tokens", "5", *init,
                                "--template", TEMPLATE, "--labels", ",".join(f"{k}={v}" for k, v in LABELS.items()),
                                "--lr", "0.1", "--steps", "15", "--quiet", *flags],
                               check=True, stdout=subprocess.DEVNULL)
                report(name, f"{method}: ours in PEFT", our_loss(binary, backend, model, prompt, data),
                       peft_loss(model, prompt, data))
                if peft_config is None:
                    continue  # prompt tuning PEFT -> softprompt: the store tests' PEFT fixtures
                # PEFT -> ours
                theirs_dir = os.path.join(out, "peft")
                peft_train(model, peft_config(), train, theirs_dir)
                report(name, f"{method}: PEFT's in ours", our_loss(binary, backend, model, theirs_dir, data),
                       peft_loss(model, theirs_dir, data))
    print(f"{checks - failures} passed, {failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
