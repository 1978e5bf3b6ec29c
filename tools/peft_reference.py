#!/usr/bin/env python3
"""Reference run of Hugging Face PEFT prompt learning (prompt tuning, prefix tuning with or
without projection, P-tuning) on the same model, data, template, split, steps, batch, optimizer
and virtual-token count as softprompt's main job, for docs/results.md.

Usage: .venv/bin/python tools/peft_reference.py [--model FILE.gguf] [--data rotten-tomatoes|sms-spam|nyt-editorials]
       [--method prompt|prefix|prefix-projection|p-tuning|p-tuning-lstm] [--encoder-hidden-size N] [--steps 60]
       [--schedule constant|linear --warmup N] [--dev-every N] ...
Prints one JSON object: zero-shot and tuned test accuracy and seconds per train step.
The schedule and the dev-set selection follow softprompt's trainer step for step: step s (1-based)
trains at lr·s/warmup while s ≤ warmup, then lr·(steps−s+1)/(steps−warmup); with --dev-every N
the prompt is scored on the task's dev.jsonl after every N-th step and the last, and the test
accuracy is that of the best-scoring prompt (the earliest of ties).
"""
import argparse
import json
import os
import random
import resource
import time

import torch
from peft import (PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig, PromptTuningInit, TaskType,
                  get_peft_model)
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
ASSETS = os.environ.get("SOFTPROMPT_ASSETS", os.path.join(ROOT, ".cache", "assets"))
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TASKS = {
    "rotten-tomatoes": ("Review: {text}\nIs this movie review positive or negative? Answer:",
                        {"negative": " negative", "positive": " positive"},
                        "Classify if the movie review is positive or negative"),
    "sms-spam": ("Message: {text}\nIs this message spam or ham? Answer:",
                 {"ham": " ham", "spam": " spam"},
                 "Classify if the text message is spam or ham"),
    "nyt-editorials": ("Sentence: {text}\nIs the sentiment of this sentence negative, neutral or positive? Answer:",
                       {"negative": " negative", "neutral": " neutral", "positive": " positive"},
                       "Classify the sentiment of the sentence as negative, neutral or positive"),
}


def rows(path):
    return [json.loads(l) for l in open(path) if l.strip()]


def encode(tok, template, text, max_context):
    ids = tok(template.replace("{text}", text))["input_ids"]
    return ids[-max_context:]


def accuracy(model, tok, template, labels, data, batch, max_context, pad):
    cand = [tok(w, add_special_tokens=False)["input_ids"][0] for w in labels.values()]
    names = list(labels)
    correct = 0
    model.eval()
    with torch.no_grad():
        for i in range(0, len(data), batch):
            chunk = data[i : i + batch]
            seqs = [encode(tok, template, r["text"], max_context) for r in chunk]
            T = max(map(len, seqs))
            ids = torch.full((len(seqs), T), pad)
            mask = torch.zeros((len(seqs), T), dtype=torch.long)
            for j, s in enumerate(seqs):
                ids[j, : len(s)] = torch.tensor(s)
                mask[j, : len(s)] = 1
            logits = model(input_ids=ids, attention_mask=mask).logits
            offset = logits.shape[1] - T  # PEFT returns logits for the virtual tokens too
            for j, (s, r) in enumerate(zip(seqs, chunk)):
                lp = torch.log_softmax(logits[j, offset + len(s) - 1].float(), -1)
                pred = max(range(len(cand)), key=lambda k: lp[cand[k]].item())
                correct += names[pred] == r["label"]
    return correct / len(data)


