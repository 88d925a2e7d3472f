#!/usr/bin/env bash
# device_plan_rows.sh OUT [SET]: peaks for docs/plan.md's GPU table, 4 steps each, several runs
# at a time where their peaks fit together (only the peaks are used); results packed into
# OUT/rows.tgz. SET "first": Qwen3-0.6B (both stacks, batch 1 and 2, activation checkpointing
# off and on) and Qwen3-4B with checkpointing. SET "second": Qwen3-1.7B with checkpointing,
# Qwen3-4B at batch 2 without, Qwen3-8B (fsdp_dtensor; autotp's plan does not fit one H200).
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
if [ "${2:-first}" = first ]; then
  for ac in off on; do
    for bs in 1 2; do
      one Qwen/Qwen3-0.6B autotp $bs $ac & one Qwen/Qwen3-0.6B fsdp_dtensor $bs $ac &
    done
    wait
  done
  for bs in 1 2; do
    one Qwen/Qwen3-4B autotp $bs on & one Qwen/Qwen3-4B fsdp_dtensor $bs on & wait
  done
else
  one Qwen/Qwen3-4B autotp 2 off & one Qwen/Qwen3-1.7B autotp 1 on & wait
  one Qwen/Qwen3-4B fsdp_dtensor 2 off & one Qwen/Qwen3-1.7B fsdp_dtensor 1 on & wait
  one Qwen/Qwen3-1.7B autotp 2 on & one Qwen/Qwen3-1.7B fsdp_dtensor 2 on & wait
  for bs_ac in "1 off" "1 on" "2 off"; do
    # shellcheck disable=SC2086
    one Qwen/Qwen3-8B fsdp_dtensor $bs_ac
  done
  one Qwen/Qwen3-8B autotp 1 off     # expected: refused by the plan before anything is built
fi
(cd "$1" && tar czf rows.tgz rows)
