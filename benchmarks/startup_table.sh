#!/usr/bin/env bash
# startup_table.sh OUTDIR: launch-to-first-step time and host/GPU peak memory of set-up on one
# GPU, meta-device init against a full build (fsdp_dtensor) and AutoTP's own path, for
# Qwen3-32B at 8 layers and Qwen3-8B at full depth. Prints a markdown table.
set -uo pipefail
out=$1
logs=${LOG_DIR:-$(mktemp -d)}
mkdir -p "$out" "$logs"
i=0
for model in "Qwen/Qwen3-32B --num_layers 8" "Qwen/Qwen3-8B"; do
  for variant in "fsdp_dtensor --meta_init true" "fsdp_dtensor --meta_init false" "autotp"; do
    i=$((i + 1))
    # shellcheck disable=SC2086
    python3 -m tp_bench selfcheck startup --model_name $model --impl $variant \
      --out "$out/startup_$i.json" > "$logs/$i.log" 2>&1 \
      || { echo "FAILED: $model $variant"; tail -5 "$logs/$i.log"; }
  done
done
python3 -m tp_bench selfcheck table "$out"/startup_*.json | tee "$out/table.md"
