#!/usr/bin/env bash
# FSDP2 + DTensor: DP_SIZE=2 TP_SIZE=4 ./scripts/run_fsdp_dtensor.sh [benchmark options...]
exec "$(dirname "$0")/launch.sh" fsdp_dtensor "$@"
