"""Run the CLI with a fault injected, for failure-handling tests (never used in production).

TP_BENCH_TEST_FAULT="raise:RANK:STEP" raises on one rank at a step;
TP_BENCH_TEST_FAULT="nan:STEP" makes every rank's loss NaN from a step on;
TP_BENCH_TEST_FAULT="setup:RANK" raises on one rank while the model is being set up;
TP_BENCH_TEST_FAULT="pids:DIR" lets every rank write its pid to DIR/rank{RANK} (to be signalled);
TP_BENCH_TEST_FAULT="sweep:RULE;RULE..." with RULE = KIND@OPTION=VALUE, for the sweep's tests:
a run whose option has that value fails (KIND fail), runs out of memory (oom), hangs (hang) or
trains a different model (drift: a 50x learning rate) — "oom@batch_size=8".
"""

import os
import sys
import time
from pathlib import Path

import torch

from tp_bench.engine.driver import StepDriver
from tp_bench.engine.session import Session
from tp_bench.frontends.cli import entry

kind, *where = os.environ["TP_BENCH_TEST_FAULT"].split(":", 1)
rank = int(os.environ.get("RANK", "0"))
original_step, original_setup = StepDriver.step, Session.setup


def sweep_faults() -> set[str]:
    """The sweep faults whose option this run has (the run's own command line says)."""
    from tp_bench.frontends.arguments import parse_config

    cfg = parse_config([a for a in sys.argv[1:] if a != "run"])
    hits = set()
    for rule in where[0].split(";"):
        fault, _, condition = rule.partition("@")
        option, _, value = condition.partition("=")
        if str(getattr(cfg, option)).lower() == value.lower():
            hits.add(fault)
    return hits


sweep = sweep_faults() if kind == "sweep" else set()


def faulty_step(self, *args, **kwargs):
    step = self.step_index
    if kind == "raise" and rank == int(where[0].split(":")[0]) and \
            step == int(where[0].split(":")[1]):
        raise RuntimeError(f"injected failure at step {step}")
    if "oom" in sweep and step == 1:
        raise torch.OutOfMemoryError("injected: out of memory")
    if "fail" in sweep and step == 1:
        raise RuntimeError("injected failure")
    if "hang" in sweep and step == 1:
        time.sleep(10**6)
    pending = original_step(self, *args, **kwargs)
    if kind == "nan" and step >= int(where[0]):
        pending.loss = pending.loss * torch.tensor(float("nan"))
    return pending


def faulty_setup(self):
    if kind == "setup" and rank == int(where[0]):
        raise RuntimeError("injected failure during set-up")
    original_setup(self)
    if "drift" in sweep:
        for group in self.trainer.optimizer.param_groups:
            group["lr"] *= 50


if kind == "pids":
    Path(where[0], f"rank{rank}").write_text(str(os.getpid()))
StepDriver.step, Session.setup = faulty_step, faulty_setup
entry()
