"""The training step, timed phase by phase: one pytest-benchmark entry each for the forward,
the backward, the optimizer step and the whole step, per impl and mesh.

The fixtures come from tp_bench.frontends.pytest_plugin; tp_bench.frontends.suite says how a
phase is timed alone. All four tests of one impl and mesh share one built session (module
scope), so each entry continues the training run of the one before.
"""

import math

from tp_bench.frontends.suite import measure


def _measure(benchmark, tp_bench_steps, tp_bench_session, tp_bench_options, tp_bench_group,
             phase):
    result = measure(benchmark, tp_bench_steps, tp_bench_session, phase, tp_bench_options,
                     tp_bench_group)
    assert math.isfinite(result.loss), f"loss is {result.loss} after {phase}"
    assert result.skipped_rounds == 0, (f"{result.skipped_rounds} steps skipped their update: "
                                        f"those rounds time no training step")
    assert all(t > 0 for t in result.times_s)


def test_forward(benchmark, tp_bench_steps, tp_bench_session, tp_bench_options, tp_bench_group):
    _measure(benchmark, tp_bench_steps, tp_bench_session, tp_bench_options, tp_bench_group,
             "forward")


def test_backward(benchmark, tp_bench_steps, tp_bench_session, tp_bench_options, tp_bench_group):
    _measure(benchmark, tp_bench_steps, tp_bench_session, tp_bench_options, tp_bench_group,
             "backward")


def test_optimizer(benchmark, tp_bench_steps, tp_bench_session, tp_bench_options,
                   tp_bench_group):
    _measure(benchmark, tp_bench_steps, tp_bench_session, tp_bench_options, tp_bench_group,
             "optimizer")


def test_step(benchmark, tp_bench_steps, tp_bench_session, tp_bench_options, tp_bench_group):
    _measure(benchmark, tp_bench_steps, tp_bench_session, tp_bench_options, tp_bench_group,
             "step")
