#!/usr/bin/env bash
# The main job's prompt tuning over several seeds, in softprompt and in Hugging Face PEFT on the
# same model, data, template, steps, batch, learning rate and virtual tokens: test accuracy mean
# and spread per task (the seed changes the initialisation's sampling and the data order).
#   MODEL=gemma3-270m bash tools/seeds.sh                # both tasks, seeds 0 1 2
#   SEEDS="0 1" TASKS=sms-spam MODEL=smollm2 bash tools/seeds.sh
#   TASKS=nyt-editorials MODEL=smollm2 bash tools/seeds.sh   # 3 classes (negative/neutral/positive)
#   METHOD=prefix MODEL=smollm2 bash tools/seeds.sh       # prompt (default), prefix,
#                                                         # prefix-text, prefix-projection, p-tuning
#                          (prefix-text: the prefix starts at the init text's keys and values)
#   DTYPE=quantized PEFT=0 TASKS=rotten-tomatoes MODEL=smollm2 bash tools/seeds.sh
#                          # softprompt on the GGUF's quantized blocks (PEFT=0: PEFT not rerun;
#                          # OURS=0: softprompt not run, e.g. PEFT in a second process beside it)
# STEPS (60), LR (0.03), SCHEDULE (constant, or linear with WARMUP steps) and DEV_EVERY (0, or
# score the task's dev split every N steps and keep the best prompt) apply to both runners;
# results go to runs/seeds/MODEL[-METHOD][-STEPS][-lrLR][-linearWARMUP][-devN][-DTYPE].
#   STEPS=300 SCHEDULE=linear WARMUP=30 DEV_EVERY=25 METHOD=prefix-text MODEL=smollm2 \
#     TASKS=rotten-tomatoes THREADS=1 bash tools/seeds.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
assets="$(python3 tools/fetch_assets.py)"
bash tools/setup-python.sh
case "${MODEL:-gemma3-270m}" in
  smollm2) gguf="SmolLM2-135M-Instruct.Q4_1.gguf" ;;
  gemma3-270m) gguf="gemma-3-270m-q4_k_m.gguf" ;;
  *) echo "unknown MODEL=$MODEL (smollm2, gemma3-270m)" >&2; exit 2 ;;
esac
seeds="${SEEDS:-0 1 2}"
tasks="${TASKS:-rotten-tomatoes sms-spam}"
threads="${THREADS:-2}"
method="${METHOD:-prompt}"
steps="${STEPS:-60}"
lr="${LR:-0.03}"
dtype="${DTYPE:-f32}"
schedule="${SCHEDULE:-constant}"
warmup="${WARMUP:-0}"
dev_every="${DEV_EVERY:-0}"
case "$method" in
  prompt) ours=(--method prompt); theirs=(--method prompt) ;;
  prefix) ours=(--method prefix); theirs=(--method prefix) ;;
  # Li & Liang's initialisation: the prefix starts at the keys and values of the init text
  prefix-text) ours=(--method prefix); theirs=(--method prefix-text) ;;
  # Li & Liang's reparameterisation, 512 wide in both
  prefix-projection) ours=(--method prefix --prefix-projection 512)
    theirs=(--method prefix-projection --encoder-hidden-size 512) ;;
  p-tuning) ours=(--method p-tuning); theirs=(--method p-tuning) ;;
  *) echo "unknown METHOD=$method (prompt, prefix, prefix-text, prefix-projection, p-tuning)" >&2; exit 2 ;;
esac
out="runs/seeds/${MODEL:-gemma3-270m}"
if [ "$method" != prompt ]; then out="$out-$method"; fi
if [ "$steps" != 60 ]; then out="$out-$steps"; fi
if [ "$lr" != 0.03 ]; then out="$out-lr$lr"; fi
if [ "$schedule" != constant ]; then out="$out-$schedule$warmup"; fi
if [ "$dev_every" != 0 ]; then out="$out-dev$dev_every"; fi
if [ "$dtype" != f32 ]; then out="$out-$dtype"; fi
mkdir -p "$out"
# A copy of the binary, so that rebuilding the workspace during a long run changes nothing
# (BIN=path runs that binary instead of building one).
bin="$out/softprompt"
if [ "${OURS:-1}" != 1 ]; then
  :
