#!/usr/bin/env bash
# Install tp_bench (editable) and its dependencies into the active Python environment.
#
# torch first, chosen for the machine: with a GPU, the default build; without one, a CPU build,
# because the default Linux wheel drags in several GB of CUDA libraries. The CPU build comes from
# the configured package index (TP_BENCH_CPU_TORCH picks the version; point
# TP_BENCH_TORCH_INDEX at https://download.pytorch.org/whl/cpu where that index is reachable).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

if "$PY" -c "import torch" 2>/dev/null; then
  echo "install: keeping installed torch $("$PY" -c 'import torch; print(torch.__version__)')"
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  "$PY" -m pip install torch
else
  "$PY" -m pip install "torch==${TP_BENCH_CPU_TORCH:-2.13.0}" \
    ${TP_BENCH_TORCH_INDEX:+--index-url "$TP_BENCH_TORCH_INDEX"}
fi
"$PY" -m pip install -e ".[plot,torchtitan]"
# --impl torchtitan: torchtitan 0.3.0 without its trainer's dependencies (the extra above holds
# what its models and parallelization import). It needs Python >= 3.11.
if "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  "$PY" -m pip install --no-deps "torchtitan==0.3.0"
else
  echo "install: torchtitan needs Python >= 3.11; --impl torchtitan will not be available"
fi
