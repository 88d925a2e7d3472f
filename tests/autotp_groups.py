"""Print DeepSpeed's tensor- and data-parallel groups of every rank after AutoTP set-up (test
helper; run under torchrun)."""

import sys

import torch.distributed as dist

from tp_bench import distributed, runner
from tp_bench.cli import _Parser, add_config_arguments, config_from_args

parser = _Parser()
add_config_arguments(parser)
cfg = config_from_args(parser.parse_args(sys.argv[1:]))
ctx = distributed.setup()
session = runner.prepare(cfg, ctx)
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
