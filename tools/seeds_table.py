#!/usr/bin/env python3
"""Markdown table of tools/seeds.sh results: per task and runner, zero-shot, tuned mean ± sample
standard deviation, range and each seed's accuracy. Runs still missing are left out (the seed
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


print("| run | task | runner | seeds | zero-shot | tuned: mean ± sd | range | per seed |")
print("|---|---|---|---|---|---|---|---|")
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
                  f"| {min(tuned):.1f}–{max(tuned):.1f} | " + ", ".join(f"{t:.1f}" for t in tuned) + " |")
