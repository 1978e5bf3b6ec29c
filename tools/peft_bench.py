#!/usr/bin/env python3
"""The PyTorch + Hugging Face PEFT side of `softprompt bench`: the same train step (forward,
backward to the prompt, gradient clipping, AdamW) and the same rank classification (PEFT's
forward, log-softmax at each row's last real token) on exactly the token ids that
`softprompt bench --batch-out FILE` wrote, with the same thread count.

Usage: .venv/bin/python tools/peft_bench.py FILE   (prints one JSON object)
"""
import json
import os
import resource
import sys
import time

import torch
from peft import PromptTuningConfig, PromptTuningInit, TaskType, get_peft_model
from transformers import AutoModelForCausalLM


def padded(rows, with_labels):
    T = max(len(r["ids"]) for r in rows)
    ids = torch.zeros((len(rows), T), dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    labels = torch.full((len(rows), T), -100)
    for j, r in enumerate(rows):
        n = len(r["ids"])
        ids[j, :n] = torch.tensor(r["ids"])
        mask[j, :n] = 1
        if with_labels:
            labels[j, :n] = torch.tensor([i if t else -100 for i, t in zip(r["ids"], r["targets"])])
    return ids, mask, labels


def main():
    spec = json.load(open(sys.argv[1]))
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    model_path = spec["model"]
    t0 = time.perf_counter()
    if model_path.endswith(".gguf"):
        model = AutoModelForCausalLM.from_pretrained(os.path.dirname(model_path),
                                                     gguf_file=os.path.basename(model_path),
                                                     dtype=torch.float32)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    cfg = PromptTuningConfig(task_type=TaskType.CAUSAL_LM,
                             num_virtual_tokens=spec["num_virtual_tokens"],
                             prompt_tuning_init=PromptTuningInit.RANDOM)
    peft_model = get_peft_model(model, cfg)
    if "prompt" in spec:
        # softprompt's starting prompt, so that both runs take the same steps (their losses are
        # printed side by side as a correctness check)
        with torch.no_grad():
            peft_model.prompt_encoder["default"].embedding.weight.copy_(torch.tensor(spec["prompt"]))
    load_s = time.perf_counter() - t0
    params = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=0.03, weight_decay=0.01)
    ids, mask, labels = padded(spec["train"], True)
    warmup, repeats = spec["warmup"], spec["repeats"]
    peft_model.train()
    times, losses, all_losses = [], [], []
    for i in range(warmup + repeats):
        t = time.perf_counter()
        loss = peft_model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad()
        dt = time.perf_counter() - t
        all_losses.append(loss.item())
        if i >= warmup:
            times.append(dt)
            losses.append(loss.item())
    peft_model.eval()
    cand = torch.tensor(spec["candidates"])
    evals = [padded(rows, False)[:2] for rows in spec["eval"]]
    examples = sum(len(rows) for rows in spec["eval"])
    eval_times = []
    with torch.no_grad():
        for i in range(warmup + repeats):
            t = time.perf_counter()
            for (e_ids, e_mask) in evals:
                logits = peft_model(input_ids=e_ids, attention_mask=e_mask).logits
                offset = logits.shape[1] - e_ids.shape[1]
                last = offset + e_mask.sum(1) - 1
                lp = torch.log_softmax(logits[torch.arange(len(e_ids)), last].float(), -1)
                lp[:, cand]
            if i >= warmup:
                eval_times.append(time.perf_counter() - t)
    gen_tokens = spec.get("gen_tokens", 0)
    gen_tps = None
    if gen_tokens:
        first = torch.tensor([spec["train"][0]["ids"]])
        gen_times = []
        with torch.no_grad():
            for i in range(warmup + repeats):
                t = time.perf_counter()
                out = peft_model.generate(input_ids=first, attention_mask=torch.ones_like(first),
                                          max_new_tokens=gen_tokens, min_new_tokens=gen_tokens,
                                          do_sample=False)
                if i >= warmup:
                    gen_times.append(time.perf_counter() - t)
        assert out.shape[1] - first.shape[1] == gen_tokens, out.shape
        gen_tps = gen_tokens / sorted(gen_times)[len(gen_times) // 2]
    n = spec.get("matmul_size", 1536)
    a, b = torch.randn(n, n), torch.randn(n, n)
    mm = []
    for i in range(11):
        t = time.perf_counter()
        a @ b
        if i:
            mm.append(time.perf_counter() - t)
    matmul = 2 * n ** 3 / min(mm)  # the fastest of 10: the practical ceiling
    med = sorted(times)[len(times) // 2]
    eval_med = sorted(eval_times)[len(eval_times) // 2]
    tokens = ids.shape[0] * (spec["num_virtual_tokens"] + ids.shape[1])
    print(json.dumps({
        "backend": "peft",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "load_seconds": load_s,
        "train_step_seconds": med,
        "train_step_all": times,
        "train_tokens_per_second": tokens / med,
        "train_losses": losses,
        "train_losses_all": all_losses,
        "eval_seconds": eval_med,
        "eval_examples_per_second": examples / eval_med,
        "generate_tokens_per_second": gen_tps,
        "matmul_flops_per_second": matmul,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }))


if __name__ == "__main__":
    main()
