#!/usr/bin/env bash
# Every mode from the default job's shipped base, three training seeds (docs/experiments.md, section 8): the grid
# of experiments/grids/shipped.txt at the default job's settings, two runs at a time on one thread each, then every
# final model and the base evaluated with 16 samples per held-out puzzle and the critic's tournament. From the
# repository root:
#   experiments/shipped_base.sh ROOT
# Section 8's settings are the default job's of its day: 40 steps (the default is 80 since section 11), and runs
# that log avg@8 at each evaluation (train.eval_samples 8, as then), whose tables section 8 shows on the greedy
# accuracy (--measure greedy: summarize.py's automatic choice would now take avg@8, which section 8's three default
# RARO runs, section 7's, did not log).
set -euo pipefail
here=$(dirname "$0")
root=$1
JOBS=${JOBS:-2} "$here/run_grid.sh" "$root" 7200 "$here/grids/shipped.txt" --train.steps 40
"$here/evaluate_grid.sh" "$root" base=builtin:countdown-easy -- --eval.max_new_tokens 48
python3 "$here/summarize.py" "$root" --out "$root/summary" --evals "$root/evals" --measure greedy \
  --title "every mode from builtin:countdown-easy (CPU)"
