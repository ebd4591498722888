#!/usr/bin/env bash
# Run a grid of trainings side by side, one process each (the embedded model is small: a 16-core GPU machine
# runs a dozen at once). From the repository root:
#   [JOBS=N] experiments/run_grid.sh ROOT TIMEOUT_S GRID_FILE [common training flags ...]
# Each non-comment line of GRID_FILE is `NAME flags...` ({root} in flags stands for ROOT); run NAME writes
# ROOT/NAME/ (metrics.jsonl, curves, checkpoints), ROOT/NAME.log and its exit status in ROOT/NAME.rc. A run still
# going at TIMEOUT_S is stopped; what it logged so far stays. JOBS (default: all at once) bounds how many run at
# a time; each run computes on OMP_NUM_THREADS threads (default 1).
set -uo pipefail
root=$1 limit=$2 grid=$3
shift 3
mkdir -p "$root"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
max_jobs=${JOBS:-0}
names=()
while read -r name flags; do
  [[ -z "$name" || "$name" == \#* ]] && continue
  flags=${flags//\{root\}/$root}
  while (( max_jobs > 0 && $(jobs -rp | wc -l) >= max_jobs )); do wait -n; done
  # torchrun even for one process: FSDP2's mixed precision (bf16 compute on CUDA) needs a process group.
  # shellcheck disable=SC2086  # flags are words on purpose
  ( timeout "$limit" python3 -m torch.distributed.run --standalone --nproc_per_node=1 -m raro_fast.train "$@" $flags \
      --train.output_dir "$root/$name" --train.progress false >"$root/$name.log" 2>&1
    echo $? >"$root/$name.rc" ) &
  names+=("$name")
done <"$grid"
wait
status=0
for name in "${names[@]}"; do [[ "$(cat "$root/$name.rc" 2>/dev/null)" == 0 ]] || { echo "run $name failed: $root/$name.log" >&2; status=1; }; done
exit $status