def set_prefix_from_text(peft_model, model, tok, text, n):
    """Li & Liang's initialisation: the prefix's keys and values are the frozen model's own at
    PEFT's TEXT init tokens (tokenized, tiled and cut to n), in PEFT's prefix layout
    [n, layers*2*kv*hd] (per virtual token: layer-major, keys before values, then heads)."""
    ids = tok(text)["input_ids"]
    ids = (ids * (n // len(ids) + 1))[:n]
    with torch.no_grad():
        cache = model(input_ids=torch.tensor([ids]), use_cache=True).past_key_values
        rows = []
        for layer in cache.layers:
            for t in (layer.keys, layer.values):  # [1, kv, n, hd]
                rows.append(t[0].permute(1, 0, 2).reshape(n, -1))
        weight = peft_model.prompt_encoder["default"].embedding.weight
        weight.copy_(torch.cat(rows, dim=1).to(weight.dtype))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=GGUF, help="a GGUF file in the assets folder")
    ap.add_argument("--data", default="rotten-tomatoes", choices=list(TASKS))
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=0.03)
    ap.add_argument("--num-virtual-tokens", type=int, default=20)
    ap.add_argument("--test-limit", type=int, default=500)
    ap.add_argument("--max-context", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--method", default="prompt",
                    choices=["prompt", "prefix", "prefix-text", "prefix-projection", "p-tuning", "p-tuning-lstm"],
                    help="prefix-text: prefix tuning started at the keys and values of the task's init text "
                         "(Li & Liang; PEFT's TEXT tokens, tiled to the virtual tokens, through the frozen model)")
    ap.add_argument("--encoder-hidden-size", type=int, default=None,
                    help="prefix-projection / p-tuning encoder width (PEFT's default: token_dim)")
    ap.add_argument("--schedule", default="constant", choices=["constant", "linear"],
                    help="linear: warmup over --warmup steps, then linear decay to zero (softprompt's --schedule linear)")
    ap.add_argument("--warmup", type=int, default=0)
    ap.add_argument("--dev-every", type=int, default=0,
                    help="score the dev split every N steps and keep the best prompt (softprompt's --dev --eval-every)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    template, labels, init_text = TASKS[a.data]
    tok = AutoTokenizer.from_pretrained(ASSETS, gguf_file=a.model)
    model = AutoModelForCausalLM.from_pretrained(ASSETS, gguf_file=a.model, dtype=torch.float32)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    train = rows(os.path.join(ASSETS, a.data, "train.jsonl"))
    test = rows(os.path.join(ASSETS, a.data, "test.jsonl"))[: a.test_limit]
    zero = accuracy(model, tok, template, labels, test, 16, a.max_context, pad)
    n = a.num_virtual_tokens
    if a.method == "prompt":
        cfg = PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=n,
                                 prompt_tuning_init=PromptTuningInit.TEXT, prompt_tuning_init_text=init_text,
                                 tokenizer_name_or_path=ASSETS, tokenizer_kwargs={"gguf_file": a.model})
    elif a.method.startswith("prefix"):
        cfg = PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=n,
                                 prefix_projection=a.method == "prefix-projection",
                                 encoder_hidden_size=a.encoder_hidden_size)
    else:
        cfg = PromptEncoderConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=n,
                                  encoder_hidden_size=a.encoder_hidden_size,
                                  encoder_reparameterization_type="LSTM" if a.method == "p-tuning-lstm" else "MLP")
    peft_model = get_peft_model(model, cfg)
    if a.method == "prefix-text":
        set_prefix_from_text(peft_model, model, tok, init_text, n)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=0.01)

    def factor(s):  # s: 0-based index of the step about to run, as softprompt's Schedule
        if a.schedule == "constant":
            return 1.0
        if s < a.warmup:
            return (s + 1) / a.warmup
        if a.steps <= a.warmup:
            return 1.0
        return min(max((a.steps - s) / (a.steps - a.warmup), 0.0), 1.0)

    dev = rows(os.path.join(ASSETS, a.data, "dev.jsonl")) if a.dev_every > 0 else []
    best, best_step, evals = None, None, []
    order = list(range(len(train)))
    random.Random(a.seed).shuffle(order)
    times, losses = [], []
    peft_model.train()
    for step in range(a.steps):
        batch = [train[i] for i in order[step * a.batch_size : (step + 1) * a.batch_size]]
        seqs, labs = [], []
        for r in batch:
            ctx = encode(tok, template, r["text"], a.max_context)
            tgt = tok(labels[r["label"]], add_special_tokens=False)["input_ids"]
            seqs.append(ctx + tgt)
            labs.append([-100] * len(ctx) + tgt)
        T = max(map(len, seqs))
        ids = torch.full((len(seqs), T), pad)
        mask = torch.zeros((len(seqs), T), dtype=torch.long)
        lab = torch.full((len(seqs), T), -100)
        for j, (s, l) in enumerate(zip(seqs, labs)):
            ids[j, : len(s)] = torch.tensor(s)
            mask[j, : len(s)] = 1
            lab[j, : len(l)] = torch.tensor(l)
        for g in opt.param_groups:
            g["lr"] = a.lr * factor(step)
        t0 = time.perf_counter()
        loss = peft_model(input_ids=ids, attention_mask=mask, labels=lab).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
        done = step + 1
        if a.dev_every > 0 and (done % a.dev_every == 0 or done == a.steps):
            value = accuracy(peft_model, tok, template, labels, dev, 16, a.max_context, pad)
            peft_model.train()
            evals.append({"step": done, "dev_accuracy": value})
            if best is None or value > best[0]:
                best = (value, [p.detach().clone() for p in params])
                best_step = done
    if best is not None:
        with torch.no_grad():
            for p, b in zip(params, best[1]):
                p.copy_(b)
    tuned = accuracy(peft_model, tok, template, labels, test, 16, a.max_context, pad)
    times.sort()
    print(json.dumps({"model": a.model, "method": a.method, "seed": a.seed, "task": a.data, "steps": a.steps,
                      "batch_size": a.batch_size, "lr": a.lr, "schedule": a.schedule, "warmup": a.warmup,
                      "dev_evals": evals, "best_dev_step": best_step,
                      "trainable_parameters": sum(p.numel() for p in params),
                      "num_virtual_tokens": a.num_virtual_tokens, "test_examples": len(test),
                      "zero_shot_accuracy": zero, "tuned_accuracy": tuned,
                      "median_step_seconds": times[len(times) // 2], "final_loss": losses[-1],
                      # Linux reports ru_maxrss in KiB
                      "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


if __name__ == "__main__":
    main()
