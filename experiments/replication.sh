#!/usr/bin/env bash
# "Does RARO learn?" on a lent GPU machine (docs/experiments.md): the CPU grid (experiments/grids/cpu.txt: SFT,
# RLVR, RARO, RARO with the oracle critic, three seeds) with a larger embedded model (about 13M parameters) and
# more steps. First one warm-up per seed (ROOT/bases/base-sN/base_model), then the twelve runs side by side, each
# starting from its seed's base. From the repository root:
#   experiments/replication.sh ROOT [TIMEOUT_S per stage]
# then `python experiments/summarize.py ROOT` for the table and curves, and experiments/support.sh for pass@k.
# Every evaluation also samples 8 answers per held-out puzzle (train.eval_samples' default), and the summary's
# tables and targets are on that avg@8, the page's measure since section 8 (section 1's CPU grid was greedy;
# `summarize.py --measure greedy` gives its measure, with or without the samples).
# A run stopped by the timeout keeps its metrics and its checkpoints (every 20 steps); the summary compares
# modes at the last step that every run reached. Not run yet at this model size (no GPU was lent since it was
# written); the earlier 0.8M-parameter grid of 2026-11-22 ran the code before the fixes of issue 15.
set -euo pipefail
here=$(dirname "$0")
model=(--model.embedded.hidden_size 384 --model.embedded.num_layers 8 --model.embedded.num_heads 6
       --model.embedded.num_kv_heads 2 --model.embedded.intermediate_size 1152)
"$here/run_grid.sh" "$1/bases" "${2:-1800}" "$here/grids/bases.txt" "${model[@]}" \
  --config configs/countdown-easy.yaml --model.path '' --warmup.steps 6000 --warmup.max_target 30 --train.steps 0 \
  --train.eval_size 64
"$here/run_grid.sh" "$1" "${2:-1800}" "$here/grids/cpu.txt" \
  --config configs/countdown-easy.yaml --train.steps 200 --train.eval_every 20 --train.eval_size 64 \
  --train.save_every 20 --rollout.max_new_tokens 48 --optim.lr 1e-4
