"""Measure the benchmark itself: what timing costs, and what start-up costs.

``tp-bench selfcheck overhead [run options] --rounds 12 --steps_per_round 4``
    Builds one strategy and model, then runs rounds of steps with each ``--timing`` mode
    (none, events, sync), the mode order rotating every round, in one process. Each block's
    throughput is its wall time with a device sync at both ends (max over ranks). The overhead
    of a mode is the median over rounds of its throughput over the same round's "none" block:
    paired within a round, so slow drifts of the GPU clock cancel.

``tp-bench selfcheck startup [run options]``
    Builds the strategy (model creation, sharding, initialization, optimizer) and reports the
    time from process launch to the first step and the host / GPU peak memory so far, without
    training: e.g. ``--meta_init true`` against ``false``.

``tp-bench selfcheck table FILE...``
    Markdown table of overhead and startup JSON files.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import torch.distributed as dist

from tp_bench.core import dist as distributed
from tp_bench.core import results
from tp_bench.core.errors import ConfigError
from tp_bench.core.metrics import PhaseTimer, resolve_phases
from tp_bench.core.stats import quantile
from tp_bench.engine.session import Session, prepare
from tp_bench.frontends.arguments import config_from_args, config_parser

MODES = ("none", "events", "sync")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _max_over_ranks(value: float, device: torch.device) -> float:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def measure_overhead(session: Session, rounds: int, steps_per_round: int,
                     modes: Sequence[str] = MODES) -> dict[str, Any]:
    cfg, device = session.cfg, session.ctx.device
    driver = session.driver("none", per_step_memory=False)
    for _ in range(cfg.warmup_steps):          # compile, allocator growth, cuDNN/cuBLAS picks
        driver.step()
    _sync(device)
    session.memory.reset_peak()
    seconds: dict[str, list[float]] = {m: [] for m in modes}
    for r in range(rounds):
        order = list(modes[r % len(modes):]) + list(modes[:r % len(modes)])
        for mode in order:
            driver.timer = PhaseTimer(mode, device)
            _sync(device)
            start = time.perf_counter()
            pending = [driver.step() for _ in range(steps_per_round)]
            _sync(device)
            elapsed = time.perf_counter() - start
            for p in pending:   # what a log interval would read: outside the timed block
                resolve_phases(p.stamps, None)
            seconds[mode].append(_max_over_ranks(elapsed, device) / steps_per_round)
    peak_gb = _max_over_ranks(session.memory.read_gb()[1], device)
    rates = session.throughput
    by_mode = {}
    for mode in modes:
        times = seconds[mode]
        median_s = statistics.median(times)
        by_mode[mode] = {
            "median_step_ms": 1000 * median_s,
            "iqr_pct": 100 * (quantile(times, 0.75) - quantile(times, 0.25)) / median_s,
            "min_step_ms": 1000 * min(times),
            "max_step_ms": 1000 * max(times),
            **rates.rates(median_s),
            # paired: this round's "none" time over this round's time in this mode; the
            # quartiles of those ratios say how far the median can be trusted
            **_paired_ratio(seconds.get("none"), times),
            "step_ms_per_round": [1000 * t for t in times],
        }
    return {"kind": "overhead", "rounds": rounds, "steps_per_round": steps_per_round,
            "modes": by_mode, "peak_memory_gb": peak_gb}


def _paired_ratio(none: Optional[list[float]], times: list[float]) -> dict[str, Optional[float]]:
    if not none:
        return {"throughput_vs_none": None, "vs_none_q1": None, "vs_none_q3": None}
    ratios = [n / t for n, t in zip(none, times)]
    return {"throughput_vs_none": statistics.median(ratios),
            "vs_none_q1": quantile(ratios, 0.25), "vs_none_q3": quantile(ratios, 0.75)}


def _run(argv: Sequence[str], kind: str) -> int:
    parser = config_parser(f"tp-bench selfcheck {kind}")
    if kind == "overhead":
        parser.add_argument("--rounds", type=int, default=12)
        parser.add_argument("--steps_per_round", type=int, default=4)
    parser.add_argument("--out", help="write the JSON report here (rank 0)")
    args = parser.parse_args(argv)
    cfg = config_from_args(args)
    # nothing is logged per interval here; the checks need at least one measured step
    cfg.num_training_steps = max(cfg.num_training_steps, cfg.warmup_steps + 1)
    ctx = distributed.setup()
    session = prepare(cfg, ctx)
    session.setup()
    doc = session.record()
    if kind == "overhead":
        doc.update(measure_overhead(session, args.rounds, args.steps_per_round))
    else:
        doc.update({"kind": "startup", **session.startup})
    if ctx.is_rank0:
        print(format_table([doc]))
        if args.out:
            results.write_json_atomic(args.out, doc)
    distributed.teardown()
    return 0


def _label(doc: dict[str, Any]) -> str:
    c = doc["config"]
    extras = [k for k in ("compile",) if c.get(k)]
    if doc["kind"] == "startup":
        extras.append("meta init" if c.get("meta_init") else "full build")
    return " ".join([c["impl"], *extras]) if extras else f"{c['impl']} eager"


def _fmt(value: Optional[float], spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def _pct(fraction: Optional[float]) -> str:
    return "n/a" if fraction is None else f"{100 * fraction:.1f}%"


def format_table(docs: list[dict[str, Any]]) -> str:
    """Markdown: one row per (run, timing mode) for overhead, one per run for startup."""
    lines = []
    overhead = [d for d in docs if d["kind"] == "overhead"]
    startup = [d for d in docs if d["kind"] == "startup"]
    if overhead:
        lines += ["| model | impl | timing | tokens/s | vs none (median) | vs none (q1-q3) | MFU | "
                  "step ms (median) | IQR | peak GB |",
                  "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
        for d in overhead:
            for mode, m in d["modes"].items():
                lines.append(
                    f"| {d['config']['model_name']} | {_label(d)} | {mode} | "
                    f"{m['tokens_per_sec']:.0f} | {_fmt(m['throughput_vs_none'], '.4f')} | "
                    f"{_fmt(m.get('vs_none_q1'), '.3f')}-{_fmt(m.get('vs_none_q3'), '.3f')} | "
                    f"{_pct(m['mfu'])} | {m['median_step_ms']:.1f} | "
                    f"{m['iqr_pct']:.1f}% | {d['peak_memory_gb']:.1f} |")
    if startup:
        lines += ["" if lines else None,
                  "| model | layers | impl | launch to first step s | setup s | host peak GB | GPU peak GB |",
                  "|---|---:|---|---:|---:|---:|---:|"]
        lines = [x for x in lines if x is not None]
        for d in startup:
            lines.append(
                f"| {d['config']['model_name']} | {d['model']['num_layers']} | {_label(d)} | "
                f"{d['launch_to_first_step_s']:.1f} | {d['setup_time_s']:.1f} | "
                f"{d['setup_peak_host_gb']:.1f} | {_fmt(d['setup_peak_gpu_gb'], '.1f')} |")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("overhead", "startup", "table"):
        print(__doc__)
        return 2
    kind, rest = argv[0], argv[1:]
    try:
        if kind == "table":
            print(format_table([json.loads(Path(p).read_text()) for p in rest]))
            return 0
        return _run(rest, kind)
    except ConfigError as exc:
        distributed.rank0_print(f"tp_bench: error: {exc}", file=sys.stderr)
        return 2
