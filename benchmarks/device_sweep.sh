#!/usr/bin/env bash
# device_sweep.sh OUT [sweep options...]: the sweep of docs/PERFORMANCE.md on one GPU. Both stacks
# on Qwen3-1.7B at seq 2048, within 8.5 minutes, everything packed into OUT (sweep.tgz, and
# sweep.json/md/png beside it).
set -uo pipefail
out=$1
shift
python3 -m tp_bench sweep --impls autotp,fsdp_dtensor --model_name Qwen/Qwen3-1.7B \
  --seq_length 2048 --num_training_steps 12 --warmup_steps 4 --log_interval 4 \
  --budget_minutes 8.5 --timeout_s 300 --out "$out/sweep" --plot "$@" 2>&1 | tee "$out/sweep_log.txt"
(cd "$out" && tar czf sweep.tgz sweep && cp sweep/sweep.json sweep/sweep.md sweep/sweep.png . )
