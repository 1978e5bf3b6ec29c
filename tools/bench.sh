#!/usr/bin/env bash
# Every backend beside PyTorch + PEFT, in one run, on the same batch of the real task (SmolLM2-135M,
# Rotten Tomatoes), with the same thread count: train step, train FLOP/s against an f32 matmul
# measured in the same process, rank-classification throughput, greedy generation with a KV cache,
# and peak resident memory (one process per backend, so that each peak is its own), and llama.cpp
# (npm's node-llama-cpp) on the same GGUF and token ids as the CPU speed anchor. Prints medians,
# ratios (ours / PEFT, ours / llama.cpp) and the first steps' losses of every runner from the same
# starting prompt; the raw JSON stays in runs/bench/.
#   bash tools/bench.sh                 # candle, tch and ort, 2 threads, batch 8, 20 virtual tokens
#   THREADS=1 BACKENDS=tch bash tools/bench.sh --repeats 9
#   MODEL=gemma3-270m bash tools/bench.sh       # Gemma 3 270M (Q4_K_M) instead of SmolLM2-135M
# candle also runs with --dtype quantized (the GGUF's blocks kept in memory) as `candle-q`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash tools/setup-python.sh
python3 tools/fetch_assets.py
source tools/libtorch-env.sh
source tools/ort-env.sh
export SOFTPROMPT_CACHE_DIR="${SOFTPROMPT_CACHE_DIR:-$PWD/.cache}"
threads="${THREADS:-2}"
backends="${BACKENDS:-candle,tch,ort}"
assets=".cache/assets"
out="runs/bench"
case "${MODEL:-smollm2}" in
  smollm2) gguf="SmolLM2-135M-Instruct.Q4_1.gguf" ;;
  gemma3-270m) gguf="gemma-3-270m-q4_k_m.gguf"; out="runs/bench-gemma3" ;;
  *) echo "unknown MODEL=$MODEL (smollm2, gemma3-270m)" >&2; exit 2 ;;
