#!/usr/bin/env bash
# The support experiment of docs/experiments.md (issue 6): pass@k up to K, support categories and entropies of the
# base, SFT, RARO and RLVR models of one training seed of experiments/replication.sh, at one training step. From
# the repo root:
#   [SEED=N] [BASE=DIR] experiments/support.sh ROOT STEP [K] [OUT] [analyze flags ...]   (STEP: a saved step such
#   as 60, or `final`; SEED: the training seed, default 0; BASE: the base model, default
#   ROOT/bases/base-sSEED/base_model, e.g. builtin:countdown-easy; MODES: the trained runs ROOT/MODE-sSEED to compare
#   with the base, default "sft raro rlvr", e.g. "sft raro rlvr raro_oracle")
# Two processes sample half the models each (the GPU has room); their caches are merged and the report is made
# from the cache. With fewer than four models one process samples them all: raro_fast.analyze takes at least two
# models, and a half of two or three would hold one. Samples stay cached under OUT/samples, so a larger K later
# only draws what is missing.
set -euo pipefail
root=$1 step=$2 k=${3:-1024} out=${4:-$1/support}
# K is a number: with K and OUT left out, analyze flags were read as them (found by review)
[[ $k =~ ^[0-9]+$ && $out != --* ]] || { echo "usage: experiments/support.sh ROOT STEP [K] [OUT] [analyze flags ...]: K must be a number and OUT a folder, got '$k' '$out'" >&2; exit 2; }
shift $(( $# < 4 ? $# : 4 ))
seed=${SEED:-0}
base=${BASE:-$root/bases/base-s$seed/base_model}
model() {
  if [ "$step" = final ]; then echo "$root/$1-s$seed/final_model"; else printf '%s/checkpoints/step_%06d/model' "$root/$1-s$seed" "$step"; fi
}
extra=("$@")
analyze() {  # OUTPUT_DIR MODELS
  python3 -m raro_fast.analyze --config configs/countdown-easy.yaml --analysis.models "$2" --analysis.k "$k" \
    --analysis.chunk "$k" --analysis.batch_size "$k" --analysis.num_problems 64 --analysis.output_dir "$1" "${extra[@]}"
}
read -r -a modes <<<"${MODES:-sft raro rlvr}"
models=("base=$base")
for mode in "${modes[@]}"; do models+=("$mode=$(model "$mode")"); done
half=$(( (${#models[@]} + 1) / 2 ))
join() { local IFS=,; echo "$*"; }
if (( ${#models[@]} - half >= 2 )); then
  analyze "$out.a" "$(join "${models[@]:0:half}")" >"$out.a.log" 2>&1 &
  a=$!
  analyze "$out.b" "$(join "${models[@]:half}")" >"$out.b.log" 2>&1 &
  b=$!
  # `wait $a && wait $b` is a list, which set -e does not stop on: a failed first half went on to the report.
  # Both are waited for, so that a failure leaves no sampler running behind it.
  failed=()
  wait $a || failed+=("$out.a.log")
  wait $b || failed+=("$out.b.log")
  if (( ${#failed[@]} )); then echo "sampling failed: ${failed[*]}" >&2; exit 1; fi
  mkdir -p "$out/samples"
  cp -r "$out.a/samples/." "$out.b/samples/." "$out/samples/"
fi
analyze "$out" "$(join "${models[@]}")"
