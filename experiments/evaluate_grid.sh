#!/usr/bin/env bash
# Evaluate every run of a grid with samples, as the table of docs/experiments.md section 8 does: for each
# ROOT/MODE-sSEED/final_model (and each BASE given as NAME=DIR, e.g. base=builtin:countdown-easy), n samples per
# held-out puzzle at temperature 1, and the critic's tournament pick among them (raro_fast.evaluate). From the
# repository root:
#   [N=16] experiments/evaluate_grid.sh ROOT [NAME=MODEL_DIR ...] [-- evaluate flags ...]
# writes ROOT/evals/NAME/report.json (again only where the model, N or the evaluate flags changed since); then
# `python experiments/summarize.py ROOT --evals ROOT/evals`.
set -euo pipefail
root=$1
shift
models=()
while (( $# )) && [[ "$1" != "--" ]]; do models+=("$1"); shift; done
(( $# )) && shift
shopt -s nullglob
for run in "$root"/*/final_model; do models+=("$(basename "$(dirname "$run")")=$run"); done
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$root/evals"
for spec in "${models[@]}"; do
  name=${spec%%=*} model=${spec#*=} out="$root/evals/${spec%%=*}"
  # What made the report: a second pass with another N or other flags kept the first pass's report as its own.
  made_by=$(printf '%q ' "$model" "${N:-16}" "$@")
  # done already, unless the model changed since (a grid extended in place: its old report would be kept) or
  # the report was made another way (or by a version of this script that did not record how)
  [[ -f "$out/report.json" && "$(cat "$out/made_by" 2>/dev/null)" == "$made_by" &&
     -z "$(find "$model" -type f -newer "$out/report.json" 2>/dev/null)" ]] && continue
  rm -f "$out/made_by"
  python3 -m raro_fast.evaluate --model "$model" --n "${N:-16}" --rerank tournament --output-dir "$out" "$@" \
    >"$root/evals/$name.log" 2>&1 || { echo "evaluation of $name failed: $root/evals/$name.log" >&2; exit 1; }
  echo "$made_by" >"$out/made_by"
done
