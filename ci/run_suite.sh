#!/usr/bin/env bash
# run_suite.sh OUT_JSON [pytest options...]
# The benchmark suite (tests_bench/) under torchrun, one process per GPU (NPROC overrides; 2 on
# a machine without GPUs), writing pytest-benchmark JSON (with every round) to OUT_JSON.
# The CI workflow and a baseline refresh both run this script, so a baseline and the runs gated
# against it are measured the same way.
set -euo pipefail
out=$1
shift
cd "$(dirname "$0")/.."
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  gpus=$(nvidia-smi -L | wc -l)
else
  gpus=2
fi
mkdir -p "$(dirname "$out")"
OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} python3 -m torch.distributed.run --standalone \
  --nproc_per_node="${NPROC:-$gpus}" -m pytest tests_bench -q -p no:cacheprovider \
  --benchmark-json="$out" "$@"
