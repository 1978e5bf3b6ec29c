#!/usr/bin/env bash
# Two builds of the softprompt CLI side by side on the real task (the same arguments as
# tools/bench.sh), alternating A, B, A, B so that drift in the machine's speed hits both alike:
# per backend, the median over rounds of each run's medians, and B / A.
#   A=/path/to/softprompt-before B=target/release/softprompt bash tools/ab-bench.sh
#   ROUNDS=3 BACKENDS=candle A=... B=... bash tools/ab-bench.sh --repeats 9
# Build A from another commit with a worktree, e.g.
#   git worktree add /tmp/before <commit> && (cd /tmp/before && cargo build --release -p softprompt-cli --features tch,ort)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
: "${A:?set A to the first softprompt binary}"
: "${B:?set B to the second softprompt binary}"
python3 tools/fetch_assets.py >/dev/null
source tools/libtorch-env.sh
source tools/ort-env.sh
export SOFTPROMPT_CACHE_DIR="${SOFTPROMPT_CACHE_DIR:-$PWD/.cache}"
threads="${THREADS:-2}"
backends="${BACKENDS:-candle,tch,ort}"
rounds="${ROUNDS:-2}"
assets=".cache/assets"
out="runs/ab-bench"
mkdir -p "$out"
rm -f "$out"/*.json
echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | xargs); features: $(grep -m1 '^flags' /proc/cpuinfo | grep -o -w 'avx2\|fma\|avx512f\|avx512_bf16' | sort -u | xargs)"
# exports and caches first (the ONNX export of each build), so that no timed run pays for them
for b in ${backends//,/ }; do
  [ "$b" = ort ] || continue
  for side in A B; do
    "${!side}" bench --model "$assets/SmolLM2-135M-Instruct.Q4_1.gguf" --data "$assets/rotten-tomatoes/train.jsonl" \
      --backends "$b" --threads "$threads" --repeats 1 --warmup 0 --eval-examples 16 --gen-tokens 1 >/dev/null
  done
done
for b in ${backends//,/ }; do
  for r in $(seq 1 "$rounds"); do
    for side in A B; do
      bin="${!side}"
      "$bin" bench --model "$assets/SmolLM2-135M-Instruct.Q4_1.gguf" \
        --data "$assets/rotten-tomatoes/train.jsonl" \
        --template $'Review: {text}\nIs this movie review positive or negative? Answer:' \
        --labels "negative= negative,positive= positive" \
        --backends "$b" --threads "$threads" "$@" > "$out/$b-$side-$r.json"
    done
  done
done
python3 - "$out" "$backends" "$rounds" <<'PY'
import json, statistics, sys
out, backends, rounds = sys.argv[1], sys.argv[2].split(","), int(sys.argv[3])
cols = [("train step s", "train_step_seconds"), ("forward s", "forward_seconds"),
        ("eval ex/s", "eval_examples_per_second"), ("gen tok/s", "generate_tokens_per_second"),
        ("peak MiB", "peak_rss_mib")]
print(f"{'backend':8} {'metric':14} {'A':>10} {'B':>10} {'B / A':>7}   (median of {rounds} rounds each)")
for b in backends:
    runs = {s: [json.load(open(f"{out}/{b}-{s}-{r}.json"))["results"][0] for r in range(1, rounds + 1)] for s in "AB"}
    for title, key in cols:
        vals = {s: [x[key] for x in runs[s] if x.get(key) is not None] for s in "AB"}
        if not vals["A"] or not vals["B"]:
            continue
        a, bb = statistics.median(vals["A"]), statistics.median(vals["B"])
        print(f"{b:8} {title:14} {a:10.3f} {bb:10.3f} {bb / a:7.3f}")
PY
