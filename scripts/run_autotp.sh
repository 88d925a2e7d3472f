#!/usr/bin/env bash
# DeepSpeed AutoTP: DP_SIZE=2 TP_SIZE=4 ./scripts/run_autotp.sh [benchmark options...]
exec "$(dirname "$0")/launch.sh" autotp "$@"
