#!/usr/bin/env bash
# The main job: prompt-tune the frozen SmolLM2-135M-Instruct (Q4_1 GGUF) on Rotten Tomatoes
# reviews with the default (candle) backend, report zero-shot and tuned accuracy on 500 held-out
# test reviews, and save the prompt in PEFT's layout under runs/.
#   bash tools/main-job.sh                  # Rotten Tomatoes
#   TASK=sms-spam bash tools/main-job.sh    # SMS spam
#   bash tools/main-job.sh --steps 150      # extra flags go to `softprompt train`
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
task="${TASK:-rotten-tomatoes}"
assets="$(python3 tools/fetch_assets.py)"
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
  --model "$assets/SmolLM2-135M-Instruct.Q4_1.gguf" \
  --train "$assets/$task/train.jsonl" \
  --test "$assets/$task/test.jsonl" \
  --template "$template" --labels "$labels" \
  --num-virtual-tokens 20 --init text --init-text "$init" \
  --optimizer adamw --lr 0.03 --steps 60 --batch-size 8 \
  --output "runs/$task" --checkpoint-every 10 "$@"
