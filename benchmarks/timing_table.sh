#!/usr/bin/env bash
# timing_table.sh MODEL OUTDIR [selfcheck options...]
# Both impls x {eager, compile} x --timing {none, events, sync} at world size 1, one process per
# (impl, compile) with the timing modes interleaved inside it; prints a markdown table.
set -uo pipefail
model=$1 out=$2
shift 2
logs=${LOG_DIR:-$(mktemp -d)}
mkdir -p "$out" "$logs"
for impl in fsdp_dtensor autotp; do
  for compile in false true; do
    python3 -m tp_bench selfcheck overhead --impl "$impl" --model_name "$model" \
      --compile "$compile" --warmup_steps 3 --rounds 10 --steps_per_round 4 \
      --out "$out/overhead_${impl}_compile_${compile}.json" "$@" > "$logs/${impl}_${compile}.log" 2>&1 \
      || { echo "FAILED: $impl compile=$compile"; tail -5 "$logs/${impl}_${compile}.log"; }
  done
done
python3 -m tp_bench selfcheck table "$out"/overhead_*.json | tee "$out/table.md"
