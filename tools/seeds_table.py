#!/usr/bin/env python3
"""Markdown table of tools/seeds.sh results: per task and runner, zero-shot, tuned mean ± sample
standard deviation, range and each seed's accuracy, seconds per train step and peak resident
memory (means over the seeds; runs from before those were recorded show '-'). Runs still missing are left out (the seed
count says how many there are).

Usage: python3 tools/seeds_table.py runs/seeds/<MODEL[-METHOD]>/results.jsonl [...]
"""
import json
import os
import statistics
import sys


def acc(r, which):
    res = r["result"]
    if r["runner"] == "softprompt":
        return res["zero_shot_test" if which == "zero" else "tuned_test"]
    return res["zero_shot_accuracy" if which == "zero" else "tuned_accuracy"]


# softprompt reports the mean over its steps, the PEFT script the median
step_key = {"softprompt": "seconds_per_step", "peft": "median_step_seconds"}


def mean_of(rs, key):
    """Mean of a per-run figure over the runs that recorded it, formatted, or '-'."""
    vals = [r["result"][key] for r in rs if r["result"].get(key) is not None]
    return f"{statistics.mean(vals):.2f}" if vals else "-"


print("| run | task | runner | seeds | zero-shot | tuned: mean ± sd | range | per seed | s/step | peak MiB |")
print("|---|---|---|---|---|---|---|---|---|---|")
for path in sys.argv[1:]:
    rows = [json.loads(l) for l in open(path) if l.strip()]
    run = os.path.basename(os.path.dirname(path))
    for task in dict.fromkeys(r["task"] for r in rows):
        for runner in ("softprompt", "peft"):
            rs = sorted((r for r in rows if r["task"] == task and r["runner"] == runner), key=lambda r: r["seed"])
            if not rs:
                continue
            tuned = [100 * acc(r, "tuned") for r in rs]
            zero = 100 * acc(rs[0], "zero")
            sd = statistics.stdev(tuned) if len(tuned) > 1 else float("nan")
            print(f"| {run} | {task} | {runner} | {len(rs)} | {zero:.1f}% | {statistics.mean(tuned):.1f}% ± {sd:.1f} "
                  f"| {min(tuned):.1f}–{max(tuned):.1f} | " + ", ".join(f"{t:.1f}" for t in tuned)
                  + f" | {mean_of(rs, step_key[runner])} | {mean_of(rs, 'peak_rss_mib').split('.')[0]} |")
