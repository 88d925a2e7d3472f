"""Run the CLI with every training step made slower, for the CI gate's tests (never used in
production).

TP_BENCH_TEST_SLOWDOWN=FRACTION: after each step, sleep FRACTION times the time the step just
took. A step's time runs from the end of the previous step, so the sleep lands in the measured
time of the next one: the run gets about (1 + FRACTION) times slower, as a real regression of
the step's own work would make it.
"""

import os
import time

from tp_bench.engine.driver import StepDriver
from tp_bench.frontends.cli import entry

fraction = float(os.environ["TP_BENCH_TEST_SLOWDOWN"])
original = StepDriver.step


def slow_step(self, *args, **kwargs):
    start = time.perf_counter()
    pending = original(self, *args, **kwargs)
    # On CPU the step has finished when it returns; on a GPU this would only measure the launch
    # time, which is why this is a CPU test hook.
    time.sleep(fraction * (time.perf_counter() - start))
    return pending


StepDriver.step = slow_step
entry()
