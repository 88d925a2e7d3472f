"""Run the CLI with a fault injected, for failure-handling tests (never used in production).

TP_BENCH_TEST_FAULT="raise:RANK:STEP" raises on one rank at a step;
TP_BENCH_TEST_FAULT="nan:STEP" makes every rank's loss NaN from a step on;
TP_BENCH_TEST_FAULT="setup:RANK" raises on one rank while the model is being set up;
TP_BENCH_TEST_FAULT="pids:DIR" lets every rank write its pid to DIR/rank{RANK} (to be signalled).
"""

import os
from pathlib import Path

import torch

from tp_bench.engine.driver import StepDriver
from tp_bench.engine.session import Session
from tp_bench.frontends.cli import entry

kind, *where = os.environ["TP_BENCH_TEST_FAULT"].split(":")
rank = int(os.environ.get("RANK", "0"))
original_step, original_setup = StepDriver.step, Session.setup


def faulty_step(self, *args, **kwargs):
    step = self.step_index
    if kind == "raise" and rank == int(where[0]) and step == int(where[1]):
        raise RuntimeError(f"injected failure at step {step}")
    pending = original_step(self, *args, **kwargs)
    if kind == "nan" and step >= int(where[0]):
        pending.loss = pending.loss * torch.tensor(float("nan"))
    return pending


def faulty_setup(self):
    if kind == "setup" and rank == int(where[0]):
        raise RuntimeError("injected failure during set-up")
    original_setup(self)


if kind == "pids":
    Path(where[0], f"rank{rank}").write_text(str(os.getpid()))
StepDriver.step, Session.setup = faulty_step, faulty_setup
entry()
