"""Diagnostic: a run with Python's automatic garbage collection left on (the step driver's own
schedule undone), printing each generation-2 collection with the step it landed in and its
length. Arguments are benchmark.py's; start it as benchmark.py is started:

    torchrun --nproc_per_node=1 benchmarks/gc_log.py --impl fsdp_dtensor --model_name ...

It showed why one step in 15 of a batch-1 fsdp_dtensor run on the H200 took 2-3x the others
(docs/PERFORMANCE.md 0.8)."""

from __future__ import annotations

import gc
import runpy
import sys
import time
from pathlib import Path

from tp_bench.engine import driver

_started: list[float] = []
_full: list[float] = []


def _on_collection(phase: str, info: dict) -> None:
    if phase == "start":
        _started[:] = [time.perf_counter()]
    elif info["generation"] == 2:
        _full.append(1000.0 * (time.perf_counter() - _started[0]))


def _logging_step(step, self, *args, **kwargs):
    before = len(_full)
    pending = step(self, *args, **kwargs)
    for ms in _full[before:]:
        print(f"gc: generation-2 collection in step {pending.step}: {ms:.0f} ms", flush=True)
    return pending


def main() -> None:
    gc.callbacks.append(_on_collection)
    driver.take_over_gc = lambda: None          # leave automatic collection on
    step = driver.StepDriver.step
    driver.StepDriver.step = lambda self, *a, **k: _logging_step(step, self, *a, **k)
    entry = Path(__file__).resolve().parent.parent / "benchmark.py"
    sys.argv = [str(entry)] + sys.argv[1:]
    runpy.run_path(str(entry), run_name="__main__")


if __name__ == "__main__":
    main()
