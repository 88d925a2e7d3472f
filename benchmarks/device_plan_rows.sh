#!/usr/bin/env bash
# device_plan_rows.sh OUT: peaks for docs/plan.md's GPU table: Qwen3-0.6B (both stacks, batch 1
# and 2, activation checkpointing off and on; four runs at a time: only the peaks are used) and
# Qwen3-4B with checkpointing (two at a time). 4 steps each; results packed into OUT/rows.tgz.
set -uo pipefail
out=$1/rows
mkdir -p "$out"
one() {  # model impl batch ac
  local name="$2-$(basename "$1")-bs$3-ac$4" flag=""
  [ "$4" = on ] && flag=--activation_checkpointing
  timeout 200 python3 -m torch.distributed.run --standalone --nproc_per_node=1 --master_port=$((29500 + RANDOM % 1000)) \
    benchmark.py --impl "$2" --model_name "$1" --batch_size "$3" $flag --seq_length 2048 \
    --num_training_steps 4 --warmup_steps 1 --log_interval 2 --output_dir "$out/$name" \
    > "$out/$name.log" 2>&1
  echo "$name: exit $?"
}
for ac in off on; do
  for bs in 1 2; do
    one Qwen/Qwen3-0.6B autotp $bs $ac & one Qwen/Qwen3-0.6B fsdp_dtensor $bs $ac &
  done
  wait
done
for bs in 1 2; do
  one Qwen/Qwen3-4B autotp $bs on & one Qwen/Qwen3-4B fsdp_dtensor $bs on & wait
done
(cd "$1" && tar czf rows.tgz rows)