esac
mkdir -p "$out"
rm -f "$out"/ours-*.json
# the backends' runs are labelled by name; candle on quantized weights as candle-q
cargo build --release -p softprompt-cli --features tch,ort
for b in ${backends//,/ }; do
  target/release/softprompt bench --model "$assets/$gguf" \
    --data "$assets/rotten-tomatoes/train.jsonl" \
    --template $'Review: {text}\nIs this movie review positive or negative? Answer:' \
    --labels "negative= negative,positive= positive" \
    --backends "$b" --threads "$threads" --batch-out "$out/batch.json" "$@" > "$out/ours-$b.json"
done
# candle again with the GGUF's quantized blocks kept in memory (QUANTIZED=0 skips it)
if [ "${QUANTIZED:-1}" = 1 ] && [[ ",$backends," == *",candle,"* ]]; then
  target/release/softprompt bench --model "$assets/$gguf" \
    --data "$assets/rotten-tomatoes/train.jsonl" \
    --template $'Review: {text}\nIs this movie review positive or negative? Answer:' \
    --labels "negative= negative,positive= positive" \
    --backends candle --dtype quantized --threads "$threads" "$@" > "$out/ours-candle-q.json"
  backends="$backends,candle-q"
fi
.venv/bin/python tools/peft_bench.py "$out/batch.json" > "$out/peft.json"
# llama.cpp through npm's node-llama-cpp (pinned; its prebuilt CPU library, nothing compiled): the
# CPU speed anchor on the same GGUF, threads and token ids (ANCHOR=0 skips it)
rm -f "$out/llama.json"
if [ "${ANCHOR:-1}" = 1 ]; then
  anchor=".cache/llama-anchor"
  if [ ! -d "$anchor/node_modules/node-llama-cpp" ]; then
    echo "installing node-llama-cpp@3.21.1 and its prebuilt linux-x64 library (npm) into $anchor" >&2
    mkdir -p "$anchor"
    echo '{"name": "softprompt-llama-anchor", "private": true, "type": "module"}' > "$anchor/package.json"
    (cd "$anchor" && npm install --no-audit --no-fund --ignore-scripts --omit=optional \
      node-llama-cpp@3.21.1 @node-llama-cpp/linux-x64@3.21.1 >&2)
  fi
  cp tools/llama_anchor.mjs "$anchor/"
  node "$anchor/llama_anchor.mjs" "$PWD/$assets/$gguf" "$PWD/$out/batch.json" > "$out/llama.json"
fi
python3 - "$out" "$backends" <<'PY'
import json, sys
out, backends = sys.argv[1], sys.argv[2].split(",")
runs = [json.load(open(f"{out}/ours-{b}.json")) for b in backends]
for name, run in zip(backends, runs):
    run["results"][0]["backend"] = name
peft = json.load(open(f"{out}/peft.json"))
first = runs[0]
flops = next((r["results"][0]["train_step_flops"] for r in runs if "train_step_flops" in r["results"][0]), None)
if flops:
    # the same useful work (head at target positions only) over PEFT's time
    peft["train_flops_per_second"] = flops / peft["train_step_seconds"]
    peft["train_fraction_of_matmul"] = peft["train_flops_per_second"] / peft["matmul_flops_per_second"]
print(f"batch {first['rows']} rows x {first['seq_len']} tokens + {first['num_virtual_tokens']} virtual tokens, "
      f"{first['eval_examples']} eval examples, {peft['threads']} threads, {first['dtype']}"
      + (f"; train step = {flops / 1e9:.1f} GFLOP" if flops else ""))
# (title, key, scale, format, ratio to PEFT?)
cols = [("train step s", "train_step_seconds", 1, "{:.3f}", True),
        ("forward s", "forward_seconds", 1, "{:.3f}", False),
        ("train GFLOP/s", "train_flops_per_second", 1e-9, "{:.1f}", False),
        ("matmul GFLOP/s", "matmul_flops_per_second", 1e-9, "{:.1f}", False),
        ("% of matmul", "train_fraction_of_matmul", 100, "{:.0f}", False),
        ("eval ex/s", "eval_examples_per_second", 1, "{:.1f}", True),
        ("gen tok/s", "generate_tokens_per_second", 1, "{:.1f}", True),
        ("peak MiB", "peak_rss_mib", 1, "{:.0f}", True)]
print(f"{'backend':9}" + "".join(f" {t:>14}" + (f" {'x PEFT':>7}" if r else "") for t, _, _, _, r in cols))
for r in [x["results"][0] for x in runs] + [peft]:
    line = f"{r['backend']:9}"
    for _, key, scale, fmt, ratio in cols:
        v, p = r.get(key), peft.get(key)
        line += f" {fmt.format(v * scale) if v is not None else '-':>14}"
        if ratio:
            line += f" {v / p if v is not None and p else float('nan'):7.2f}"
    print(line)
try:
    llama = json.load(open(f"{out}/llama.json"))
except FileNotFoundError:
    llama = None
if llama:
    print(f"llama.cpp ({llama['runtime']}, {llama['threads']} threads): "
          f"prompt processing {llama['prompt_tokens_per_second']:.1f} tok/s "
          f"({llama['eval_examples_per_second']:.1f} eval rows/s, one sequence at a time), "
          f"decode {llama['generate_tokens_per_second']:.1f} tok/s, peak {llama['peak_rss_mib']:.0f} MiB")
    for r in [x["results"][0] for x in runs]:
        ev, gen = r.get("eval_examples_per_second"), r.get("generate_tokens_per_second")
        print(f"  {r['backend']:8} x llama.cpp: eval rows/s {ev / llama['eval_examples_per_second']:.2f}, "
              f"decode tok/s " + (f"{gen / llama['generate_tokens_per_second']:.2f}" if gen else "-"))
# the same starting prompt and steps: the losses must agree (a check of every timed run)
steps = len(peft.get("train_losses_all") or [])
if steps:
    print(f"losses of the first {min(steps, 3)} steps (same starting prompt, AdamW 0.03, clip 1.0):")
    for r in [x["results"][0] for x in runs] + [peft]:
        ls = r.get("train_losses_all")
        if ls:
            rel = max(abs(a - b) / abs(b) for a, b in zip(ls, peft["train_losses_all"]))
            print(f"  {r['backend']:8} " + " ".join(f"{l:.5f}" for l in ls[:3])
                  + f"   max relative difference to PEFT over {len(ls)} steps: {rel:.1e}")
PY
