#!/usr/bin/env bash
# SmolLM2-135M-Instruct on a lent GPU (docs/experiments.md, section 6): the device tool carries at most 64 MiB a
# call and the model's GGUF file is 98 MB, so it travels in two halves, in two calls made back to back while the
# machine is warm (ignored files a call left in the checkout are still there for the next one).
#
#   here:        experiments/smollm2_gpu.sh prepare
#                  -> .device/smollm2/part-a, part-b, SHA256 and .device/smollm2/whl/gguf-*.whl (ignored by git)
#   device, 1st: carry [".device/smollm2/part-a", ".device/smollm2/whl"], command:
#                  bash experiments/smollm2_gpu.sh stage
#   device, 2nd: carry [".device/smollm2/part-b", ".device/smollm2/SHA256"], command (at once, before the machine
#                goes back):
#                  bash experiments/smollm2_gpu.sh run [SECONDS per mode, default 360]
#
# `run` joins the halves (checked against SHA256), converts the GGUF with raro-fast's converter, gives the model
# the format warm-up, then trains RLVR and RARO side by side on the one GPU until each has used SECONDS, and writes
# logs, metrics, curves and the summary table to $OUT. `stage` and `run` also work here, on CPU, for a test
# (STEPS=1 WARMUP_STEPS=1 shrink them; EXTRA adds training flags).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
dir=${SMOLLM2_PARTS:-$repo/.device/smollm2}
stash=${SMOLLM2_STASH:-/tmp/raro_smollm2}
out=${OUT:-/tmp/raro_out}
cmd=${1:-}

case "$cmd" in
prepare)
  gguf=$(python3 -c "from raro_fast.model.gguf import smollm2_gguf_path; print(smollm2_gguf_path())")
  mkdir -p "$dir/whl"
  rm -f "$dir"/part-* "$dir"/whl/*.whl
  split -b 50000000 -a 1 "$gguf" "$dir/part-"   # part-a, part-b: each well under 64 MiB with the tree
  (cd "$(dirname "$gguf")" && sha256sum "$(basename "$gguf")") | cut -d' ' -f1 >"$dir/SHA256"
  # The GPU image has accelerate but not gguf (a pure-Python wheel).
  python3 -m pip download -q --no-deps --only-binary=:all: -d "$dir/whl" "gguf==$(python3 -c \
    'import importlib.metadata as m; print(m.version("gguf"))')"
  ls -l "$dir" "$dir/whl"
  ;;
stage)
  [[ -f "$dir/part-a" ]] || { echo "smollm2_gpu stage: $dir/part-a is missing; carry .device/smollm2/part-a" >&2; exit 2; }
  mkdir -p "$stash"
  cp "$dir/part-a" "$stash/part-a"
  cp "$dir"/whl/*.whl "$stash/"
  ls -l "$stash"
  ;;
run)
  seconds=${2:-360}
  for f in part-b SHA256; do
    [[ -f "$dir/$f" ]] || { echo "smollm2_gpu run: $dir/$f is missing; carry .device/smollm2/$f" >&2; exit 2; }
  done
  first=$stash/part-a
  [[ -f "$first" ]] || first=$dir/part-a
  [[ -f "$first" ]] || { echo "smollm2_gpu run: the first half is not here (neither $stash/part-a nor $dir/part-a):" \
    "run 'stage' first, and this call while that machine is still warm" >&2; exit 2; }
  mkdir -p "$out" "$stash"
  cat "$first" "$dir/part-b" >"$stash/SmolLM2-135M-Instruct.Q4_1.gguf"
  want=$(cat "$dir/SHA256") got=$(sha256sum "$stash/SmolLM2-135M-Instruct.Q4_1.gguf" | cut -d' ' -f1)
  [[ "$want" == "$got" ]] || { echo "smollm2_gpu run: the joined GGUF's SHA-256 is $got, expected $want" >&2; exit 2; }
  if ! python3 -c "import gguf" 2>/dev/null; then
    wheel=$(ls "$stash"/gguf-*.whl "$dir"/whl/gguf-*.whl 2>/dev/null | head -1)
    [[ -n "$wheel" ]] || { echo "smollm2_gpu run: no gguf wheel here; carry .device/smollm2/whl in the first call" >&2; exit 2; }
    python3 -m pip install -q --no-index --no-deps --target "$stash/site" "$wheel"
    export PYTHONPATH=$stash/site:${PYTHONPATH:-}
  fi
  export PYTHONPATH=$repo:$repo/kernels:${PYTHONPATH:-} PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
  cd "$repo"
  {
    python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')"
    git log -1 --format='commit %H %s' 2>/dev/null || true
  } | tee "$out/env.log"
  if [[ ! -f "$stash/model/config.json" ]]; then
    start=$SECONDS
    python3 -m raro_fast.model.gguf "$stash/SmolLM2-135M-Instruct.Q4_1.gguf" "$stash/model" >"$out/convert.log" 2>&1
    echo "converted in $((SECONDS - start)) s" | tee -a "$out/convert.log"
  fi
  # Larger batches than the CPU runs of section 6: 8 questions x 8 samples, 64 held-out puzzles with 8 samples each.
  common=(--config configs/countdown-easy.yaml --config configs/smollm2-countdown.yaml --train.progress false
          --raro.questions_per_step 8 --train.eval_size 64 --train.eval_samples 8 --train.save_every 0)
  # shellcheck disable=SC2206  # EXTRA is training flags, split into words on purpose
  common+=(${EXTRA:-})
  python3 -m raro_fast.train "${common[@]}" --model.path "$stash/model" --warmup.checkpoint_steps "${WARMUP_STEPS:-100}" \
    --train.steps 0 --train.output_dir "$stash/base" >"$out/base.log" 2>&1
  grep -i "format" "$out/base.log" || true
  for mode in rlvr raro; do
    timeout "$seconds" python3 -m raro_fast.train "${common[@]}" --model.path "$stash/base/base_model" \
      --warmup.checkpoint_steps 0 --train.mode "$mode" --train.steps "${STEPS:-200}" --train.eval_every 5 \
      --train.output_dir "$stash/$mode-s0" >"$out/$mode-s0.log" 2>&1 &
  done
  wait || true
  for mode in rlvr raro; do
    mkdir -p "$out/$mode-s0"
    cp "$stash/$mode-s0"/{metrics.jsonl,curves.png,config.json} "$out/$mode-s0/" 2>/dev/null || true
  done
  python3 "$here/summarize.py" "$out" --out "$out/summary" --title "SmolLM2-135M-Instruct, easy Countdown (GPU)" ||
    echo "summarize failed: see the logs in $out" >&2
  ;;
*)
  echo "usage: experiments/smollm2_gpu.sh prepare | stage | run [SECONDS per mode]" >&2
  exit 2
  ;;
esac
