# Sourced by the SLURM scripts: the rendezvous endpoint (the allocation's first node), ranks per
# node (its GPUs, else 2) and the mesh options from the environment.
# sed reads every line: `head -n1` could end scontrol with SIGPIPE, fatal under pipefail
head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)
export RDZV_ENDPOINT="${RDZV_ENDPOINT:-$head_node:${RDZV_PORT:-29500}}"
if [ -z "${RANKS_PER_NODE:-}" ]; then
  RANKS_PER_NODE=$(nvidia-smi -L 2>/dev/null | wc -l || true)
  [ "${RANKS_PER_NODE:-0}" -gt 0 ] || RANKS_PER_NODE=2
fi
export RANKS_PER_NODE
mesh=(--impl "${IMPL:-fsdp_dtensor}")
[ -n "${DP_SIZE:-}" ] && mesh+=(--dp_size "$DP_SIZE")
[ -n "${TP_SIZE:-}" ] && mesh+=(--tp_size "$TP_SIZE")
[ -n "${DP_REPLICATE:-}" ] && mesh+=(--dp_replicate "$DP_REPLICATE")
here=$PWD/scripts/slurm
