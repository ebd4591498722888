#!/usr/bin/env bash
# The mini-replication of docs/experiments.md: SFT, RARO, RLVR and RL-Logit on the easy Countdown, three seeds.
# First one warm-up per seed (ROOT/bases/base-sN/base_model), then the twelve runs side by side, each starting
# from its seed's base (one GPU machine with 16 cores: about 7 minutes in all). From the repository root:
#   experiments/replication.sh ROOT [TIMEOUT_S per stage]
# then `python experiments/summarize.py ROOT` for the table and curves, and experiments/support.sh for pass@k.
# A run stopped by the timeout keeps its metrics and its checkpoints (every 20 steps); the summary compares
# modes at the last step that every run reached.
set -euo pipefail
here=$(dirname "$0")
"$here/run_grid.sh" "$1/bases" "${2:-480}" "$here/grids/bases.txt" \
  --config configs/countdown-easy.yaml --warmup.steps 2400 --warmup.max_target 30 --train.steps 0 \
  --train.eval_size 64
"$here/run_grid.sh" "$1" "${2:-480}" "$here/grids/replication.txt" \
  --config configs/countdown-easy.yaml --train.steps 80 --train.eval_every 10 --train.eval_size 64 \
  --train.save_every 20 --rollout.max_new_tokens 48 --optim.lr 5e-5
