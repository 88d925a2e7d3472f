"""pytest plugin for the suite's failure tests (``-p suite_fault``; never used in production).

TP_BENCH_SUITE_FAULT="raise:RANK:NAME:WHEN": on rank RANK, tests whose node id contains NAME
raise, WHEN "before" their body (the other ranks then wait in the body's first collective) or
"after" it (the other ranks are not blocked).
TP_BENCH_SUITE_FAULT="slow:RANK:NAME:SECONDS": on rank RANK, the optimizer step of tests whose
node id contains NAME ends SECONDS late, after its last collective, so only that rank is slow.
TP_BENCH_SUITE_EXIT_DIR=DIR: every rank writes its pytest exit status to DIR/rank{RANK}.
"""

import os
import time
from pathlib import Path

import pytest

kind, rank, name, arg = os.environ.get("TP_BENCH_SUITE_FAULT", "none:-1::").split(":", 3)
here = int(os.environ.get("RANK", "0")) == int(rank)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    hit = here and name in item.nodeid
    if hit and kind == "raise" and arg == "before":
        raise RuntimeError(f"injected failure before {item.name}")
    restore = None
    if hit and kind == "slow":
        trainer = item.funcargs["tp_bench_steps"].trainer
        step = trainer.step

        def slow_step():
            stats = step()
            time.sleep(float(arg))
            return stats

        trainer.step, restore = slow_step, lambda: setattr(trainer, "step", step)
    try:
        result = yield
    finally:
        if restore:
            restore()
    if hit and kind == "raise" and arg == "after":
        raise RuntimeError(f"injected failure after {item.name}")
    return result


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session, exitstatus):
    directory = os.environ.get("TP_BENCH_SUITE_EXIT_DIR")
    if directory:
        Path(directory, f"rank{os.environ.get('RANK', '0')}").write_text(str(int(exitstatus)))
