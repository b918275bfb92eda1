#!/usr/bin/env bash
# `make demo` (after the build): trains the tokenizer and the default model into
# runs/default/ (cached: a finished run with the same config, corpus and tokenizer
# fingerprint is reused, an interrupted one resumed), then prints validation perplexity
# beside the unigram baseline, then runs the rank-selection experiment
# (experiments/quickstart.yaml) into runs/quickstart and prints its results table.
#   bash scripts/demo.sh BUILD_DIR
set -euo pipefail
cd "$(dirname "$0")/.."
build=${1:-build}
bin=$build/experiments/attnpilot
run=${ATTNPILOT_DEMO_RUN:-runs/default}
config=experiments/configs/default-model.yaml
device=${ATTNPILOT_DEMO_DEVICE:-auto}

if [ ! -x "$bin" ]; then
  echo "demo: $bin not found; build first (make demo does)" >&2
  exit 1
fi
if [ ! -d /usr/share/games/fortunes ]; then
  echo "demo: the fortunes corpus is missing; run scripts/install-deps.sh" >&2
  exit 1
fi

echo "== attnpilot demo: tokenizer and default model in $run (config $config)"
start=$(date +%s)
# --resume reuses a finished run or continues an interrupted one; --force replaces a run
# made with another config, corpus or tokenizer.
"$bin" pretrain --config "$config" --out "$run" --resume --force --device "$device"
echo "== pretraining step took $(( $(date +%s) - start )) s"

echo "== validation perplexity (held-out fortunes) beside an add-one unigram model"
"$bin" eval-lm --model "$run/model" --device "$device"

echo "== rank selection (experiments/quickstart.yaml): calibrate, train a PPO policy on the"
echo "   train split, evaluate it and every baseline on held-out windows, write the report"
start=$(date +%s)
"$bin" run experiments/quickstart.yaml --out "${ATTNPILOT_DEMO_RANK_RUN:-runs/quickstart}"
echo "== rank experiment took $(( $(date +%s) - start )) s"
