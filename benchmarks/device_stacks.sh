#!/usr/bin/env bash
# device_stacks.sh OUT: the stacks side by side on one GPU (docs/PERFORMANCE.md): Qwen3-1.7B,
# seq 2048, 20 steps, fsdp_dtensor / torchtitan / hf_native eager and fsdp_dtensor / torchtitan
# compiled, interleaved, ROUNDS times (BATCH: micro-batch, default 1; ORDER: the configurations,
# default the five above; also autotp-eager, the -hfnorm variants that run HuggingFace's
# RMSNorm code, --norm_impl hf, and the -sepqkv ones with three q/k/v projections,
# --fused_qkv false); EXTRA: more arguments for every run (e.g. --profile); every
# results file packed into OUT/stacks.tgz, the profiler traces summarized by
# benchmarks/trace_kernels.py into stacks/kernels_*.txt (in the archive, the traces are not).
# DEADLINE_S: start no round that would end past this many seconds from the start, judged by
# the longest round so far (rounds stay whole, so every configuration runs as often).
# Each mode's fsdp_dtensor / torchtitan pair is compared over the rounds in stacks_<mode>.txt.
set -uo pipefail
out=$1
rounds=${ROUNDS:-2}
deadline=${DEADLINE_S:-0}
common=(--model_name Qwen/Qwen3-1.7B --seq_length 2048 --num_training_steps 20 --warmup_steps 5
        --log_interval 5 --batch_size "${BATCH:-1}" ${EXTRA:-})
declare -A configs=(
  [fsdp_dtensor-eager]="--impl fsdp_dtensor"
  [torchtitan-eager]="--impl torchtitan"
  [hf_native-eager]="--impl hf_native"
  [autotp-eager]="--impl autotp"
  [fsdp_dtensor-compile]="--impl fsdp_dtensor --compile"
  [fsdp_dtensor-eager-hfnorm]="--impl fsdp_dtensor --norm_impl hf"
  [fsdp_dtensor-compile-hfnorm]="--impl fsdp_dtensor --compile --norm_impl hf"
  [fsdp_dtensor-eager-sepqkv]="--impl fsdp_dtensor --fused_qkv false"
  [fsdp_dtensor-compile-sepqkv]="--impl fsdp_dtensor --compile --fused_qkv false"
  [torchtitan-compile]="--impl torchtitan --compile"
)
read -r -a order <<< "${ORDER:-fsdp_dtensor-eager torchtitan-eager hf_native-eager fsdp_dtensor-compile torchtitan-compile}"
longest=0
for round in $(seq 1 "$rounds"); do
  if (( deadline > 0 && SECONDS + longest > deadline )); then
    echo "round $round not started: ${SECONDS}s used, the longest round took ${longest}s"
    break
  fi
  started=$SECONDS
  for name in "${order[@]}"; do
    dir="$out/stacks/round$round/$name"
    mkdir -p "$dir"
    begin=$SECONDS
    # shellcheck disable=SC2086
    timeout 240 python3 -m torch.distributed.run --standalone --nproc_per_node=1 benchmark.py \
      "${common[@]}" ${configs[$name]} --output_dir "$dir" > "$dir/log.txt" 2>&1
    echo "round $round $name: exit $? ($((SECONDS - begin))s)" \
      "$(grep -h "^summary" "$dir/log.txt" | tail -1 | cut -c1-160)"
  done
  longest=$(( SECONDS - started > longest ? SECONDS - started : longest ))
done
python3 -m tp_bench compare "$out"/stacks/round*/*/ > "$out/stacks_compare.txt" 2>&1
cat "$out/stacks_compare.txt"
for mode in eager compile; do
  mine=("$out"/stacks/round*/fsdp_dtensor-$mode/) theirs=("$out"/stacks/round*/torchtitan-$mode/)
  [ -d "${mine[1]:-}" ] && [ -d "${theirs[1]:-}" ] || continue    # two rounds each at least
  pair=("${mine[@]}" "${theirs[@]}")
  python3 -m tp_bench compare "${pair[@]}" > "$out/stacks_$mode.txt" 2>&1
  sed -n '/^group/,$p' "$out/stacks_$mode.txt"
done
for trace in "$out"/stacks/round1/*/trace_*.json.gz; do
  [ -e "$trace" ] || continue
  name=$(basename "$(dirname "$trace")")
  python3 benchmarks/trace_kernels.py "$trace" > "$out/stacks/kernels_$name.txt" 2>&1
done
for mode in eager compile; do
  pair=("$out"/stacks/round1/{fsdp_dtensor,torchtitan}-$mode/trace_*.json.gz)
  [ -e "${pair[0]}" ] && [ -e "${pair[1]}" ] || continue
  python3 benchmarks/trace_kernels.py "${pair[@]}" > "$out/stacks/kernels_diff_$mode.txt" 2>&1
done
(cd "$out" && tar czf stacks.tgz --exclude='trace_*.json.gz' stacks)
