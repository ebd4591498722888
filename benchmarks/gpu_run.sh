#!/usr/bin/env bash
# One call on a lent GPU machine: CUDA kernel tests, then `pytest benchmarks/`, logs under $OUT.
# From the repository root:  RARO_COMMIT=<sha> bash benchmarks/gpu_run.sh [test-timeout-s] [bench-timeout-s]
# (RARO_COMMIT: the commit the numbers are of; the device's checkout may carry no .git.) Each benchmark table lands
# in $OUT/bench.json as soon as it is made, so a run cut by its limit keeps what it measured.
# Carry .whl/ (liger-kernel, cut-cross-entropy wheels from ../shared/tools/gpu-wheels.sh) to compare with them.
set -uo pipefail
OUT=${OUT:-/tmp/raro_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TRITON_PRINT_AUTOTUNING=1
root=$PWD
# The project is not installed there: the kernels package is importable from kernels/.
export PYTHONPATH=$root/kernels:${PYTHONPATH:-}
# One wheel per package, the newest: two versions of one (gpu-wheels.sh never empties .whl/) made pip refuse them
# all, and the Liger and CCE rows vanished from the table without a word.
wheels=()
for package in liger_kernel cut_cross_entropy; do
  newest=$(ls .whl/"$package"-*.whl 2>/dev/null | sort -V | tail -1)
  [[ -n "$newest" ]] && wheels+=("$newest")
done
if ((${#wheels[@]})); then
  # --upgrade: without it a version already in /tmp/raro_site (a warm machine) stays, silently (found by review)
  if python3 -m pip install -q --upgrade --no-index --no-deps --target /tmp/raro_site "${wheels[@]}"; then
    export PYTHONPATH=/tmp/raro_site:$PYTHONPATH
  else
    echo "gpu_run: the wheels ${wheels[*]} did not install: the Liger and CCE rows will be missing" | tee "$OUT/wheels.log"
  fi
fi
{
  date -u +"date %Y-%m-%dT%H:%M:%SZ"
  echo "commit ${RARO_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo 'unknown: pass RARO_COMMIT=<sha> in the command')}"
  echo "command $0 $*"
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,power.draw --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
  python3 -c "from raro_kernels._triton_lm_head import _mm_out_dtype_works as f; print('cuBLAS fp32-output GEMM (mm/addmm out_dtype):', f())"
} 2>&1 | tee "$OUT/env.log"
timeout "${1:-200}" python3 -m pytest kernels/tests -q -x -p no:cacheprovider 2>&1 | tee "$OUT/tests.log"
# The whole-step benchmark gets a call of its own (benchmarks/README.md, "A lent GPU").
RARO_BENCH_JSON="$OUT/bench.json" timeout "${2:-330}" python3 -m pytest benchmarks/ -q -s -p no:cacheprovider \
  --ignore=benchmarks/bench_raro_step.py 2>&1 | tee "$OUT/bench.log"
