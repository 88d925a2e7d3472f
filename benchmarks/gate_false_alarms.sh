#!/usr/bin/env bash
# gate_false_alarms.sh [PAIRS] [THRESHOLD_PCT] [OUTDIR] [gate options...]
# How often the CI gate fails two honest runs of the same code: PAIRS times, run the same small
# CPU benchmark twice (the configuration of the gate's tests: tiny preset, NPROC processes,
# default 1) and gate the second run against the first. Prints each verdict and the count that
# passed. The runs are kept, so other rules can be tried afterwards without rerunning:
#   python -m tp_bench gate OUTDIR/N/baseline OUTDIR/N/fresh --threshold PCT
set -euo pipefail
cd "$(dirname "$0")/.."
pairs=${1:-20} threshold=${2:-25} out=${3:-out/gate_false_alarms}
shift $(($# < 3 ? $# : 3))
impl=${IMPL:-fsdp_dtensor} nproc=${NPROC:-1}

run() {
  mkdir -p "$1"
  OMP_NUM_THREADS=1 python3 -m torch.distributed.run --standalone --nproc_per_node="$nproc" \
    benchmark.py --impl "$impl" --model_name tiny --seq_length 64 --batch_size 2 \
    --num_training_steps 20 --output_dir "$1" > "$1/run.log" 2>&1
}

passed=0
for i in $(seq 1 "$pairs"); do
  run "$out/$i/baseline"
  run "$out/$i/fresh"
  status=0
  verdict=$(python3 -m tp_bench gate "$out/$i/baseline" "$out/$i/fresh" \
    --threshold "$threshold" "$@") || status=$?
  [ "$status" -eq 0 ] && passed=$((passed + 1))
  echo "$i: exit $status: ${verdict%%$'\n'*}"
done
echo "honest pairs passing the gate: $passed of $pairs (threshold $threshold%, $impl, $nproc process(es))"
