#!/usr/bin/env bash
# "Does RARO learn?" (docs/experiments.md, part 1) on a 2-core CPU: SFT, RLVR, RARO and RARO with the oracle critic
# on the easy Countdown, three seeds. First one warm-up per seed (ROOT/bases/base-sN/base_model; the three run
# together), then the twelve runs, each starting from its seed's base, two at a time on one thread each. From the
# repository root:
#   experiments/cpu.sh ROOT
# then the table and curves are in ROOT/summary/ (`python experiments/summarize.py ROOT` makes them again).
# Wall time on 2 cores (2026-11-28): see docs/experiments.md.
set -euo pipefail
here=$(dirname "$0")
root=$1
export JOBS=${JOBS:-2} OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# Greedy evaluation only (--train.eval_samples 0), as on 2026-11-28: train.eval_samples now defaults to 8, with
# which the runs would log avg@8, summarize.py would table avg@8 instead of section 1's greedy accuracy, and every
# evaluation would sample eight answers a puzzle more than the page's wall time counts.
noeval=(--train.eval_samples 0)
JOBS=3 "$here/run_grid.sh" "$root/bases" 7200 "$here/grids/bases.txt" \
  --config configs/countdown-easy.yaml --model.path '' --warmup.steps 3000 --warmup.max_target 30 --train.steps 0 \
  --train.eval_size 64 "${noeval[@]}"
"$here/run_grid.sh" "$root" 7200 "$here/grids/cpu.txt" \
  --config configs/countdown-easy.yaml --train.steps 40 --train.eval_every 10 --train.eval_size 64 \
  --train.save_every 20 --rollout.max_new_tokens 48 --optim.lr 2e-4 "${noeval[@]}"
python3 "$here/summarize.py" "$root" --out "$root/summary" --title "Countdown, 3 numbers 1-13, target 10 (CPU)"
