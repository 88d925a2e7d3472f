"""Measure on CPU the peaks the memory plan predicts: set-up, forward/backward, optimizer step.

    torchrun --nproc_per_node=2 benchmarks/plan_peaks.py --impl autotp --model_name tiny \\
        --seq_length 64 --batch_size 2 [--out rows.jsonl]

Under torchrun, with the run's options: builds the session under the profiler (set-up), trains
a step, then profiles a second step phase by phase. The CPU allocator has no peak counter, so
the peak is rebuilt from the profiler's allocation events (``profile_memory=True``; the event
tree is a private torch API, read here and nowhere in tp_bench): the live tensors at the step's
start (every tensor reachable from Python) plus the running sum of the allocations and frees.
Rank 0 prints one markdown row (and appends it as JSON to ``--out``): measured and planned
peaks per phase, in MB. On CPU, gloo has no reduce-scatter and runs it as an all-reduce of a
copy, which the plan (made for NCCL) does not count.
"""

from __future__ import annotations

import gc
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile, record_function  # noqa: E402

from tp_bench.core import dist as distributed  # noqa: E402
from tp_bench.engine.plan import plan_row  # noqa: E402
from tp_bench.engine.session import prepare  # noqa: E402
from tp_bench.engine.shapes import model_shapes  # noqa: E402
from tp_bench.frontends.arguments import parse_config  # noqa: E402

MB = 1e6


def live_bytes() -> int:
    gc.collect()
    found = {}
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor):
            t = obj.to_local() if hasattr(obj, "to_local") else obj
            if t.device.type != "meta" and t.numel():
                found[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(found.values())


def allocations(prof) -> tuple[list[tuple[int, int]], list[tuple[str, int, int]]]:
    """(time, +/- bytes) of every CPU allocation, and the time ranges of the marked phases."""
    from torch._C._profiler import _EventType

    events, ranges = [], []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        if node.typed[0] == _EventType.Allocation and node.typed[1].device.type == "cpu":
            events.append((node.start_time_ns, node.typed[1].alloc_size))
        if node.name.startswith("phase:"):
            ranges.append((node.name[6:], node.start_time_ns, node.end_time_ns))
    return sorted(events), ranges


def peaks(events, ranges, base: int) -> dict[str, int]:
    """The highest live bytes inside each phase (a phase may run several times: micro-batches)."""
    current, out = base, {name: base for name, _, _ in ranges}
    for t, size in events:
        current += size
        for name, start, end in ranges:
            if start <= t <= end:
                out[name] = max(out[name], current)
    return out


def main() -> None:
    argv = sys.argv[1:]
    out_path = None
    if "--out" in argv:
        i = argv.index("--out")
        out_path, argv = argv[i + 1], argv[:i] + argv[i + 2:]
    cfg = parse_config(argv + ["--num_training_steps", "10", "--warmup_steps", "0"])
    ctx = distributed.setup()
    session = prepare(cfg, ctx)
    base = live_bytes()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        with record_function("phase:setup"):
            session.setup()
    setup = peaks(*allocations(prof), base)["setup"] - base
    driver = session.driver("none")
    driver.step()
    start = live_bytes()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        done = None
        while done is None:                  # every micro-batch, then the optimizer
            phase = driver.next_phase
            with record_function("phase:" + phase):
                done = driver.run_phase(phase)
    measured = peaks(*allocations(prof), start)
    row = plan_row(session.cfg, model_shapes(cfg.model_name, cfg.num_layers))
    planned = row.phases
    result = {
        "label": row.label, "model": cfg.model_name, "tokens": cfg.batch_size * cfg.seq_length,
        "activation_checkpointing": cfg.activation_checkpointing,
        "measured": {"setup": setup, "forward_backward": max(measured["forward"],
                                                             measured["backward"]),
                     "optimizer_step": measured["optimizer"]},
        "planned": {"setup": planned["setup"],
                    "forward_backward": max(planned["forward_backward"],
                                            planned["backward_end"]),
                    "optimizer_step": planned["optimizer_step"]},
    }
    if ctx.is_rank0:
        cells = []
        for key in ("setup", "forward_backward", "optimizer_step"):
            m, p = result["measured"][key], result["planned"][key]
            cells.append(f"{m / MB:.1f} | {p / MB:.1f} | {100 * (p - m) / m:+.1f}%")
        print(f"| {result['label']} | {cfg.model_name} | {result['tokens']} | "
              f"{'on' if cfg.activation_checkpointing else 'off'} | " + " | ".join(cells) + " |")
        if out_path:
            with open(out_path, "a") as f:
                f.write(json.dumps(result) + "\n")
    session.close()
    distributed.teardown()


if __name__ == "__main__":
    main()
    distributed.leave(0)
