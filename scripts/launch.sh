#!/usr/bin/env bash
# launch.sh IMPL [benchmark options...]: torchrun benchmark.py on DP_SIZE x TP_SIZE processes.
# DP_SIZE defaults to 1; TP_SIZE to the GPUs on this host divided by DP_SIZE (2 without GPUs).
set -euo pipefail
impl=$1
shift
here=$(cd "$(dirname "$0")" && pwd)
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  devices=$(nvidia-smi -L | wc -l)
else
  devices=2
fi
DP_SIZE=${DP_SIZE:-1}
TP_SIZE=${TP_SIZE:-$((devices / DP_SIZE))}
exec torchrun --standalone --nproc_per_node=$((DP_SIZE * TP_SIZE)) "$here/../benchmark.py" \
  --impl "$impl" --dp_size "$DP_SIZE" --tp_size "$TP_SIZE" "$@"
