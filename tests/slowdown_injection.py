"""Every phase of every training step made slower, for the regression gate's tests and its
calibration (never used in production).

TP_BENCH_TEST_SLOWDOWN=FACTOR: after each phase the step driver runs, sleep (FACTOR - 1) times
the time the phase just took, so every phase, and every step, takes about FACTOR times as long,
as a real regression of the work would make it (on CPU, where a phase has finished when it
returns; on a GPU this would only stretch the launch time).

Two ways in: ``python tests/slowdown_injection.py [benchmark options]`` for a run, and
``-p slowdown_injection`` (with tests/ on PYTHONPATH) for the benchmark suite.
"""

import os
import time

from tp_bench.engine.driver import StepDriver

factor = float(os.environ.get("TP_BENCH_TEST_SLOWDOWN", "1"))
original = StepDriver.run_phase


def slow_phase(self, phase):
    start = time.perf_counter()
    result = original(self, phase)
    time.sleep((factor - 1) * (time.perf_counter() - start))
    return result


StepDriver.run_phase = slow_phase

if __name__ == "__main__":
    from tp_bench.frontends.cli import entry

    entry()
