"""Run the CLI with a fault injected, for failure-handling tests (never used in production).

TP_BENCH_TEST_FAULT="raise:RANK:STEP" raises on one rank at a step;
TP_BENCH_TEST_FAULT="nan:STEP" makes every rank's loss NaN from a step on.
"""

import os

import torch

from tp_bench.engine.driver import StepDriver
from tp_bench.frontends.cli import entry

kind, *where = os.environ["TP_BENCH_TEST_FAULT"].split(":")
original = StepDriver.step


def faulty_step(self, *args, **kwargs):
    step = self.step_index
    if kind == "raise" and int(os.environ["RANK"]) == int(where[0]) and step == int(where[1]):
        raise RuntimeError(f"injected failure at step {step}")
    pending = original(self, *args, **kwargs)
    if kind == "nan" and step >= int(where[0]):
        pending.loss = pending.loss * torch.tensor(float("nan"))
    return pending


StepDriver.step = faulty_step
entry()
