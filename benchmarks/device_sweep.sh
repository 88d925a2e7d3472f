#!/usr/bin/env bash
# device_sweep.sh OUT [sweep options...]: the sweep of docs/PERFORMANCE.md on one GPU: the stacks
# in IMPLS (default autotp,fsdp_dtensor) on Qwen3-1.7B at seq 2048, within BUDGET minutes
# (default 8.5), everything packed into OUT (sweep.tgz, and sweep.json/md/png beside it).
# RESUME=DIR starts from an earlier sweep's directory: its configurations are not run again.
set -uo pipefail
out=$1
shift
[ -n "${RESUME:-}" ] && mkdir -p "$out" && cp -r "$RESUME" "$out/sweep" && rm -rf "$out/sweep/confirm"
python3 -m tp_bench sweep --impls "${IMPLS:-autotp,fsdp_dtensor}" --model_name Qwen/Qwen3-1.7B \
  --seq_length 2048 --num_training_steps 12 --warmup_steps 4 --log_interval 4 \
  --budget_minutes "${BUDGET:-8.5}" --timeout_s 300 --out "$out/sweep" --plot "$@" 2>&1 | tee "$out/sweep_log.txt"
(cd "$out" && tar czf sweep.tgz sweep && cp sweep/sweep.json sweep/sweep.md sweep/sweep.png . )
