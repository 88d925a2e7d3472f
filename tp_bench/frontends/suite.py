"""What the benchmark suite measures: one phase of a training step per pytest-benchmark entry.

Every round of every entry is a whole training step (data, forward, backward, optimizer) through
the engine's step driver, so a strategy always goes through its normal cycle; only the phase
being measured is timed. The phases before it run in pytest-benchmark's ``setup``, the ones
after it in ``teardown``, untimed:

  entry      setup (untimed)          timed                         teardown (untimed)
  forward    data                     forward                       backward, optimizer
  backward   data, forward            backward                      optimizer
  optimizer  data, forward, backward  optimizer (clip, step, zero)  -
  step       -                        data .. optimizer             -

The suite's clock (``device_clock``, pytest-benchmark's timer here) first waits for the device
and then for every rank, so a round lasts as long as the slowest rank's: the entry's times are
the slowest rank's, through pytest-benchmark's public API alone. Rounds and warm-up are fixed
counts (``benchmark.pedantic``), identical on every rank, because a phase contains collectives.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from tp_bench.engine.driver import PHASES as STEP_PHASES
from tp_bench.engine.driver import StepDriver, dp_mean
from tp_bench.engine.session import Session
from tp_bench.frontends.suite_options import SuiteOptions

PHASES = ("forward", "backward", "optimizer", "step")

# Share of a training step's FLOPs done by each entry (backward = 2 x forward, the convention of
# the 6N estimate); the optimizer's element-wise work is not counted, so it has no MFU.
FLOP_SHARE = {"forward": 1 / 3, "backward": 2 / 3, "optimizer": None, "step": 1.0}

_CLOCK_READINGS: list[float] = []


def device_clock() -> float:
    """Host clock read once the device has drained its queue and every rank has got here, so a
    round timed with it lasts as long as the slowest rank's (pytest-benchmark's timer here)."""
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
        if torch.cuda.is_initialized():
            torch.cuda.synchronize()
    now = time.perf_counter()
    _CLOCK_READINGS.append(now)
    return now


def round_functions(driver: StepDriver, phase: str) -> tuple[Optional[Callable], Callable,
                                                               Optional[Callable]]:
    """(setup, target, teardown) for benchmark.pedantic: each round is one whole step."""
    if phase == "step":
        return driver.finish, driver.step, None
    position = STEP_PHASES.index(phase)

    def setup() -> None:
        driver.finish()
        for before in STEP_PHASES[:position]:
            driver.run_phase(before)

    return setup, lambda: driver.run_phase(phase), driver.finish


@dataclass
class Measurement:
    phase: str
    times_s: list[float]          # per round, the slowest rank's; empty with --benchmark-disable
    loss: float                   # last step's, mean over data-parallel replicas
    memory_gb: tuple[float, float]   # allocated, peak: max over ranks
    skipped_rounds: int           # steps that did not update the weights (they time nothing)


def measure(benchmark: Any, driver: StepDriver, session: Session, phase: str,
            options: SuiteOptions, group: str) -> Measurement:
    """Time ``phase`` with pytest-benchmark and record what it needs to be read on its own.

    A collective: every rank must call it for the same phase.
    """
    benchmark.group = group            # read when the rounds start
    setup, target, teardown = round_functions(driver, phase)
    session.memory.reset_peak()
    first_step = driver.step_index
    _CLOCK_READINGS.clear()
    benchmark.pedantic(target, setup=setup, teardown=teardown, rounds=options.rounds,
                       warmup_rounds=options.warmup)
    driver.finish()   # with --benchmark-disable pedantic runs setup and target only
    readings = _CLOCK_READINGS[-2 * options.rounds:] if len(_CLOCK_READINGS) else []
    times = [end - start for start, end in zip(readings[::2], readings[1::2])]
    skipped = sum(step >= first_step for step in driver.skipped)
    memory = session.memory.read_gb()
    if session.ctx.world_size > 1:
        box = torch.tensor([*memory, skipped], dtype=torch.float64, device=session.ctx.device)
        dist.all_reduce(box, op=dist.ReduceOp.MAX)
        memory, skipped = (box[0].item(), box[1].item()), int(box[2].item())
    loss = dp_mean(driver.last.loss.float().reshape(1).to(session.ctx.device),
                   session.ctx.world_size).item()
    if times:
        benchmark.extra_info.update(extra_info(session, phase, times, memory, loss, options))
    return Measurement(phase, times, loss, memory, skipped)


def extra_info(session: Session, phase: str, times_s: list[float],
               memory_gb: tuple[float, float], loss: float,
               options: SuiteOptions) -> dict[str, Any]:
    """What a pytest-benchmark entry carries besides its times (docs/suite.md, "What each field
    means")."""
    ctx, cfg, throughput = session.ctx, session.cfg, session.throughput
    rates = throughput.rates(statistics.median(times_s))
    share = FLOP_SHARE[phase]
    tflops = None if share is None else share * rates["tflops_per_gpu"]
    mfu = None if share is None or rates["mfu"] is None else share * rates["mfu"]
    record = session.record()
    return {
        "phase": phase,
        "impl": cfg.impl,
        "mesh": cfg.dims.label,
        "dp_size": cfg.dp_size,
        "tp_size": cfg.tp_size,
        "world_size": ctx.world_size,
        "times_are": "per round, the slowest rank's (the clock waits for every rank), "
                     "device-synchronized",
        "rounds": options.rounds,
        "warmup_rounds": options.warmup,
        "tokens_per_step": throughput.tokens_per_step,
        "tokens_per_sec": rates["tokens_per_sec"],
        "tokens_per_sec_per_gpu": rates["tokens_per_sec_per_gpu"],
        "flops_share": share,
        "tflops_per_gpu": tflops,
        "mfu": mfu,
        "peak_tflops_per_gpu": throughput.peak_tflops,
        "memory_allocated_gb": memory_gb[0],
        "memory_peak_gb": memory_gb[1],
        "memory_is": session.memory.kind,
        "loss": loss,
        **{k: record[k] for k in ("precision", "strategy", "model", "config", "environment")},
    }
