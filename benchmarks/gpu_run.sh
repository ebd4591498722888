#!/usr/bin/env bash
# One call on a lent GPU machine: CUDA kernel tests, then `pytest benchmarks/`, logs under $OUT.
# From the repository root:  bash benchmarks/gpu_run.sh [test-timeout-s] [bench-timeout-s]
# Carry .whl/ (liger-kernel, cut-cross-entropy wheels from ../shared/tools/gpu-wheels.sh) to compare with them.
set -uo pipefail
OUT=${OUT:-/tmp/raro_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TRITON_PRINT_AUTOTUNING=1
root=$PWD
# The project is not installed there: the kernels package is importable from kernels/.
export PYTHONPATH=$root/kernels:${PYTHONPATH:-}
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/raro_site .whl/*.whl && export PYTHONPATH=/tmp/raro_site:$PYTHONPATH
fi
{
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,power.draw --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
  python3 -c "from raro_kernels._triton_lm_head import _mm_out_dtype_works as f; print('cuBLAS fp32-output GEMM (mm/addmm out_dtype):', f())"
  git log -1 --format='commit %H %s' 2>/dev/null || true
} 2>&1 | tee "$OUT/env.log"
timeout "${1:-200}" python3 -m pytest kernels/tests -q -x -p no:cacheprovider 2>&1 | tee "$OUT/tests.log"
# The whole-step benchmark gets a call of its own (benchmarks/README.md, "A lent GPU").
RARO_BENCH_JSON="$OUT/bench.json" timeout "${2:-330}" python3 -m pytest benchmarks/ -q -s -p no:cacheprovider \
  --ignore=benchmarks/bench_raro_step.py 2>&1 | tee "$OUT/bench.log"
