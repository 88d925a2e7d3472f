"""Print DeepSpeed's tensor- and data-parallel groups of every rank after AutoTP set-up (test
helper; run under torchrun)."""

import sys

import torch.distributed as dist

from tp_bench.core import dist as distributed
from tp_bench.engine.session import prepare
from tp_bench.frontends.arguments import parse_config

cfg = parse_config(sys.argv[1:])
ctx = distributed.setup()
session = prepare(cfg, ctx)
session.setup()
from deepspeed.utils import groups  # noqa: E402  (imported by the strategy above)

tp = dist.get_process_group_ranks(groups.get_tensor_model_parallel_group())
dp = dist.get_process_group_ranks(groups.get_data_parallel_group())
rows = [None] * ctx.world_size
dist.all_gather_object(rows, (ctx.rank, tp, dp))
if ctx.rank == 0:
    for rank, tp, dp in rows:
        print(f"rank {rank}: tp {tp} dp {dp}", flush=True)
distributed.teardown()
distributed.leave(0)
