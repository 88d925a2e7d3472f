"""Run the CLI with a fault injected, for failure-handling tests (never used in production).

TP_BENCH_TEST_FAULT="raise:RANK:STEP" raises on one rank at a step;
TP_BENCH_TEST_FAULT="nan:STEP" makes every rank's loss NaN from a step on.
"""

import os

import torch

from tp_bench import runner
from tp_bench.cli import entry

kind, *where = os.environ["TP_BENCH_TEST_FAULT"].split(":")
original = runner.Session.train_step


def faulty_train_step(self, step):
    if kind == "raise" and self.ctx.rank == int(where[0]) and step == int(where[1]):
        raise RuntimeError(f"injected failure at step {step}")
    pending = original(self, step)
    if kind == "nan" and step >= int(where[0]):
        pending.loss = pending.loss * torch.tensor(float("nan"))
    return pending


runner.Session.train_step = faulty_train_step
entry()
