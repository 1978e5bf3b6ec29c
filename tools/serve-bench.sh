#!/usr/bin/env bash
# Load test of `softprompt serve` on the real model (SmolLM2-135M Q4_1 GGUF, candle, 2 threads),
# loopback only: 16 prompts in one store, concurrent clients, each request for a random prompt.
# Mixed-task batching against one-prompt-per-batch, for classification and for completions.
#   bash tools/serve-bench.sh                      # defaults below
#   CLIENTS=32 REQUESTS=256 SECONDS_MAX=150 bash tools/serve-bench.sh
#   KINDS=complete MAX_TOKENS=64 GEN_REQUESTS=64 bash tools/serve-bench.sh   # longer generations
#   BACKEND=ort KINDS=complete bash tools/serve-bench.sh                     # on ONNX Runtime
#   SOFTPROMPT_BIN=/path/to/softprompt bash tools/serve-bench.sh             # another build's server
#   DTYPE=quantized bash tools/serve-bench.sh      # candle on the GGUF's quantized blocks
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
assets="$(python3 tools/fetch_assets.py)"
model="$assets/SmolLM2-135M-Instruct.Q4_1.gguf"
data="$assets/rotten-tomatoes/test.jsonl"
clients="${CLIENTS:-32}"
requests="${REQUESTS:-256}"
seconds="${SECONDS_MAX:-150}"
gen_requests="${GEN_REQUESTS:-128}"
max_tokens="${MAX_TOKENS:-16}"
port="${PORT:-18080}"
threads="${THREADS:-2}"
kinds="${KINDS:-classify complete}"
backend="${BACKEND:-candle}"
dtype="${DTYPE:-f32}"
features=()
if [ "$backend" != candle ]; then
  features=(--features "$backend")
  [ "$backend" = ort ] && source tools/ort-env.sh
  [ "$backend" = tch ] && source tools/libtorch-env.sh
  export SOFTPROMPT_CACHE_DIR="${SOFTPROMPT_CACHE_DIR:-$PWD/.cache}"
fi

bin="${SOFTPROMPT_BIN:-}"
if [ -z "$bin" ]; then
  cargo build --release -q -p softprompt-cli "${features[@]}"
  bin=./target/release/softprompt
fi
cargo build --release -q -p softprompt-serve --example loadtest
work="$(mktemp -d)"
# `kill 0` would signal the whole process group (the caller's shell too): only a live server
trap 'if [ -n "${server:-}" ]; then kill "$server" 2>/dev/null || true; fi; rm -rf "$work"' EXIT
from=()
[ -d runs/rotten-tomatoes ] && from=(--from runs/rotten-tomatoes)
./target/release/examples/loadtest prepare --model "$model" --store "$work/store" --count 16 "${from[@]}"

results="$work/results.jsonl"
for mode in mixed per-prompt; do
  "$bin" serve --model "$model" --backend "$backend" --dtype "$dtype" --store "$work/store" --threads "$threads" \
    --addr "127.0.0.1:$port" --batching "$mode" --queue-capacity 512 2>"$work/serve-$mode.log" &
  server=$!
  for _ in $(seq 1 120); do
    curl -fs "http://127.0.0.1:$port/health" >/dev/null 2>&1 && break
    sleep 0.5
  done
  for kind in $kinds; do
    n=$requests
    [ "$kind" = complete ] && n=$gen_requests
    line="$(./target/release/examples/loadtest run --url "http://127.0.0.1:$port" --data "$data" \
      --kind "$kind" --clients "$clients" --requests "$n" --seconds "$seconds" --max-tokens "$max_tokens")"
    echo "{\"mode\":\"$mode\",\"result\":$line}" | tee -a "$results"
  done
  curl -fs "http://127.0.0.1:$port/metrics" | grep -E '^softprompt_(classify|decode)_batch_(rows|prompts)_(sum|count) ' \
    | sed "s/^/[$mode] /" || true
  kill -TERM "$server"
  wait "$server" || true
  server=
done

python3 - "$results" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
by = {(r["mode"], r["result"]["kind"]): r["result"] for r in rows}
print()
print("| workload | batching | ok / sent | failed | throughput | p50 s | p90 s | p99 s |")
print("|---|---|---|---|---|---|---|---|")
kinds = [k for k in ("classify", "complete") if ("mixed", k) in by and ("per-prompt", k) in by]
for kind in kinds:
    for mode in ("mixed", "per-prompt"):
        r = by[(mode, kind)]
        tp = f'{r["requests_per_s"]:.2f} req/s' if kind == "classify" else f'{r["tokens_per_s"]:.1f} tok/s ({r["requests_per_s"]:.2f} req/s)'
        print(f'| {kind} | {mode} | {r["ok"]} / {r["requests"]} | {r["failed"]} | {tp} | {r["latency_p50_s"]:.2f} | {r["latency_p90_s"]:.2f} | {r["latency_p99_s"]:.2f} |')
for kind, key in (("classify", "requests_per_s"), ("complete", "tokens_per_s")):
    if kind not in kinds:
        continue
    m, p = by[("mixed", kind)][key], by[("per-prompt", kind)][key]
    print(f"{kind}: mixed / per-prompt throughput = {m / p:.2f}x")
EOF
