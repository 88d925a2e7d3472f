#!/usr/bin/env bash
# The per-node part of the SLURM scripts (srun starts one per node): a torchrun agent that
# meets the other nodes' agents through c10d rendezvous at $RDZV_ENDPOINT, then runs "$@".
set -euo pipefail
# A node is named by its host name; where nodes share one (containers), by SLURM's node name.
export TP_BENCH_NODE_NAME=${TP_BENCH_NODE_NAME:-${SLURMD_NODENAME:-$(hostname)}}
exec "${PYTHON:-python3}" -m torch.distributed.run --nnodes "$SLURM_JOB_NUM_NODES" \
  --nproc_per_node "$RANKS_PER_NODE" --rdzv_backend c10d --rdzv_endpoint "$RDZV_ENDPOINT" \
  --rdzv_id "tp_bench-$SLURM_JOB_ID" --max_restarts 0 "$@"
