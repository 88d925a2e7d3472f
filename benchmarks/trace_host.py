"""Where the host's time in a profiled step goes: the CPU side of a ``--profile`` Chrome trace
(``trace_*.json.gz``), for steps bound by the host launching kernels (batch 1 on a GPU).

    python benchmarks/trace_host.py TRACE [TRACE ...] [--top 30]

Per trace, within the step: its wall time; on the main thread the time inside top-level
operators (those not called from another operator) and the rest (Python between operators); on
the other threads (on a GPU the backward runs on autograd's device thread) the time inside
top-level operators; then the top-level operators and CUDA runtime calls grouped by name
(inclusive ms, count). With two traces, the groups side by side, largest difference first."""

from __future__ import annotations

import argparse
import gzip
import json
from collections import Counter, defaultdict


Groups = dict[str, list]   # name -> [inclusive ms, count]


def host_times(path: str) -> tuple[dict[str, float], Groups, Groups]:
    """(totals, top-level operators, CUDA runtime calls) within the step."""
    with gzip.open(path, "rt") as f:
        events = json.load(f)["traceEvents"]
    step = max((e for e in events if e.get("name") == "tp_bench.step" and "dur" in e),
               key=lambda e: e["dur"])
    begin, end, main = step["ts"], step["ts"] + step["dur"], step.get("tid")
    inside = [e for e in events if "dur" in e and begin <= e["ts"] < end and e is not step
              and e.get("cat") in ("cpu_op", "cuda_runtime")]
    ops: Groups = defaultdict(lambda: [0.0, 0])
    runtime: Groups = defaultdict(lambda: [0.0, 0])
    top_end: dict = {}          # per thread: where its current top-level operator ends
    busy: Counter = Counter()   # main thread or not: ms inside top-level operators
    for e in sorted(inside, key=lambda e: (e["ts"], -e["dur"])):
        ms = e["dur"] / 1000.0
        if e["cat"] == "cuda_runtime":
            group = runtime[e["name"]]
        elif e["ts"] >= top_end.get(e["tid"], -1.0):
            group = ops[e["name"]]
            top_end[e["tid"]] = e["ts"] + e["dur"]
            busy[e["tid"] == main] += ms
        else:
            continue
        group[0] += ms
        group[1] += 1
    wall = step["dur"] / 1000.0
    totals = {"step wall ms": wall, "main thread in top-level ops ms": busy[True],
              "between them ms": wall - busy[True],
              "other threads (autograd's device threads) in ops ms": busy[False],
              "top-level ops": sum(n for _, n in ops.values()),
              "runtime calls": sum(n for _, n in runtime.values())}
    return totals, ops, runtime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("traces", nargs="+")
    parser.add_argument("--top", type=int, default=30)
    args = parser.parse_args()
    loaded = [host_times(p) for p in args.traces]
    for path, (totals, _, _) in zip(args.traces, loaded):
        print(path + ": " + ", ".join(f"{k} {v:,.1f}" for k, v in totals.items()))
    for title, index in (("top-level operators", 1), ("CUDA runtime calls", 2)):
        def group(t, n):   # (ms, count) of name n in trace t's table, (0, 0) where absent
            return t[index].get(n, (0.0, 0))

        def change(n):
            return group(loaded[0], n)[0] - group(loaded[-1], n)[0]

        names = set().union(*(t[index] for t in loaded))
        order = sorted(names, key=lambda n: -(abs(change(n)) if len(loaded) > 1
                                              else group(loaded[0], n)[0]))
        print(f"\n{title}: " + " | ".join("ms (count)" for _ in loaded)
              + (" | difference ms" if len(loaded) > 1 else ""))
        for n in order[:args.top]:
            cells = [f"{group(t, n)[0]:9.2f} ({group(t, n)[1]:5d})" for t in loaded]
            diff = f" | {change(n):+8.2f}" if len(loaded) > 1 else ""
            print(f"  {n[:60]:60s} " + " | ".join(cells) + diff)


if __name__ == "__main__":
    main()