else
  if [ -z "${BIN:-}" ]; then cargo build --release -q -p softprompt-cli; fi
  # copied then renamed: a second seeds.sh on the same folder may be running the old copy
  cp "${BIN:-target/release/softprompt}" "$bin.$$" && mv -f "$bin.$$" "$bin"
fi
results="$out/results.jsonl"
# Runs already in results.jsonl are kept and skipped (RESET=1 starts over).
if [ "${RESET:-0}" = 1 ]; then : > "$results"; fi
touch "$results"
done_run() { grep -q "\"runner\":\"$1\",\"task\":\"$2\",\"seed\":$3," "$results"; }
for task in $tasks; do
  case "$task" in
    rotten-tomatoes)
      template=$'Review: {text}\nIs this movie review positive or negative? Answer:'
      labels="negative= negative,positive= positive"
      init="Classify if the movie review is positive or negative" ;;
    sms-spam)
      template=$'Message: {text}\nIs this message spam or ham? Answer:'
      labels="ham= ham,spam= spam"
      init="Classify if the text message is spam or ham" ;;
    nyt-editorials)
      template=$'Sentence: {text}\nIs the sentiment of this sentence negative, neutral or positive? Answer:'
      labels="negative= negative,neutral= neutral,positive= positive"
      init="Classify the sentiment of the sentence as negative, neutral or positive" ;;
    *) echo "unknown task $task (rotten-tomatoes, sms-spam, nyt-editorials)" >&2; exit 2 ;;
  esac
  # prompt tuning and the text-initialised prefix start from the task's text; the others as PEFT
  case "$method" in
    prompt|prefix-text) init_args=(--init text --init-text "$init") ;;
    *) init_args=() ;;
  esac
  sched_ours=(--schedule "$schedule" --warmup "$warmup"); sched_theirs=(--schedule "$schedule" --warmup "$warmup")
  if [ "$dev_every" != 0 ]; then
    sched_ours+=(--dev "$assets/$task/dev.jsonl" --eval-every "$dev_every"); sched_theirs+=(--dev-every "$dev_every")
  fi
  for seed in $seeds; do
    if [ "${OURS:-1}" = 1 ] && ! done_run softprompt "$task" "$seed"; then
    line="$("$bin" train --model "$assets/$gguf" --train "$assets/$task/train.jsonl" \
      --test "$assets/$task/test.jsonl" --template "$template" --labels "$labels" \
      --num-virtual-tokens 20 "${init_args[@]}" --optimizer adamw --lr "$lr" --steps "$steps" \
      --batch-size 8 --seed "$seed" --threads "$threads" --dtype "$dtype" --output "$out/$task-$seed" --quiet "${ours[@]}" "${sched_ours[@]}" | tail -n 1)"
    echo "{\"runner\":\"softprompt\",\"task\":\"$task\",\"seed\":$seed,\"result\":$line}" | tee -a "$results"
    fi
    if [ "${PEFT:-1}" = 1 ] && ! done_run peft "$task" "$seed"; then
    line="$(.venv/bin/python tools/peft_reference.py --model "$gguf" --data "$task" --seed "$seed" \
      --threads "$threads" --steps "$steps" --lr "$lr" "${theirs[@]}" "${sched_theirs[@]}" 2>/dev/null | tail -n 1)"
    echo "{\"runner\":\"peft\",\"task\":\"$task\",\"seed\":$seed,\"result\":$line}" | tee -a "$results"
    fi
  done
done
python3 tools/seeds_table.py "$results"
