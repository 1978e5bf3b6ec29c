#!/usr/bin/env bash
# Train-step time and rank-classification throughput of every backend beside PyTorch + PEFT, in
# one run, on the same batch of the real task, with the same thread count. Prints a table of
# medians and ratios (ours / PEFT) and keeps the raw JSON in runs/bench/.
#   bash tools/bench.sh                 # candle and tch, 2 threads, batch 8, 20 virtual tokens
#   THREADS=1 BACKENDS=tch bash tools/bench.sh --repeats 9
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash tools/setup-python.sh
python3 tools/fetch_assets.py
source tools/libtorch-env.sh
threads="${THREADS:-2}"
backends="${BACKENDS:-candle,tch}"
assets=".cache/assets"
out="runs/bench"
mkdir -p "$out"
cargo build --release -p softprompt-cli --features tch
target/release/softprompt bench --model "$assets/SmolLM2-135M-Instruct.Q4_1.gguf" \
  --data "$assets/rotten-tomatoes/train.jsonl" \
  --template $'Review: {text}\nIs this movie review positive or negative? Answer:' \
  --labels "negative= negative,positive= positive" \
  --backends "$backends" --threads "$threads" --batch-out "$out/batch.json" "$@" > "$out/ours.json"
.venv/bin/python tools/peft_bench.py "$out/batch.json" > "$out/peft.json"
python3 - "$out/ours.json" "$out/peft.json" <<'PY'
import json, sys
ours = json.load(open(sys.argv[1])); peft = json.load(open(sys.argv[2]))
print(f"batch {ours['rows']} rows x {ours['seq_len']} tokens + {ours['num_virtual_tokens']} virtual tokens, "
      f"{ours['eval_examples']} eval examples, {peft['threads']} threads, {ours['dtype']}")
print(f"{'backend':8} {'train step s':>13} {'x PEFT':>7} {'train tok/s':>12} {'eval ex/s':>10} {'x PEFT':>7}")
for r in ours["results"] + [peft]:
    step = r.get("train_step_seconds")
    s = f"{step:13.3f} {step / peft['train_step_seconds']:7.2f} {r['train_tokens_per_second']:12.0f}" if step else f"{'-':>13} {'-':>7} {'-':>12}"
    e = r["eval_examples_per_second"]
    print(f"{r['backend']:8} {s} {e:10.1f} {e / peft['eval_examples_per_second']:7.2f}")
PY
