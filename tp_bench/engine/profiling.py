"""``--profile``: one extra training step under torch.profiler, a Chrome trace and a breakdown.

The profiled step runs after the measured ones (its step index is num_training_steps), so the
profiler's own cost never enters the results. Every rank runs it (the collectives need them);
rank 0 records and writes ``trace_<impl>_tp<tp>_dp<dp>.json.gz`` (open it in Perfetto or
chrome://tracing).

The breakdown reads the trace's GPU kernels within the step: busy = union of all kernel
intervals, communication = NCCL kernels, exposed communication = NCCL time not overlapped by any
compute kernel, idle = the step's span with no kernel running (host/dispatch gaps, waits).
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any, Optional

import torch

from tp_bench.core.dist import DistContext
from tp_bench.engine.driver import StepDriver

Interval = tuple[float, float]


def _union(intervals: list[Interval]) -> list[Interval]:
    merged: list[Interval] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def _length(intervals: list[Interval]) -> float:
    return sum(end - start for start, end in intervals)


def _intersection_length(a: list[Interval], b: list[Interval]) -> float:
    total, i, j = 0.0, 0, 0
    while i < len(a) and j < len(b):
        lo, hi = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        total += max(0.0, hi - lo)
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return total


def kernel_breakdown(trace: dict[str, Any]) -> Optional[dict[str, float]]:
    """Shares of the profiled step's GPU time; None when the trace has no GPU kernels."""
    events = trace.get("traceEvents", [])
    steps = [e for e in events if e.get("name") == "tp_bench.step" and "dur" in e]
    kernels = [e for e in events if e.get("cat") == "kernel" and "dur" in e]
    if not steps or not kernels:
        return None
    begin = min(e["ts"] for e in steps)
    end = max(e["ts"] + e["dur"] for e in steps)
    # GPU work of the step may finish after the host-side range closes: extend to the last kernel
    # that started inside it.
    inside = [e for e in kernels if begin <= e["ts"] <= end]
    end = max([end] + [e["ts"] + e["dur"] for e in inside])
    span = end - begin
    comm = _union([(e["ts"], e["ts"] + e["dur"]) for e in inside if "nccl" in e["name"].lower()])
    compute = _union([(e["ts"], e["ts"] + e["dur"]) for e in inside
                      if "nccl" not in e["name"].lower()])
    busy = _union(comm + compute)
    return {
        "step_span_ms": span / 1000.0,
        "gpu_busy_pct": 100.0 * _length(busy) / span,
        "compute_pct": 100.0 * _length(compute) / span,
        "communication_pct": 100.0 * _length(comm) / span,
        "communication_exposed_pct": 100.0 * (_length(comm) - _intersection_length(comm, compute)) / span,
        "idle_pct": 100.0 * (span - _length(busy)) / span,
        "kernels": len(inside),
    }


def profile_step(driver: StepDriver, ctx: DistContext, path: Path) -> Optional[dict[str, Any]]:
    """Run one more training step, profiled on rank 0; return the breakdown (rank 0) or None."""
    from torch.profiler import ProfilerActivity, profile, record_function

    step = driver.step_index
    if not ctx.is_rank0:
        driver.step()
        return None
    cuda = ctx.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        with record_function("tp_bench.step"):
            driver.step()
        if cuda:
            torch.cuda.synchronize()
    path.parent.mkdir(parents=True, exist_ok=True)
    prof.export_chrome_trace(str(path))
    with gzip.open(path, "rt") as f:
        breakdown = kernel_breakdown(json.load(f))
    top = prof.key_averages().table(
        sort_by="self_device_time_total" if cuda else "self_cpu_time_total", row_limit=15)
    path.with_suffix("").with_suffix(".top.txt").write_text(top + "\n")
    return {"trace": str(path), "step": step, "breakdown": breakdown}
