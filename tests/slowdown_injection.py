"""Every phase of every training step made slower, for the regression gate's tests and its
calibration (never used in production).

TP_BENCH_TEST_SLOWDOWN=FACTOR: after each phase the step driver runs, sleep (FACTOR - 1) times
the fastest this phase has taken so far on this rank, as a real regression of the work would
slow it (on CPU, where a phase has finished when it returns; on a GPU this would only stretch
the launch time). The fastest time, not the last one: a phase's time includes waiting for the
other ranks' sleeps in collectives, and sleeping in proportion to that compounded (2x came out
as 2.2-3.1x on 2 CPU ranks). The price: a noisy phase's median grows by less than the factor
(measured on the 2-core machine: 1.3 -> 1.19x, 2 -> 1.64x, docs/compare.md), so the gate's
power is stated for the measured slowdown, not the nominal one.

Two ways in: ``python tests/slowdown_injection.py [benchmark options]`` for a run, and
``-p slowdown_injection`` (with tests/ on PYTHONPATH) for the benchmark suite.
"""

import os
import time

from tp_bench.engine.driver import StepDriver

factor = float(os.environ.get("TP_BENCH_TEST_SLOWDOWN", "1"))
original = StepDriver.run_phase


fastest: dict[str, float] = {}


def slow_phase(self, phase):
    start = time.perf_counter()
    result = original(self, phase)
    took = time.perf_counter() - start
    fastest[phase] = min(took, fastest.get(phase, took))
    time.sleep((factor - 1) * fastest[phase])
    return result


StepDriver.run_phase = slow_phase

if __name__ == "__main__":
    from tp_bench.frontends.cli import entry

    entry()
