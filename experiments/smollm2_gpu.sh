#!/usr/bin/env bash
# SmolLM2-135M-Instruct on a lent GPU (docs/experiments.md, section 6): the device tool carries at most 64 MiB a
# call, tree included (18 MiB), and the model's GGUF file is 98 MB, so it travels in three parts, in three calls made
# back to back while the machine is warm (ignored files a call left in the checkout are still there for the next).
# (Two halves of 50 MB, planned before, were each over 64 MiB with the tree: the device would refuse both calls.)
#
#   here:        experiments/smollm2_gpu.sh prepare
#                  -> .device/smollm2/part-a, part-b, part-c, SHA256 and .device/smollm2/whl/gguf-*.whl (ignored)
#   device, 1st: carry [".device/smollm2/part-a", ".device/smollm2/whl"], command:
#                  bash experiments/smollm2_gpu.sh stage
#   device, 2nd: carry [".device/smollm2/part-b"], command: bash experiments/smollm2_gpu.sh stage
#   device, 3rd: carry [".device/smollm2/part-c", ".device/smollm2/SHA256"], timeout_s 590, command (at once, before
#                the machine goes back):
#                  RARO_COMMIT=<sha> bash experiments/smollm2_gpu.sh run [SECONDS for the whole call, default 540]
#
# `run` joins the parts (checked against SHA256), converts the GGUF with raro-fast's converter, gives the model the
# format warm-up, then trains RLVR and RARO side by side on the one GPU (under torchrun: bf16, as every GPU run
# here) until the call's SECONDS are spent, and writes $OUT/smollm2.tar.gz (logs, metrics, curves, the summary),
# $OUT/summary.md and $OUT/env.log: few files, since only eight come back from a call. `stage` and `run` also work
# here, on CPU, for a test (STEPS=1 WARMUP_STEPS=1 shrink them; EXTRA adds training flags).
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
  split -n 3 -a 1 "$gguf" "$dir/part-"   # part-a, part-b, part-c: about 31 MiB each, 49 MiB with the tree
  (cd "$(dirname "$gguf")" && sha256sum "$(basename "$gguf")") | cut -d' ' -f1 >"$dir/SHA256"
  # The GPU image has accelerate but not gguf (a pure-Python wheel).
  python3 -m pip download -q --no-deps --only-binary=:all: -d "$dir/whl" "gguf==$(python3 -c \
    'import importlib.metadata as m; print(m.version("gguf"))')"
  ls -l "$dir" "$dir/whl"
  ;;
stage)
  parts=$(ls "$dir"/part-[ab] 2>/dev/null || true)
  [[ -n "$parts" ]] || { echo "smollm2_gpu stage: neither $dir/part-a nor part-b is here; carry" \
    ".device/smollm2/part-a (1st call) or .device/smollm2/part-b (2nd call)" >&2; exit 2; }
  mkdir -p "$stash"
  for part in $parts; do cp "$part" "$stash/"; done
  cp "$dir"/whl/*.whl "$stash/" 2>/dev/null || true
  ls -l "$stash"
  ;;
run)
  budget=${2:-540}   # seconds this call may take in all (the device's limit a call is 600)
  deadline=$((SECONDS + budget))
  for f in part-c SHA256; do
    [[ -f "$dir/$f" ]] || { echo "smollm2_gpu run: $dir/$f is missing; carry .device/smollm2/$f" >&2; exit 2; }
  done
  joined=()
  for part in part-a part-b; do
    found=$stash/$part
    [[ -f "$found" ]] || found=$dir/$part
    [[ -f "$found" ]] || { echo "smollm2_gpu run: $part is not here (neither $stash/$part nor $dir/$part): run" \
      "'stage' with it first, and this call while that machine is still warm" >&2; exit 2; }
    joined+=("$found")
  done
  results=$stash/results
  mkdir -p "$out" "$results"
  cat "${joined[@]}" "$dir/part-c" >"$stash/SmolLM2-135M-Instruct.Q4_1.gguf"
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
    date -u +"date %Y-%m-%dT%H:%M:%SZ"
    echo "commit ${RARO_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo 'unknown: pass RARO_COMMIT=<sha>')}"
    echo "command $0 $*"
    python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')"
  } | tee "$out/env.log"
  # Whatever happens below, what there is comes back as one archive (a call returns at most eight files).
  pack() {
    tar -czf "$out/smollm2.tar.gz" -C "$stash" results
    cp "$results/summary/replication.md" "$out/summary.md" 2>/dev/null || true
  }
  trap pack EXIT
  if [[ ! -f "$stash/model/config.json" ]]; then
    start=$SECONDS
    python3 -m raro_fast.model.gguf "$stash/SmolLM2-135M-Instruct.Q4_1.gguf" "$stash/model" >"$results/convert.log" 2>&1
    echo "converted in $((SECONDS - start)) s" | tee -a "$results/convert.log"
  fi
  # torchrun: a GPU run computes in bf16 only under it (plain python stays in float32, and torch's varlen flash
  # kernel declines float32), as every GPU run on the results pages did.
  train=(python3 -m torch.distributed.run --standalone --nproc_per_node=1 -m raro_fast.train)
  # Larger batches than the CPU runs of section 6: 8 questions x 8 samples, 64 held-out puzzles with 8 samples each.
  common=(--config configs/countdown-easy.yaml --config configs/smollm2-countdown.yaml --train.progress false
          --raro.questions_per_step 8 --train.eval_size 64 --train.eval_samples 8 --train.save_every 0)
  # shellcheck disable=SC2206  # EXTRA is training flags, split into words on purpose
  common+=(${EXTRA:-})
  # The warm-up's own run evaluates as little as it can: each mode's run evaluates the same base at its step 0.
  "${train[@]}" "${common[@]}" --model.path "$stash/model" --warmup.checkpoint_steps "${WARMUP_STEPS:-100}" \
    --train.steps 0 --train.eval_size 1 --train.eval_samples 0 --train.eval_tournament false \
    --train.output_dir "$stash/base" >"$results/base.log" 2>&1
  grep -i "format" "$results/base.log" || true
  left=$((deadline - SECONDS - 45))   # the summary and the archive after the runs
  ((left > 60)) || { echo "smollm2_gpu run: only $left s left of $budget after the warm-up; no training" >&2; exit 3; }
  echo "training each mode for up to $left s"
  for mode in rlvr raro; do
    timeout "$left" "${train[@]}" "${common[@]}" --model.path "$stash/base/base_model" \
      --warmup.checkpoint_steps 0 --train.mode "$mode" --train.steps "${STEPS:-200}" --train.eval_every 5 \
      --train.output_dir "$stash/$mode-s0" >"$results/$mode-s0.log" 2>&1 &
  done
  wait || true
  for mode in rlvr raro; do
    mkdir -p "$results/$mode-s0"
    cp "$stash/$mode-s0"/{metrics.jsonl,curves.png,config.json} "$results/$mode-s0/" 2>/dev/null || true
  done
  python3 "$here/summarize.py" "$results" --out "$results/summary" --title "SmolLM2-135M-Instruct, easy Countdown (GPU)" ||
    echo "summarize failed: see the logs in smollm2.tar.gz" >&2
  ;;
*)
  echo "usage: experiments/smollm2_gpu.sh prepare | stage | run [SECONDS for the whole call]" >&2
  exit 2
  ;;
esac
