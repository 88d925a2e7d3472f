#!/usr/bin/env bash
# device_best.sh OUT: autotp, fsdp_dtensor and hf_native on one GPU, each at its defaults and at
# the best configuration the sweep found (docs/PERFORMANCE.md section 0: batch 8 for all three),
# Qwen3-1.7B, seq 2048, 20 steps, interleaved ROUNDS times; every results file packed into
# OUT/best.tgz and `tp-bench compare` of each round beside it.
set -uo pipefail
out=$1
rounds=${ROUNDS:-2}
common=(--model_name Qwen/Qwen3-1.7B --seq_length 2048 --num_training_steps 20 --warmup_steps 5
        --log_interval 5)
order=(autotp-default fsdp_dtensor-default hf_native-default autotp-best fsdp_dtensor-best
       hf_native-best)
for round in $(seq 1 "$rounds"); do
  for name in "${order[@]}"; do
    impl=${name%-*}
    batch=1
    [ "${name#*-}" = best ] && batch=8
    dir="$out/best/round$round/$name"
    mkdir -p "$dir"
    timeout 120 python3 -m torch.distributed.run --standalone --nproc_per_node=1 benchmark.py \
      "${common[@]}" --impl "$impl" --batch_size "$batch" --output_dir "$dir" > "$dir/log.txt" 2>&1
    echo "round $round $name: exit $? $(grep -h '^summary' "$dir/log.txt" | tail -1 | cut -c1-160)"
  done
done
for round in $(seq 1 "$rounds"); do
  python3 -m tp_bench compare "$out"/best/round"$round"/*/ > "$out/best_compare_round$round.txt" 2>&1
done
(cd "$out" && tar czf best.tgz best)
