#!/usr/bin/env bash
# On a lent GPU machine (no install, no network): RARO training on CUDA (nccl, bf16 compute, Triton kernels in the
# log-prob recompute and the update) for a few steps, then a summary of what it logged. From the repository root.
set -uo pipefail
OUT=${OUT:-/tmp/raro_out}
mkdir -p "$OUT" /tmp/raro_pkgs
ln -sfn "$PWD/kernels" /tmp/raro_pkgs/raro_kernels   # the project is not installed there
export PYTHONPATH=$PWD:/tmp/raro_pkgs:${PYTHONPATH:-} PYTHONUNBUFFERED=1
run=/tmp/raro_gpu_run
rm -rf "$run"
timeout "${1:-300}" python3 -m torch.distributed.run --nproc_per_node=1 -m raro_fast.train \
  --warmup.steps 60 --train.steps 4 --train.eval_every 2 --train.save_every 2 --train.output_dir "$run" \
  --train.progress false 2>&1 | grep -v Warning | tail -25 | tee "$OUT/gpu_train.log"
cp "$run/metrics.jsonl" "$OUT/gpu_metrics.jsonl" 2>/dev/null
python3 - "$run/metrics.jsonl" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    keep = ("step", "logprob/gap_mean_abs", "logprob/gap_max_abs", "timing_s/gen", "timing_s/old_log_prob",
            "timing_s/update_actor", "timing_s/update_weights", "timing_s/step", "perf/throughput", "eval/heldout_accuracy")
    print({k: round(r[k], 5) if isinstance(r.get(k), float) else r.get(k) for k in keep if k in r})
PY
# Liger modules (all three on CUDA) and the weight-sync tests, then a short run with Liger in the trainer's model.
# Carry .whl/ (liger-kernel from ../shared/tools/gpu-wheels.sh) for these.
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/raro_site .whl/*.whl && export PYTHONPATH=/tmp/raro_site:$PYTHONPATH
fi
timeout "${2:-240}" python3 -m pytest tests/test_liger.py tests/weight_sync -q -p no:cacheprovider 2>&1 | tail -15 | tee "$OUT/gpu_tests.log"
rm -rf "$run"
timeout "${1:-300}" python3 -m torch.distributed.run --nproc_per_node=1 -m raro_fast.train --model.liger_kernels true \
  --warmup.steps 60 --train.steps 2 --train.output_dir "$run" --train.progress false 2>&1 | grep -v Warning | tail -8 \
  | tee "$OUT/gpu_train_liger.log"
